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
   pipeline adds the calls to the breakers' windows, and an event goes out per transition
   (pipeline/stages/send_outcomes.py, which also settles the rows of step 1 that are not sent).

A share of the sends is mirrored to the channel's candidate provider in its test mode, never delivered
(pipeline/stages/shadow_traffic.py).

A crash between claim and record leaves rows `sending` under an expired lease: reconciliation asks the provider,
the sender never re-sends them. The batch's offsets are committed only after all of this (StageRunner).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from connectors.base import Connector, Message, Outcome
from connectors.factory import create_connector
from pipeline import metrics
from pipeline.domain import CHANNELS
from pipeline.kafka import serde, topics
from pipeline.policy import cost, latest, push
from pipeline.policy import providers as policy
from pipeline.policy.preferences import CONSENT_REQUIRED, consent_refusal
from pipeline.policy.regions import NO_PHONE, CountryLabels
from pipeline.policy.templates import Rendered, TemplateError, render
from pipeline.stages.context import StageContext
from pipeline.stages.records import Record, utcnow
from pipeline.stages.runtime import Stage
from pipeline.stages.send_jobs import Call, Job, messages_of
from pipeline.stages.send_outcomes import OutcomeRecorder
from pipeline.stages.shadow_traffic import SHADOW_FLUSH_S, ShadowTraffic
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
COST = metrics.counter(
    "notify_provider_cost_usd_total", "What accepted messages cost, in USD, from NOTIFY_PROVIDER_PRICES_USD (SMS per "
    "segment).", ["provider", "channel"])
SKIPPED = metrics.counter(
    "notify_sender_skipped_total", "Tasks not sent because their row was not claimable.", ["lane"])

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
        self.shadow = ShadowTraffic(ctx.settings, ctx.lane, self.connector)
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
        self._provider_in_flight = metrics.Children(PROVIDER_IN_FLIGHT)
        self._provider_seconds = metrics.Children(PROVIDER_SECONDS)
        self._provider_outcomes = metrics.Children(PROVIDER_OUTCOMES)
        self._cost = metrics.Children(COST)
        self.recorder = OutcomeRecorder(ctx, board, self.owner)
        # every provider a route can name: their breakers are read once per batch
        self.providers = ({p for ch in CHANNELS for p in self.routing.default[ch]}
                          | {p for _, order in ctx.settings.routing_overrides for p in order})

    def connector(self, provider: str) -> Connector:
        if provider not in self.connectors:
            self.connectors[provider] = create_connector(provider, self.settings)
        return self.connectors[provider]

    async def close(self) -> None:
        await self.shadow.close()
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
            gone = await self.recorder.settle_unsent(conn, tasks, expired, unsendable, suppress)
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
            await self.recorder.record_surely(jobs)
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
            self.shadow.mirror(outcome, message)
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


def build(ctx: StageContext) -> Stage:
    settings = ctx.settings
    board = BreakerBoard.from_url(settings.redis_dsn, policy.BreakerPolicy(
        failure_rate=settings.breaker_failure_rate, min_calls=settings.breaker_min_calls,
        window_s=settings.breaker_window_s, open_s=settings.breaker_open_s), prefix=settings.topic_prefix)
    sender = Sender(ctx, board)
    # every channel's send topic in one call: one claim and one record statement for the whole batch
    stage = Stage(ctx, {topics.send_topic(ch, ctx.lane): sender.handle for ch in CHANNELS},
                  batch_size=settings.sender_max_in_flight, closers=[sender.close])
    if sender.shadow.plan:  # shadow comparisons go to shadow_results once a second, one statement each time
        stage.every(SHADOW_FLUSH_S, f"flush-shadow-results-{ctx.lane}")(sender.shadow.flush)
    return stage
