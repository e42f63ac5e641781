"""Where the sender's deliveries end up: the statements that move each row to its outcome (suppressed, expired,
failed before a send; accepted, failed, retry_scheduled, unknown after one), the attempt log, the breakers'
windows, an event per transition, and a parked delivery's next retry tier or the DLQ."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from pipeline import metrics
from pipeline.kafka import serde, topics
from pipeline.policy import providers as policy
from pipeline.policy import push, recovery
from pipeline.policy.templates import TemplateError
from pipeline.stages import retry
from pipeline.stages.context import StageContext
from pipeline.stages.records import is_infrastructure, utcnow
from pipeline.stages.runtime import BATCH_RETRY_S, RETRY_PAUSE_S
from pipeline.stages.send_jobs import Job, response_status
from pipeline.state import db
from pipeline.state.breaker import BreakerBoard

log = logging.getLogger("notify.sender")

DELIVERIES = metrics.counter(
    "notify_sender_deliveries_total", "Deliveries the sender settled, by resulting state.",
    ["lane", "channel", "state"])
SEND_LATENCY = metrics.histogram(
    "notify_send_latency_seconds", "From a notification's creation to a provider accepting it.",
    ["lane", "channel", "type"], buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900))

EXPIRE = """
UPDATE deliveries d SET state = 'expired', last_error_code = 'expired', final_at = now(), next_attempt_at = NULL
FROM unnest(%(ids)s::uuid[], %(channels)s::text[]) AS k(notification_id, channel)
WHERE d.notification_id = k.notification_id AND d.channel = k.channel AND d.state IN ('queued', 'retry_scheduled')
RETURNING d.notification_id::text, d.channel
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
# After a COMMIT whose answer was lost (the connection broke while PostgreSQL committed) the recording transaction
# did happen: which of the batch's rows it moved, read back. A row is the transaction's when it holds this attempt
# in the outcome recorded for it, or, for an acceptance, when the provider's receipt has moved it on since.
RECORDED_BY_LOST_COMMIT = """
SELECT d.notification_id::text, d.channel
FROM deliveries d
JOIN unnest(%(ids)s::uuid[], %(channels)s::text[], %(states)s::text[], %(attempt_nos)s::int[],
            %(provider_ids)s::text[]) AS k(notification_id, channel, state, attempt_no, provider_message_id)
  ON d.notification_id = k.notification_id AND d.channel = k.channel
WHERE d.attempt_count = k.attempt_no AND d.lease_owner IS NULL
  AND (d.state = k.state OR (k.state = 'accepted' AND d.state IN ('delivered', 'failed')
                             AND d.provider_message_id = k.provider_message_id))
"""
# The recording transaction's id, asked for first thing (and the planner settings of db.BY_KEY_PLANS): with it,
# a retry after a lost COMMIT answer asks pg_xact_status whether the first try committed, instead of guessing.
BEGIN_RECORDING = "SELECT pg_current_xact_id()::text; " + db.BY_KEY_PLANS
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


class OutcomeRecorder:
    """Records what became of a lane's deliveries, for the Sender that claimed (or would have claimed) them."""

    def __init__(self, ctx: StageContext, board: BreakerBoard, owner: str) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.board = board
        self.owner = owner  # the sender's lease owner: only rows it still holds are recorded
        self._deliveries = metrics.Children(DELIVERIES, ctx.lane)
        self._send_latency = metrics.Children(SEND_LATENCY, ctx.lane)
        self.tiers = retry.tiers(ctx.settings, ctx.lane)
        self.delays = [delay for _, delay in self.tiers]
        self._pending_xid: str | None = None  # the recording transaction of the last try, until it is known

    async def settle_unsent(self, conn: Any, tasks: Mapping[tuple[str, str], dict[str, Any]],
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

    # ------------------------------------------------------------------------------------------- recording

    async def record_surely(self, jobs: list[Job]) -> None:
        """Record the outcomes, retrying while the database is away. Nothing after the claim may fail the batch: a
        batch run again finds its rows claimed and would never record what was sent. If the database stays away,
        the rows stay `sending` and reconciliation asks the providers once their leases expire."""
        started = time.monotonic()
        pause = RETRY_PAUSE_S[0]
        mark = len(self.ctx.staged)
        self._pending_xid = None
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
        if await self._last_try_committed(pool):
            async with pool.connection() as conn:
                recorded = await (await conn.execute(RECORDED_BY_LOST_COMMIT, {
                    "ids": [j.key[0] for j in jobs], "channels": [j.key[1] for j in jobs], "states": states,
                    "attempt_nos": [j.attempt_no for j in jobs], "provider_ids": provider_ids})).fetchall()
            log.warning("the database committed %d outcomes (attempts included) but its answer was lost: %d rows "
                        "read back", len(jobs), len(recorded))
        else:
            recorded = await self._write(pool, jobs, calls, states, provider_names, provider_ids, codes, messages,
                                         due, tiers, reduced)
        self._after(jobs, recorded, states, codes, messages, now)
        await self._record_breakers(calls)

    async def _last_try_committed(self, pool: Any) -> bool:
        """Whether the previous try of this batch's recording committed although it raised (a lost COMMIT answer):
        pg_xact_status of its transaction, waited for while PostgreSQL still finishes it."""
        xid, self._pending_xid = self._pending_xid, None
        if xid is None:
            return False
        for _ in range(50):
            async with pool.connection() as conn:
                row = await (await conn.execute("SELECT pg_xact_status(%s::xid8)", (xid,))).fetchone()
            if row is None or row[0] != "in progress":
                return row is not None and row[0] == "committed"
            await asyncio.sleep(0.1)
        self._pending_xid = xid  # still unknown: ask again on the next try
        raise psycopg.OperationalError(f"transaction {xid} still in progress after 5 s")  # retried as the rest

    async def _write(self, pool: Any, jobs: list[Job], calls: list[tuple[Job, Any]], states: list[str],
                     provider_names: list[str | None], provider_ids: list[str | None], codes: list[str | None],
                     messages: list[str | None], due: list[Any], tiers: list[int], reduced: list[bytes | None]
                     ) -> list[tuple[str, str]]:
        """The recording transaction: the rows still held move to their outcome, the attempts go to the log."""
        async with pool.connection() as conn, conn.transaction():
            begun = await (await conn.execute(BEGIN_RECORDING)).fetchone()
            self._pending_xid = str(begun[0]) if begun else None
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
        return [(str(nid), str(ch)) for nid, ch in recorded]

    async def _record_breakers(self, calls: list[tuple[Job, Any]]) -> None:
        counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        latencies: dict[str, list[float]] = collections.defaultdict(list)
        for _, call in calls:
            counts[call.outcome.provider][0] += 1
            counts[call.outcome.provider][1] += policy.counts_against_provider(call.outcome.kind, call.outcome.reason)
            latencies[call.outcome.provider].append(call.outcome.latency_s)
        await self.board.record({p: (c, f) for p, (c, f) in counts.items()}, latencies)

    def _after(self, jobs: list[Job], recorded: list[tuple[str, str]], states: list[str], codes: list[str | None],
               messages: list[str | None], now: Any) -> None:
        """For each row the recording moved: its event, its retry tier or DLQ record, its metrics."""
        mine = set(recorded)
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
