"""The sender: send.<channel>.<lane> -> providers, with claim-before-send on the `deliveries` row.

Per batch (up to NOTIFY_SENDER_MAX_IN_FLIGHT tasks, every channel of the lane):

1. Decode (undecodable -> quarantine), drop tasks whose notification expired (row -> `expired`) and render each
   task's content (an unknown template fails the row for good: a retry cannot fix it). For a type that needs
   consent (marketing), ask the user's stored settings once more (one statement per batch): a consent withdrawn
   while the message waited in a queue suppresses the row (`no_consent` or `opted_out`) instead of sending. For a
   task with a collapse key, ask for the latest notification of its key (one statement per batch): a task that a
   newer one replaces is suppressed (`superseded`).
2. Claim every task in one statement: `queued` (or a `retry_scheduled` row that is due) -> `sending` with a lease
   and attempt_count + 1. A task whose row is not claimable (already sending, accepted, final: a redelivery, a
   replay or a second worker after a rebalance) is skipped: nothing is sent twice.
3. Send every claimed task at once, each through its provider list (pipeline/policy/providers.py): breakers (from
   Redis, read once per batch) and the providers' recent p95 latency against the task's time to live pick the
   candidates; a transient failure falls over to the next provider within the same attempt. A push is one send per
   device, and pipeline/policy/push.py settles the delivery from the devices' results: a retry (and any re-send)
   goes only to the devices that neither accepted nor failed for good, and the row stores that reduced task.
4. Record: one statement moves every row to its outcome (`accepted` with the provider's id, `failed`,
   `retry_scheduled` with its due time, `unknown` for an ambiguous answer, which reconciliation resolves and
   nothing re-sends blindly), one statement appends every provider call to `notification_attempts`, one Redis
   pipeline adds the calls to the breakers' windows, and an event goes out per transition.

A crash between claim and record leaves rows `sending` under an expired lease: reconciliation asks the provider,
the sender never re-sends them. The batch's offsets are committed only after all of this (StageRunner).
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from psycopg.types.json import Jsonb

from connectors.base import Connector, Message, Outcome
from connectors.factory import create_connector
from pipeline import metrics
from pipeline.domain import CHANNELS
from pipeline.kafka import serde, topics
from pipeline.policy import cost, latest, push, recovery
from pipeline.policy import providers as policy
from pipeline.policy.preferences import CONSENT_REQUIRED, consent_refusal
from pipeline.policy.regions import NO_PHONE, CountryLabels
from pipeline.policy.shadow import ShadowResult, is_mirrored, shadow_columns, side
from pipeline.policy.templates import Rendered, TemplateError, render
from pipeline.stages import retry
from pipeline.stages.runtime import (
    BATCH_RETRY_S,
    RETRY_PAUSE_S,
    Record,
    Stage,
    StageContext,
    is_infrastructure,
    utcnow,
)
from pipeline.state import db
from pipeline.state.breaker import BreakerBoard

log = logging.getLogger("notify.sender")

PROVIDER_SECONDS = metrics.histogram(
    "notify_provider_request_seconds", "Provider call latency, by outcome and the recipient's country (SMS).",
    ["provider", "channel", "outcome", "country"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30))
PROVIDER_OUTCOMES = metrics.counter(
    "notify_provider_outcomes_total", "Provider calls, by outcome, reason and the recipient's country (SMS: "
    "from the calling code, a bounded set; none for email and push).", ["provider", "channel", "outcome", "reason",
                                                                        "country"])
IN_FLIGHT = metrics.gauge("notify_sender_in_flight", "Sends in flight in this worker.", ["lane"])
PROVIDER_IN_FLIGHT = metrics.gauge("notify_provider_in_flight", "Calls in flight to a provider in this worker.",
                           ["provider"])
DELIVERIES = metrics.counter(
    "notify_sender_deliveries_total", "Deliveries the sender settled, by resulting state.",
    ["lane", "channel", "state"])
SEND_LATENCY = metrics.histogram(
    "notify_send_latency_seconds", "From a notification's creation to a provider accepting it.",
    ["lane", "channel", "type"], buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900))
COST = metrics.counter(
    "notify_provider_cost_usd_total", "What accepted messages cost, in USD, from NOTIFY_PROVIDER_PRICES_USD (SMS per "
    "segment).", ["provider", "channel"])
SKIPPED = metrics.counter(
    "notify_sender_skipped_total", "Tasks not sent because their row was not claimable.", ["lane"])
SHADOW_SECONDS = metrics.histogram(
    "notify_shadow_request_seconds", "Latency of shadow (test-mode) calls to a candidate provider.",
    ["provider", "channel"], buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10))
SHADOW_OUTCOMES = metrics.counter(
    "notify_shadow_outcomes_total", "Shadow calls to a candidate provider, by outcome.",
    ["provider", "channel", "outcome"])
SHADOW_MAX_IN_FLIGHT = 100  # shadow traffic never competes for more than this
SHADOW_RESULTS_DROPPED = metrics.counter(
    "notify_shadow_results_dropped_total", "Shadow comparisons not written to shadow_results (the buffer was full "
    "or the database refused the flush).", ["reason"])
SHADOW_FLUSH_S = 1.0  # shadow comparisons are written at most once a second per worker, one statement each time
SHADOW_BUFFER_MAX = 10_000  # comparisons held while a flush is slow or the database is away; more are dropped

CLAIM = """
UPDATE deliveries d
SET state = 'sending', attempt_count = d.attempt_count + 1, lease_owner = %(owner)s, claimed_at = now(),
    lease_expires_at = now() + make_interval(secs => %(lease_s)s), next_attempt_at = NULL
