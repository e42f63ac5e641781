"""Push per device: what a push delivery does after each of its devices answered, and which devices a later send
goes to. Pure functions over plain data; the sender stage sends, asks here, and records.

A push delivery is one message per device token (DeliveryTask.device_tokens), each through the one provider its
token names (providers.for_device). Each device ends an attempt in one of the sender's four results, and:

- accepted (its provider took the push): never pushed again for this notification, whatever happens to the other
  devices. It is dropped from every later send: the retry, reconciliation's re-send, a DLQ redrive.
- failed (unregistered or invalid token, no provider for the token, a refused request): dropped, no retry fixes it.
- retry_scheduled (transient on its provider: 5xx, 429, refused connection) and unknown (ambiguous: the request left
  and no answer came) stay pending: the next send of the delivery goes to the pending devices only.

The delivery's row, a single state machine per notification and channel, follows:

- while any device is pending, the row stays open so that its claim can take it again: `unknown` when a device is
  ambiguous (reconciliation re-sends the pending devices; the notification id is the collapse id, so an ambiguous
  device that had it shows it once), else `retry_scheduled` (the retry tier re-sends the pending devices);
- with none pending: `accepted` when any device accepted, in this attempt or an earlier one (the user has it), else
  `failed`;
- when pending devices run out of retry tiers or of time after another device accepted, the row ends `accepted`,
  not `dead_lettered` or `expired`: the user got the notification; what each device got is in the attempt log.

The reduced task (the pending devices only) is what the row stores (deliveries.task) and what the retry tier, the
DLQ and every re-injection carry; at its claim the sender also sends only to devices the stored task still lists,
so a send record read again after a crash or a replay cannot push twice to a device that accepted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from connectors.base import Outcome
from pipeline.policy.providers import DeliveryResult

PENDING: frozenset[DeliveryResult] = frozenset({"retry_scheduled", "unknown"})


def fingerprint(token: str) -> str:
    """What the attempt log names a device by: the first 16 hex digits of its token's SHA-256. A push token is a
    credential to reach the user's device, so it is never written there; the fingerprint still matches a token
    one holds (hash it) and tells the devices of a user apart."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Device:
    """One DeviceToken of a push task."""

    platform: str
    token: str

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.token)

    def as_record(self) -> dict[str, str]:
        return {"platform": self.platform, "token": self.token}


def devices_of(task: Mapping[str, Any]) -> tuple[Device, ...]:
    """The devices of a (decoded) DeliveryTask, in its order."""
    return tuple(Device(str(d["platform"]), str(d["token"])) for d in task.get("device_tokens") or [])


def with_devices(task: Mapping[str, Any], devices: Iterable[Device]) -> dict[str, Any]:
    """The task sent to `devices` only."""
    return {**task, "device_tokens": [d.as_record() for d in devices]}


def still_pending(sent: Sequence[Device], stored: Sequence[Device] | None) -> tuple[Device, ...]:
    """The devices of a send record that its row's stored task still lists (its order): a record read again (a
    redelivery after a crash, a replay, an old retry) names devices that accepted or failed since, and the row,
    written with each outcome, is the truth. A row without a stored task leaves the record as it is."""
    if stored is None:
        return tuple(sent)
    keep = set(stored)
    return tuple(d for d in sent if d in keep)


@dataclass(frozen=True, slots=True)
class DeviceResult:
    """What one device's send came to in this attempt: the sender's result and the last provider answer (None when
    no provider could be called for its token)."""

    device: Device
    result: DeliveryResult
    outcome: Outcome | None = None


@dataclass(frozen=True)
class PushPlan:
    """The delivery after one attempt to its devices."""

    state: DeliveryResult
    pending: tuple[Device, ...]  # the next send goes to these (empty once the delivery is settled)
    accepted: bool  # some device has the notification (this attempt or an earlier one)
    first_acceptance: bool  # ... and this attempt is the first to reach one
    reported: Outcome | None  # the answer the row and its event carry: the last device that decided the state


def settle(results: Sequence[DeviceResult], *, accepted_before: bool = False) -> PushPlan:
    """The delivery's state and pending devices from its devices' results (the module's rules)."""
    accepted_now = any(r.result == "accepted" for r in results)
    accepted = accepted_now or accepted_before
    pending = tuple(dict.fromkeys(r.device for r in results if r.result in PENDING))  # a token listed twice: once
    state: DeliveryResult
    if any(r.result == "unknown" for r in results):
        state = "unknown"
    elif pending:
        state = "retry_scheduled"
    else:
        state = "accepted" if accepted else "failed"
    deciding = [r.outcome for r in results if r.result == state and r.outcome is not None]
    reported = deciding[-1] if deciding else next((r.outcome for r in reversed(results) if r.outcome), None)
    return PushPlan(state, pending, accepted, accepted_now and not accepted_before, reported)


RetryAction = Literal["retry", "dead_letter", "expire"]


def after_retry_step(plan: PushPlan, action: RetryAction) -> Literal["retry_scheduled", "dead_lettered", "expired",
                                                                     "accepted"]:
    """The row state when the retry policy answers `action` for a delivery whose pending devices failed
    transiently: out of tiers or of time, a delivery that reached a device is accepted (the user has it)."""
    if action == "retry":
        return "retry_scheduled"
    if plan.accepted:
        return "accepted"
    return "dead_lettered" if action == "dead_letter" else "expired"
