"""What the sender works on: a claimed delivery (Job), each provider call of its attempt (Call), the messages a
task is sent as, and the HTTP status an outcome's attempt-log row carries."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from connectors.base import Message, Outcome
from pipeline.policy import providers as policy
from pipeline.policy import push, recovery
from pipeline.policy.templates import Rendered
from pipeline.stages.records import Record


@dataclass
class Call:
    """One provider call of an attempt (a fallback makes two; a push makes one per device)."""

    outcome: Outcome
    started_at: datetime.datetime
    finished_at: datetime.datetime
    device: push.Device | None = None  # push: the device it went to


@dataclass
class Job:
    """One claimed delivery: its task, rendered content, attempt number, and what happened."""

    task: dict[str, Any]
    rendered: Rendered
    record: Record  # the send record: its bytes go to a retry tier or the DLQ as they are
    attempt_no: int = 0
    tiers_used: int = 0
    fallback_from: str | None = None  # a failure receipt's provider: not tried again
    calls: list[Call] = field(default_factory=list)
    state: policy.DeliveryResult = "unknown"
    retry: recovery.RetryStep | None = None  # set when every provider failed transiently
    accepted_by: Outcome | None = None
    last: Outcome | None = None
    # push: whether a device accepted in an earlier attempt, the devices the send record lists, what this attempt
    # came to per device, and the reduced task (the pending devices) that replaces the record's value downstream
    accepted_before: bool = False
    listed: tuple[push.Device, ...] = ()
    plan: push.PushPlan | None = None
    value: bytes | None = None

    @property
    def key(self) -> tuple[str, str]:
        return str(self.task["notification_id"]), str(self.task["channel"])


def messages_of(task: Mapping[str, Any], rendered: Rendered) -> list[tuple[Message, str | None]]:
    """The messages a task is sent as, each with its push platform: one for sms and email, one per push device."""
    nid, channel = str(task["notification_id"]), task["channel"]
    if channel != "push":
        return [(Message(nid, channel, task.get("address") or "", rendered.body, subject=rendered.subject,
                         html=rendered.html if channel == "email" else None, template_id=task.get("template_id"),
                         params=task.get("template_params") or {}), None)]
    return [(Message(nid, "push", device["token"], rendered.body, subject=rendered.subject,
                     template_id=task.get("template_id"), collapse_key=nid), device["platform"])
            for device in task.get("device_tokens") or []]


def response_status(outcome: Outcome) -> int | None:
    """The HTTP status of the answer when the outcome carries one (error codes that are HTTP statuses)."""
    if outcome.kind == "accepted":
        return 200
    code = outcome.error_code or ""
    return int(code) if code.isdigit() and 100 <= int(code) < 600 else None