FROM unnest(%(ids)s::uuid[], %(channels)s::text[]) AS k(notification_id, channel)
WHERE d.notification_id = k.notification_id AND d.channel = k.channel
  AND (d.state = 'queued' OR (d.state = 'retry_scheduled' AND d.next_attempt_at <= now() + interval '1 second'))
RETURNING d.notification_id::text, d.channel, d.attempt_count, d.retry_tier, d.fallback_from,
    CASE WHEN d.channel = 'push' THEN d.task END, d.channel = 'push' AND d.accepted_at IS NOT NULL
"""
EXPIRE = """
UPDATE deliveries d SET state = 'expired', last_error_code = 'expired', final_at = now(), next_attempt_at = NULL
FROM unnest(%(ids)s::uuid[], %(channels)s::text[]) AS k(notification_id, channel)
WHERE d.notification_id = k.notification_id AND d.channel = k.channel AND d.state IN ('queued', 'retry_scheduled')
RETURNING d.notification_id::text, d.channel
"""
CONSENT_OF = "SELECT user_id, category_settings FROM user_notification_settings WHERE user_id = ANY(%s)"
LATEST_OF = """
SELECT DISTINCT ON (n.user_id, n.notification_type, n.collapse_key)
       n.user_id, n.notification_type, n.collapse_key, n.created_at, n.notification_id::text
FROM notifications n
JOIN unnest(%s::text[], %s::text[], %s::text[]) AS k(user_id, notification_type, collapse_key)
  ON n.user_id = k.user_id AND n.notification_type = k.notification_type AND n.collapse_key = k.collapse_key
WHERE n.collapse_key IS NOT NULL
ORDER BY n.user_id, n.notification_type, n.collapse_key, n.created_at DESC, n.notification_id DESC
"""
SUPPRESS_UNSENT = """
UPDATE deliveries d SET state = 'suppressed', last_error_code = k.reason, final_at = now(), next_attempt_at = NULL
FROM unnest(%(ids)s::uuid[], %(channels)s::text[], %(reasons)s::text[]) AS k(notification_id, channel, reason)
WHERE d.notification_id = k.notification_id AND d.channel = k.channel AND d.state IN ('queued', 'retry_scheduled')
RETURNING d.notification_id::text, d.channel, k.reason
"""
FAIL_UNSENDABLE = """
UPDATE deliveries d SET state = 'failed', last_error_code = k.code, last_error_message = k.message,
    final_at = now(), next_attempt_at = NULL
FROM unnest(%(ids)s::uuid[], %(channels)s::text[], %(codes)s::text[], %(messages)s::text[])
    AS k(notification_id, channel, code, message)
WHERE d.notification_id = k.notification_id AND d.channel = k.channel AND d.state IN ('queued', 'retry_scheduled')
RETURNING d.notification_id::text, d.channel
"""
# Only rows this worker still holds: if the lease expired and reconciliation took the row, its answer stands.
# A push delivery that reached a device in an earlier attempt (accepted_at set while others were pending) keeps
# that device's provider, message id and time; `task` is the reduced task of a push whose devices partly settled
# (pipeline/policy/push.py), NULL to keep the stored one; `reached`: a push device accepted in this attempt.
RECORD = """
UPDATE deliveries d
SET state = k.state,
    provider = CASE WHEN d.channel = 'push' AND d.accepted_at IS NOT NULL THEN d.provider
                    ELSE COALESCE(k.provider, d.provider) END,
    provider_message_id = CASE WHEN d.channel = 'push' AND d.accepted_at IS NOT NULL THEN d.provider_message_id
                               ELSE k.provider_message_id END,
    last_error_code = k.code, last_error_message = k.message, next_attempt_at = k.next_attempt_at,
    lease_owner = NULL, lease_expires_at = NULL, retry_tier = k.retry_tier, task = COALESCE(k.task, d.task),
    accepted_at = CASE WHEN d.channel = 'push' AND d.accepted_at IS NOT NULL THEN d.accepted_at
                       WHEN k.state = 'accepted' OR k.reached THEN now() ELSE d.accepted_at END,
    final_at = CASE WHEN k.state IN ('failed', 'dead_lettered', 'expired') THEN now() ELSE d.final_at END
FROM unnest(%(ids)s::uuid[], %(channels)s::text[], %(states)s::text[], %(providers)s::text[],
            %(provider_ids)s::text[], %(codes)s::text[], %(messages)s::text[], %(due)s::timestamptz[],
            %(tiers)s::int[], %(tasks)s::bytea[], %(reached)s::bool[])
    AS k(notification_id, channel, state, provider, provider_message_id, code, message, next_attempt_at,
         retry_tier, task, reached)
WHERE d.notification_id = k.notification_id AND d.channel = k.channel
  AND d.state = 'sending' AND d.lease_owner = %(owner)s
RETURNING d.notification_id::text, d.channel
"""
# A receipt can overtake the sender's answer (the provider's callback came while the batch was still out): the row
# is final already, by the receipt of the very message we sent. It keeps its state; it learns when it was accepted.
RECORD_OVERTAKEN = """
UPDATE deliveries d SET accepted_at = now()
FROM unnest(%(ids)s::uuid[], %(channels)s::text[], %(provider_ids)s::text[])
    AS k(notification_id, channel, provider_message_id)
WHERE d.notification_id = k.notification_id AND d.channel = k.channel AND d.accepted_at IS NULL
  AND d.state IN ('delivered', 'failed') AND d.provider_message_id = k.provider_message_id
RETURNING d.notification_id::text, d.channel
"""
# A push call's row names its device (platform, token fingerprint): the attempt log holds each device's outcome.
ATTEMPTS = """
INSERT INTO notification_attempts (notification_id, channel, attempt_no, provider, outcome, response_status,
    provider_message_id, error_code, error_payload, started_at, finished_at, latency_ms, device_platform,
    device_fingerprint)
SELECT * FROM unnest(%(ids)s::uuid[], %(channels)s::text[], %(attempt_nos)s::int[], %(providers)s::text[],
    %(outcomes)s::text[], %(statuses)s::int[], %(provider_ids)s::text[], %(codes)s::text[], %(payloads)s::jsonb[],
    %(started)s::timestamptz[], %(finished)s::timestamptz[], %(latencies)s::int[], %(platforms)s::text[],
    %(fingerprints)s::text[])
"""

SHADOW_RESULTS = """
INSERT INTO shadow_results (notification_id, channel, lane,
    primary_provider, primary_outcome, primary_code, primary_latency_ms, primary_encoding, primary_segments,
    primary_length, candidate_provider, candidate_outcome, candidate_code, candidate_latency_ms, candidate_encoding,
    candidate_segments, candidate_length)
SELECT * FROM unnest(%(notification_ids)s::uuid[], %(channels)s::text[], %(lanes)s::text[],
    %(primary_providers)s::text[], %(primary_outcomes)s::text[], %(primary_codes)s::text[],
    %(primary_latencies_ms)s::float8[], %(primary_encodings)s::text[], %(primary_segments)s::int[],
    %(primary_lengths)s::int[], %(candidate_providers)s::text[], %(candidate_outcomes)s::text[],
    %(candidate_codes)s::text[], %(candidate_latencies_ms)s::float8[], %(candidate_encodings)s::text[],
    %(candidate_segments)s::int[], %(candidate_lengths)s::int[])
"""


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


class Sender:
    def __init__(self, ctx: StageContext, board: BreakerBoard, *,
                 connectors: Mapping[str, Connector] | None = None) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.board = board
        self.routing = policy.routing_table(ctx.settings.routing_overrides)
        self.countries = CountryLabels(code for _, code in self.routing.by_country)
        self.connectors: dict[str, Connector] = dict(connectors or {})
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.latencies: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=200))
        self._shared_p95: dict[str, float] = {}
        self.shadow_tasks: set[asyncio.Task[None]] = set()
        self.shadow_plan = dict(ctx.settings.shadow)  # channel -> (candidate provider, share)
        self.shadow_results: list[ShadowResult] = []  # written by flush_shadow_results, off the batch's path
        self._shadow_flush: asyncio.Task[None] | None = None
        self.prices = dict(ctx.settings.provider_prices_usd)
        for channel, providers in policy.DEFAULT_ORDER.items():
            for provider in providers:
                # At 0 from the start: rate() cannot see the increase of a counter that appears at its first
                # increment, so a fresh worker's first calls would be missing from every ratio.
                for country in (self.countries.labels() - {NO_PHONE}) if channel == "sms" else (NO_PHONE,):
                    PROVIDER_OUTCOMES.labels(provider, channel, "accepted", "ok", country)
                COST.labels(provider, channel)
        self._in_flight = IN_FLIGHT.labels(ctx.lane)
        self._skipped = SKIPPED.labels(ctx.lane)
        self._deliveries = metrics.Children(DELIVERIES, ctx.lane)
        self._send_latency = metrics.Children(SEND_LATENCY, ctx.lane)
        self._provider_in_flight = metrics.Children(PROVIDER_IN_FLIGHT)
        self._provider_seconds = metrics.Children(PROVIDER_SECONDS)
        self._provider_outcomes = metrics.Children(PROVIDER_OUTCOMES)
        self._cost = metrics.Children(COST)
        self.tiers = retry.tiers(ctx.settings, ctx.lane)
        self.delays = [delay for _, delay in self.tiers]
        # every provider a route can name: their breakers are read once per batch
        self.providers = ({p for ch in CHANNELS for p in self.routing.default[ch]}
                          | {p for _, order in ctx.settings.routing_overrides for p in order})

    def connector(self, provider: str) -> Connector:
        if provider not in self.connectors:
            self.connectors[provider] = create_connector(provider, self.settings)
        return self.connectors[provider]

    async def close(self) -> None:
        if self.shadow_tasks:
            await asyncio.wait(self.shadow_tasks, timeout=5)
        for _ in range(2):  # a flush already under way, then what is left
            if self._shadow_flush is not None:
                await asyncio.wait([self._shadow_flush], timeout=5)
            await self.flush_shadow_results()
        for made in self.connectors.values():
            await made.close()
        await self.board.aclose()

    # ---------------------------------------------------------------------------------------------- the batch

    async def handle(self, ctx: StageContext, records: list[Record]) -> None:
        now = utcnow()
        tasks: dict[tuple[str, str], dict[str, Any]] = {}
        sources: dict[tuple[str, str], Record] = {}
        for record in records:
            task = ctx.decode(record, serde.DELIVERY_TASK)
            if task is not None:
                key = (str(task["notification_id"]), task["channel"])
                tasks[key], sources[key] = task, record  # a batch may hold a task twice
        expired = {k: t for k, t in tasks.items() if t.get("expires_at") is not None and t["expires_at"] <= now}
        unsendable: dict[tuple[str, str], TemplateError] = {}
        rendered: dict[tuple[str, str], Rendered] = {}
        for key, task in tasks.items():
            if key in expired:
                continue
            try:
                rendered[key] = render(task)
            except TemplateError as exc:
                unsendable[key] = exc
            if task["channel"] == "push" and not task.get("device_tokens"):
                unsendable[key] = TemplateError("no_recipient", "a push task without device tokens")
            if task["channel"] != "push" and not task.get("address"):
                unsendable[key] = TemplateError("no_recipient", f"a {task['channel']} task without an address")
        to_claim = [k for k in rendered if k not in unsendable]

        pool = await db.async_pool(self.settings)
        async with pool.connection() as conn:
            suppress = {**await self._withdrawn_consent(conn, tasks, to_claim),
                         **await self._superseded(conn, tasks, to_claim)}
            to_claim = [k for k in to_claim if k not in suppress]
            gone = await self._settle_unsent(conn, tasks, expired, unsendable, suppress)
            await conn.execute(db.BY_KEY_PLANS)  # the claim probes each key, however long `queued` is now
            rows = await (await conn.execute(CLAIM, {
                "owner": self.owner, "lease_s": self.settings.sender_lease_s,
                "ids": [k[0] for k in to_claim], "channels": [k[1] for k in to_claim]})).fetchall()
        jobs = [self._job(tasks[(nid, ch)], rendered[(nid, ch)], sources[(nid, ch)], attempt_no, tiers,
                          fallback_from, stored, reached)
                for nid, ch, attempt_no, tiers, fallback_from, stored, reached in rows]
        skipped = len(to_claim) - len(jobs)
        if skipped:
            self._skipped.inc(skipped)
        for job in jobs:
            ctx.observe_queue_latency(job.task.get("created_at"), now)
            ctx.emit(job.task, "sending", channel=job.key[1], attempt=job.attempt_no, at=now)
        if jobs:
            view = await self.board.read(self.providers)
            breakers, self._shared_p95 = view.states, view.p95_s  # batches run one at a time
            probes = {p for p, state in breakers.items() if state == "half_open"}
            self._in_flight.inc(len(jobs))
            try:
                await asyncio.gather(*(self._deliver(job, breakers, probes) for job in jobs))
            finally:
                self._in_flight.dec(len(jobs))
            await self.board.release_probes(probes)  # tokens won but not used: another worker may probe
            await self._record_surely(jobs)
        log.debug("batch: %d tasks, %d sent, %d skipped, %d unsendable/expired", len(tasks), len(jobs), skipped,
                  gone)

    def _job(self, task: dict[str, Any], rendered: Rendered, record: Record, attempt_no: int, tiers: int,
             fallback_from: str | None, stored: bytes | None, reached: bool | None) -> Job:
        """A claimed delivery. A push goes only to the devices its row's stored task still lists: the record may be
        one read again (a redelivery after a crash, a replay) that still names devices which accepted since."""
        job = Job(task, rendered, record, attempt_no, tiers, fallback_from, accepted_before=bool(reached))
        if task["channel"] != "push":
            return job
        job.listed = push.devices_of(task)
        stored_devices = None
        if stored is not None and bytes(stored) != record.value:
            stored_devices = push.devices_of(self.ctx.codec.decode(bytes(stored), expected=serde.DELIVERY_TASK).value)
        devices = push.still_pending(job.listed, stored_devices)
        if devices != job.listed:
            job.task = push.with_devices(task, devices)
        return job

    async def _withdrawn_consent(self, conn: Any, tasks: Mapping[tuple[str, str], dict[str, Any]],
                                 keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """The tasks whose user, by the settings stored now, no longer lets them go (key -> reason). A user with
        no stored row keeps the decision preferences made (settings produced to the topic, not through the API)."""
        asking = [k for k in keys if tasks[k]["type"] in CONSENT_REQUIRED]
        if not asking:
            return {}
        rows = await (await conn.execute(CONSENT_OF, (list({tasks[k]["user_id"] for k in asking}),))).fetchall()
        stored: dict[str, Any] = dict(rows)
        refused = {k: consent_refusal({"categories": stored[tasks[k]["user_id"]]}, tasks[k]["type"], k[1])
                   for k in asking if tasks[k]["user_id"] in stored}
        return {k: reason for k, reason in refused.items() if reason is not None}

    async def _superseded(self, conn: Any, tasks: Mapping[tuple[str, str], dict[str, Any]],
                          keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """The tasks a newer notification of their collapse key replaces (key -> "superseded")."""
        groups = {k: g for k in keys if (g := latest.collapse_group(tasks[k])) is not None}
        if not groups:
            return {}
        asked = list(set(groups.values()))
        rows = await (await conn.execute(LATEST_OF, tuple(map(list, zip(*asked, strict=True))))).fetchall()
        newest: dict[tuple[str, str, str], latest.Latest] = {(u, t, c): (at, nid) for u, t, c, at, nid in rows}
        return {k: "superseded" for k, group in groups.items() if latest.is_superseded(tasks[k], newest.get(group))}

    async def _settle_unsent(self, conn: Any, tasks: Mapping[tuple[str, str], dict[str, Any]],
                             expired: Iterable[tuple[str, str]],
                             unsendable: Mapping[tuple[str, str], TemplateError],
                             suppress: Mapping[tuple[str, str], str]) -> int:
        expired = list(expired)
        done = 0
        if suppress:  # consent withdrawn, or superseded: the reason is the row's code
            keys = list(suppress)
            rows = await (await conn.execute(SUPPRESS_UNSENT, {
                "ids": [k[0] for k in keys], "channels": [k[1] for k in keys],
                "reasons": [suppress[k] for k in keys]})).fetchall()
            for nid, channel, reason in rows:
                self.ctx.emit(tasks[(nid, channel)], "suppressed", channel=channel, error_code=reason)
                self._deliveries(channel, "suppressed").inc()
            done += len(rows)
        if expired:
            rows = await (await conn.execute(EXPIRE, {"ids": [k[0] for k in expired],
                                                      "channels": [k[1] for k in expired]})).fetchall()
            for nid, channel in rows:
                self.ctx.emit(tasks[(nid, channel)], "expired", channel=channel, error_code="expired")
                self._deliveries(channel, "expired").inc()
            done += len(rows)
        if unsendable:
            keys = list(unsendable)
            rows = await (await conn.execute(FAIL_UNSENDABLE, {
                "ids": [k[0] for k in keys], "channels": [k[1] for k in keys],
                "codes": [unsendable[k].code for k in keys], "messages": [str(unsendable[k]) for k in keys],
            })).fetchall()
            for nid, channel in rows:
                error = unsendable[(nid, channel)]
                self.ctx.emit(tasks[(nid, channel)], "failed", channel=channel, error_code=error.code,
                              error_message=str(error))
                self._deliveries(channel, "failed").inc()
            done += len(rows)
        return done

    # ------------------------------------------------------------------------------------------- one delivery

    async def _deliver(self, job: Job, breakers: dict[str, policy.BreakerState], probes: set[str]) -> None:
        try:
            results: list[policy.DeliveryResult] = []
            devices: list[push.DeviceResult] = []
            for message, platform in messages_of(job.task, job.rendered):
                results.append(await self._send_one(job, message, platform, breakers, probes))
                if platform is not None:  # job.last: this device's last answer
                    devices.append(push.DeviceResult(push.Device(platform, message.to), results[-1], job.last))
            if job.task["channel"] == "push":
                job.plan = push.settle(devices, accepted_before=job.accepted_before)
                job.state, job.last = job.plan.state, job.plan.reported or job.last
            else:
                job.state = policy.combine(results)
        except Exception as exc:  # our bug, not the provider's: the send may have happened, so never re-send
            log.exception("sender failed on %s", job.key)
            job.state = "unknown"
            job.last = Outcome("ambiguous", job.last.provider if job.last else "none", "connection_lost",
                               error_code="stage_error", error_message=f"{type(exc).__name__}: {exc}")

    async def _send_one(self, job: Job, message: Message, platform: str | None,
                        breakers: dict[str, policy.BreakerState], probes: set[str]) -> policy.DeliveryResult:
        task = job.task
        order = self.routing.order(task["channel"], task["lane"], message.to if task["channel"] == "sms" else None)
        order = tuple(p for p in order if p != job.fallback_from)
        if platform is not None:
            order = policy.for_device(order, platform, message.to)
        if not order:
            job.last = Outcome("permanent", "none", "invalid_recipient", error_code="no_provider",
                               error_message=f"no configured provider is left for this {task['channel']} message"
                               + (f" (a {platform} token)" if platform else "")
                               + (f" after {job.fallback_from} failed it" if job.fallback_from else ""))
            return "failed"
        remaining = None
        if task.get("expires_at") is not None:
            remaining = (task["expires_at"] - utcnow()).total_seconds()
        # A half-open provider takes one probe per worker and batch; the other sends treat it as open.
        seen = {p: ("open" if state == "half_open" and p not in probes else state) for p, state in breakers.items()}
        # The workers' shared p95 (Redis); this worker's own sample when the board had none (Redis away, or the
        # provider not called lately by anyone).
        shared = self._shared_p95
        chosen = policy.candidates(order, seen, {p: shared[p] if p in shared else policy.p95(self.latencies[p])
                                                 for p in order}, remaining)
        for tried, provider in enumerate(chosen, start=1):
            probing = seen.get(provider) == "half_open"
            if probing:
                probes.discard(provider)
            outcome = await self._call(job, provider, message,
                                       push.Device(platform, message.to) if platform is not None else None)
            job.last = outcome
            if probing:
                await self.board.probe_done(provider, not policy.counts_against_provider(outcome.kind,
                                                                                         outcome.reason))
            self._maybe_shadow(outcome, message)
            step = policy.after(outcome.kind, tried, len(chosen), outcome.reason)
            if step.action == "record_accepted":
                job.accepted_by = job.accepted_by or outcome
                return "accepted"
            if step.action == "fail":
                return "failed"
            if step.action == "mark_unknown":
                return "unknown"
            if step.action == "schedule_retry":
                return "retry_scheduled"
        return "retry_scheduled"  # unreachable: `after` ends the loop on the last candidate

    async def _call(self, job: Job, provider: str, message: Message, device: push.Device | None = None) -> Outcome:
        started = utcnow()
        self._provider_in_flight(provider).inc()
        try:
            outcome = await self.connector(provider).send(message)
        finally:
            self._provider_in_flight(provider).dec()
        job.calls.append(Call(outcome, started, utcnow(), device))
        self.latencies[provider].append(outcome.latency_s)
        country = self.countries.of(message.to if message.channel == "sms" else None)
        self._provider_seconds(provider, message.channel, outcome.kind, country).observe(outcome.latency_s)
        self._provider_outcomes(provider, message.channel, outcome.kind, outcome.reason, country).inc()
        if outcome.kind == "accepted":
            self._cost(provider, message.channel).inc(
                cost.message_cost(self.prices, provider, message.channel, message.body))
        return outcome

    def _park(self, job: Job, code: str, message: str) -> None:
        """A delivery every provider failed transiently: to its next retry tier, or to the DLQ after the last."""
        assert job.retry is not None
        nid, channel = job.key
        history = [*retry.decode_history(job.record.headers),
                   *({"attempt": job.attempt_no, "provider": c.outcome.provider, "outcome": c.outcome.kind,
                      "code": c.outcome.error_code or c.outcome.reason, "at": c.finished_at.isoformat()}
                     for c in job.calls)]
        base = retry.delivery_headers(nid, channel, self.ctx.lane, topics.send_topic(channel, self.ctx.lane),
                                      history)
        value = job.value if job.value is not None else job.record.value  # a push: its pending devices only
        if job.retry.action == "retry":
            assert job.retry.due is not None
            tier_topic = self.tiers[job.retry.tier - 1][0]
            self.ctx.send(tier_topic, job.record.key, value, retry.tier_headers(base, job.retry.tier, job.retry.due))
            retry.SCHEDULED.labels(self.ctx.lane, channel, str(job.retry.tier)).inc()
            return
        self.ctx.send(topics.DLQ, job.record.key, value, retry.dead_letter_headers(
            base, job.retry.reason, f"{code}: {message}", job.record.source))
        retry.DEAD_LETTERED.labels(self.ctx.lane, channel, job.retry.reason).inc()

    def _maybe_shadow(self, primary: Outcome, message: Message) -> None:
        """Mirror a share of the channel's sends to the candidate provider in its test mode (never delivered). The
        share is drawn from the notification id, so a notification is mirrored on every call or on none."""
        plan = self.shadow_plan.get(message.channel)
        if plan is None or plan[0] == primary.provider or not is_mirrored(message.notification_id, plan[1]):
            return
        if len(self.shadow_tasks) >= SHADOW_MAX_IN_FLIGHT:
            SHADOW_OUTCOMES.labels(plan[0], message.channel, "skipped").inc()
            return
        task = asyncio.create_task(self._shadow(plan[0], replace(message, test_mode=True), primary))
        self.shadow_tasks.add(task)
        task.add_done_callback(self.shadow_tasks.discard)

    async def _shadow(self, provider: str, message: Message, primary: Outcome) -> None:
        started = time.perf_counter()
        kind: str
        try:
            outcome = await self.connector(provider).send(message)
            kind, code, latency_s = outcome.kind, outcome.error_code or outcome.reason, outcome.latency_s
        except Exception as exc:  # a shadow call must never affect real traffic
            log.warning("shadow call to %s for %s failed: %r", provider, message.notification_id, exc)
            kind, code, latency_s = "error", type(exc).__name__, time.perf_counter() - started
        SHADOW_SECONDS.labels(provider, message.channel).observe(latency_s)
        SHADOW_OUTCOMES.labels(provider, message.channel, kind).inc()
        if len(self.shadow_results) >= SHADOW_BUFFER_MAX:
            SHADOW_RESULTS_DROPPED.labels("buffer_full").inc()
            return
        try:
            self.shadow_results.append(ShadowResult(
                message.notification_id, message.channel, self.ctx.lane,
                side(primary.provider, message.channel, message.body, outcome=primary.kind,
                     code=primary.error_code or primary.reason, latency_s=primary.latency_s),
                side(provider, message.channel, message.body, outcome=kind, code=code, latency_s=latency_s)))
        except Exception:
            log.exception("shadow comparison of %s failed", message.notification_id)

    async def flush_shadow_results(self) -> None:
        """Write the buffered comparisons in one statement, in a task of its own: the batch loop never waits for it,
        and a slow or absent database only costs the comparisons (counted), never a send."""
        if not self.shadow_results or (self._shadow_flush is not None and not self._shadow_flush.done()):
            return
        rows, self.shadow_results = self.shadow_results, []
        self._shadow_flush = asyncio.create_task(self._write_shadow_results(rows))

    async def _write_shadow_results(self, rows: list[ShadowResult]) -> None:
        try:
            pool = await db.async_pool(self.settings)
            async with pool.connection(timeout=5) as conn:
                await conn.execute(SHADOW_RESULTS, shadow_columns(rows))
        except Exception as exc:
            SHADOW_RESULTS_DROPPED.labels("database").inc(len(rows))
            log.warning("writing %d shadow comparisons failed: %r; they are dropped", len(rows), exc)

    # ------------------------------------------------------------------------------------------- recording

    async def _record_surely(self, jobs: list[Job]) -> None:
        """Record the outcomes, retrying while the database is away. Nothing after the claim may fail the batch: a
        batch run again finds its rows claimed and would never record what was sent. If the database stays away,
        the rows stay `sending` and reconciliation asks the providers once their leases expire."""
        started = time.monotonic()
        pause = RETRY_PAUSE_S[0]
        mark = len(self.ctx.staged)
        while True:
            try:
                await self._record(jobs)
                return
            except Exception as exc:
                self.ctx.discard(mark)
                if not is_infrastructure(exc) or time.monotonic() - started > BATCH_RETRY_S:
                    log.exception("recording %d outcomes failed; reconciliation resolves them after their leases",
                                  len(jobs))
                    return
                self.ctx.errors("infrastructure").inc()
                log.warning("recording %d outcomes met %s: %s; retrying in %.2fs", len(jobs), type(exc).__name__,
                            exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_PAUSE_S[1])

    async def _record(self, jobs: list[Job]) -> None:
        now = utcnow()
        states: list[str] = []
        provider_names, provider_ids, codes, messages, due, tiers = [], [], [], [], [], []
        reduced: list[bytes | None] = []
        for job in jobs:
            final = job.accepted_by if job.state == "accepted" else job.last
            state: str = job.state
            if job.state == "retry_scheduled":
                job.retry = recovery.after_transient(job.tiers_used, self.delays, now,
                                                     [c.outcome.retry_after_s for c in job.calls],
                                                     job.task.get("expires_at"))
                state = {"retry": "retry_scheduled", "dead_letter": "dead_lettered", "expire": "expired"}[
                    job.retry.action]
                if job.plan is not None:  # a push that reached a device ends accepted when its retries end
                    state = push.after_retry_step(job.plan, job.retry.action)
            if job.plan is not None and job.plan.pending and job.plan.pending != job.listed:
                job.value = self.ctx.codec.encode(
                    serde.DELIVERY_TASK, push.with_devices(job.task, job.plan.pending), trusted=True)
            reduced.append(job.value)
            states.append(state)
            owner = job.accepted_by or final  # the provider that goes with the message id
            provider_names.append(owner.provider if owner and owner.provider != "none" else None)
            provider_ids.append(job.accepted_by.provider_message_id if job.accepted_by else None)
            code = None if state == "accepted" or final is None else final.error_code or final.reason
            codes.append("expired" if state == "expired" else code)
            messages.append(None if state == "accepted" or final is None else (final.error_message or "")[:1000])
            retrying = job.retry if job.retry is not None and job.retry.action == "retry" else None
            due.append(retrying.due if retrying else None)
            tiers.append(retrying.tier if retrying else job.tiers_used)
        calls = [(job, call) for job in jobs for call in job.calls]
        pool = await db.async_pool(self.settings)
        async with pool.connection() as conn, conn.transaction():
            await conn.execute(db.BY_KEY_PLANS)
            recorded = await (await conn.execute(RECORD, {
                "owner": self.owner, "ids": [j.key[0] for j in jobs], "channels": [j.key[1] for j in jobs],
                "states": states, "providers": provider_names, "provider_ids": provider_ids, "codes": codes,
                "messages": messages, "due": due, "tiers": tiers, "tasks": reduced,
                "reached": [j.plan is not None and j.accepted_by is not None for j in jobs]})).fetchall()
            done = {(nid, ch) for nid, ch in recorded}
            overtaken = [(j, pid) for j, pid in zip(jobs, provider_ids, strict=True)
                         if pid is not None and j.key not in done]
            if overtaken:
                recorded += await (await conn.execute(RECORD_OVERTAKEN, {
                    "ids": [j.key[0] for j, _ in overtaken], "channels": [j.key[1] for j, _ in overtaken],
                    "provider_ids": [pid for _, pid in overtaken]})).fetchall()
            if calls:
                await conn.execute(ATTEMPTS, {
                    "ids": [j.key[0] for j, _ in calls], "channels": [j.key[1] for j, _ in calls],
                    "attempt_nos": [j.attempt_no for j, _ in calls],
                    "providers": [c.outcome.provider for _, c in calls],
                    "outcomes": [c.outcome.kind for _, c in calls],
                    "statuses": [response_status(c.outcome) for _, c in calls],
                    "provider_ids": [c.outcome.provider_message_id for _, c in calls],
                    "codes": [c.outcome.error_code for _, c in calls],
                    "payloads": [Jsonb(json.loads(json.dumps(c.outcome.raw, default=str)))
                                 if c.outcome.raw is not None else None for _, c in calls],
                    "started": [c.started_at for _, c in calls], "finished": [c.finished_at for _, c in calls],
                    "latencies": [round(c.outcome.latency_s * 1000) for _, c in calls],
                    "platforms": [c.device.platform if c.device else None for _, c in calls],
                    "fingerprints": [c.device.fingerprint if c.device else None for _, c in calls]})
        mine = {(nid, ch) for nid, ch in recorded}
        counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        for _, call in calls:
            counts[call.outcome.provider][0] += 1
            counts[call.outcome.provider][1] += policy.counts_against_provider(call.outcome.kind, call.outcome.reason)
        latencies: dict[str, list[float]] = collections.defaultdict(list)
        for _, call in calls:
            latencies[call.outcome.provider].append(call.outcome.latency_s)
        await self.board.record({p: (c, f) for p, (c, f) in counts.items()}, latencies)
        for job, state, code, message in zip(jobs, states, codes, messages, strict=True):
            channel = job.key[1]
            if job.key not in mine:
                log.warning("%s: lease lost before the outcome %s was recorded; reconciliation decides", job.key,
                            state)
                continue
            self._deliveries(channel, state).inc()
            provider = job.accepted_by.provider if job.accepted_by else (job.last.provider if job.last else None)
            self.ctx.emit(job.task, state, channel=channel, provider=provider, attempt=job.attempt_no,
                          error_code=code, error_message=message, at=now)
            if job.retry is not None and state in ("retry_scheduled", "dead_lettered"):
                self._park(job, code or "", message or "")
            # when the user first has it: a push's first device to accept, even while other devices are pending
            reached = job.plan.first_acceptance if job.plan is not None else state == "accepted"
            if reached and job.task.get("created_at") is not None:
                self._send_latency(channel, job.task["type"]).observe(
                    max(0.0, (now - job.task["created_at"]).total_seconds()))


def build(ctx: StageContext) -> Stage:
    settings = ctx.settings
    board = BreakerBoard.from_url(settings.redis_dsn, policy.BreakerPolicy(
        failure_rate=settings.breaker_failure_rate, min_calls=settings.breaker_min_calls,
        window_s=settings.breaker_window_s, open_s=settings.breaker_open_s), prefix=settings.topic_prefix)
    sender = Sender(ctx, board)
    # every channel's send topic in one call: one claim and one record statement for the whole batch
    stage = Stage(ctx, {topics.send_topic(ch, ctx.lane): sender.handle for ch in CHANNELS},
                  batch_size=settings.sender_max_in_flight, closers=[sender.close])
    if sender.shadow_plan:  # shadow comparisons go to shadow_results once a second, one statement each time
        stage.every(SHADOW_FLUSH_S, f"flush-shadow-results-{ctx.lane}")(sender.flush_shadow_results)
    return stage
