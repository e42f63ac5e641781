"""Reconciliation: find deliveries stuck after their send, ask the provider, resolve them.

Stuck means (thresholds in config):
- `sending` past its lease: the worker died mid-send; whether the provider got it is unknown;
- `unknown`: the provider's answer was ambiguous (a timeout after the request left);
- `accepted` without a receipt for too long;
- `retry_scheduled` long past due, or `queued` long untouched: the record that should re-drive it was lost.

A row with a provider message id is asked about by id (`status`); one without is looked up by our reference at
every provider of its channel (`find`: recipient, content, time). `recovery.reconcile` turns the answer into
an action; only "no provider has it" re-sends (or a push, which has no status API and collapses by notification
id). A row the provider holds is never sent again.

Why a loop in the worker set rather than an external scheduler: it runs wherever the workers run with nothing
else to deploy, and a PostgreSQL advisory lock elects the one worker that sweeps each round (the lock lives in
the database whose rows are swept, so there is no second system to agree with). `notify reconcile --once` runs
one round by hand (or from cron) under the same lock.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from connectors.base import Connector, DeliveryStatus, Found, ProviderQueryError
from connectors.factory import create_connector
from pipeline import metrics
from pipeline.config import Settings
from pipeline.kafka import clients, serde, topics
from pipeline.ops.prune import RetentionSchedule
from pipeline.policy import providers as routing
from pipeline.policy import recovery
from pipeline.policy.templates import TemplateError, render
from pipeline.stages import retry
from pipeline.stages.context import ERRORS, StageContext
from pipeline.stages.send_jobs import messages_of
from pipeline.state import db, deliveries

log = logging.getLogger("notify.reconcile")

LOST_AT_PROVIDER = "lost_at_provider"  # the DLQ reason of an accepted row its provider no longer knows
LOCK_KEY = 0x6E6F7469667972  # pg advisory lock id of the reconciler ("notifyr")
SWEEP_PAGE = 500  # rows read and resolved at a time: a page's provider lookups run concurrently
SWEEP_PAGES = 40  # pages per state and round (20,000 rows): a round stays bounded however much is stuck
# A lookup by reference matches recipient and content between the claim and the end of the lease (or the recorded
# `unknown`), widened by the providers' one-second grain and clock skew: wide enough to find ours, narrow enough
# not to take a neighbouring identical message for it.
LOOKBACK = datetime.timedelta(seconds=2)

RESOLVED = metrics.counter("notify_reconcile_resolved_total", "Stuck deliveries the reconciler resolved, by action.",
                   ["stuck", "action"])
ROUND_SECONDS = metrics.histogram("notify_reconcile_round_seconds", "Duration of one reconciliation round.",
                          buckets=(0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120))

STATES = (
    ("sending", "d.state = 'sending' AND d.lease_expires_at < now() - make_interval(secs => %(grace)s)"),
    ("unknown", "d.state = 'unknown' AND d.updated_at < now() - make_interval(secs => %(unknown)s)"),
    ("accepted", "d.state = 'accepted' AND d.accepted_at < now() - make_interval(secs => %(receipt)s)"),
    ("retry_scheduled",
     "d.state = 'retry_scheduled' AND d.next_attempt_at < now() - make_interval(secs => %(overdue)s)"),
    ("queued", "d.state = 'queued' AND d.next_attempt_at IS NULL "
               "AND d.updated_at < now() - make_interval(secs => %(overdue)s)"),
)


@dataclass
class Summary:
    elected: bool = True
    actions: collections.Counter[str] = field(default_factory=collections.Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"elected": self.elected, "resolved": dict(sorted(self.actions.items()))}


def _answer(status: DeliveryStatus) -> recovery.LookupAnswer:
    return {"delivered": "delivered", "failed": "failed", "pending": "pending"}.get(status.state, "not_found")  # type: ignore[return-value]


class Reconciler:
    def __init__(self, ctx: StageContext, *, connectors: Mapping[str, Connector] | None = None,
                 only: Sequence[str] | None = None) -> None:
        self.ctx = ctx
        self.only = list(only) if only is not None else None  # these notification ids only (ops, tests)
        self.settings = ctx.settings
        self.routing = routing.routing_table(ctx.settings.routing_overrides)
        self.connectors: dict[str, Connector] = dict(connectors or {})
        self._stopping = asyncio.Event()
        self.taken: set[str] = set()  # provider ids this round matched to a row (before it is written)

    def connector(self, provider: str) -> Connector:
        if provider not in self.connectors:
            self.connectors[provider] = create_connector(provider, self.settings)
        return self.connectors[provider]

    async def close(self) -> None:
        for made in self.connectors.values():
            await made.close()

    # ------------------------------------------------------------------------------------------- one round

    async def round(self) -> Summary:
        """One sweep, if this process wins the advisory lock (else `elected` is False and nothing is done)."""
        pool = await db.async_pool(self.settings)
        async with pool.connection() as lock_conn:
            won = (await (await lock_conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,))).fetchone())
            if not won or not won[0]:
                return Summary(elected=False)
            try:
                with ROUND_SECONDS.time():
                    return await self._sweep(pool)
            finally:
                await lock_conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))

    async def _sweep(self, pool: Any) -> Summary:
        summary = Summary()
        done: set[tuple[str, str]] = set()
        self.taken = set()
        params: dict[str, Any] = {
            "grace": self.settings.reconcile_lease_grace_s, "unknown": self.settings.reconcile_unknown_after_s,
            "receipt": self.settings.reconcile_receipt_timeout_s, "overdue": self.settings.reconcile_retry_overdue_s}
        if self.only is not None:
            params["only"] = self.only
        for stuck, where in STATES:
            if self.only is not None:
                where = f"{where} AND d.notification_id = ANY(%(only)s::uuid[])"
            # Pages in (updated_at, id, channel) order, each after the last one read: a row left as it was (its
            # provider could not be asked) never holds back the rows behind it, and a row this round moved is
            # out of its stuck state (or of the page order) and is not read again.
            after: dict[str, Any] = {}
            for _page in range(SWEEP_PAGES):
                keyset = (" AND (d.updated_at, d.notification_id, d.channel) > "
                          "(%(after_at)s, %(after_id)s::uuid, %(after_channel)s)") if after else ""
                async with pool.connection() as conn:
                    page = await deliveries.fetch(
                        conn, f"{where}{keyset} ORDER BY d.updated_at, d.notification_id, d.channel "
                              f"LIMIT {SWEEP_PAGE}", {**params, **after})
                rows = [r for r in page if (r.notification_id, r.channel) not in done]  # once per round
                done.update((r.notification_id, r.channel) for r in rows)
                results = await asyncio.gather(*(self._resolve(pool, stuck, row) for row in rows))
                for action in results:
                    summary.actions[f"{stuck}:{action}"] += 1
                await self.ctx.settle()
                if len(page) < SWEEP_PAGE:
                    break
                last = page[-1]
                after = {"after_at": last.updated_at, "after_id": last.notification_id, "after_channel": last.channel}
        return summary

    async def _resolve(self, pool: Any, stuck: str, row: deliveries.DeliveryRow) -> str:
        try:
            found, answer = await self._ask(stuck, row)
        except Exception:  # one row's trouble must not stop the round
            log.exception("reconciling %s/%s failed", row.notification_id, row.channel)
            return "error"
        step = recovery.reconcile(stuck, answer, row.channel)  # type: ignore[arg-type]  # STATES names Stuck
        if step.action == "resend" and row.task is None:
            step = recovery.ReconcileStep("leave", "no stored task to re-send (written before tasks were kept)")
        action = await self._apply(pool, stuck, row, step, found)
        RESOLVED.labels(stuck, action).inc()
        return action

    async def _ask(self, stuck: str, row: deliveries.DeliveryRow
                   ) -> tuple[tuple[str, str] | None, recovery.LookupAnswer]:
        """What the providers say: (provider, message id) when one holds it, and the answer."""
        if stuck in ("retry_scheduled", "queued"):
            return None, "cannot_tell"
        if row.provider is not None and row.provider_message_id is not None:
            try:
                status = await self.connector(row.provider).status(row.provider_message_id)
            except ProviderQueryError as exc:
                log.info("%s: %s", row.notification_id, exc)
                return None, "cannot_tell"
            return (row.provider, row.provider_message_id), _answer(status)
        if row.task is None:
            return None, "cannot_tell"
        return await self._find(row, stuck)

    async def _find(self, row: deliveries.DeliveryRow, stuck: str
                    ) -> tuple[tuple[str, str] | None, recovery.LookupAnswer]:
        task = self.ctx.codec.decode(row.task or b"", expected=serde.DELIVERY_TASK).value
        try:
            messages = messages_of(task, render(task))
        except TemplateError:
            return None, "cannot_tell"
        since = (row.claimed_at or row.updated_at) - LOOKBACK
        # our send left while the claim was held: before the lease ran out, or before `unknown` was recorded
        until = (row.lease_expires_at if stuck == "sending" and row.lease_expires_at else row.updated_at) + LOOKBACK
        order = self.routing.order(row.channel, row.lane, task.get("address") if row.channel == "sms" else None)
        unsure = False
        for message, _platform in messages[:1]:  # push (several devices) cannot be looked up anyway
            for provider in order:
                try:
                    found = await self.connector(provider).find(message, since, until)
                except ProviderQueryError as exc:
                    log.info("%s at %s: %s", row.notification_id, provider, exc)
                    unsure = True
                    continue
                mine = await self._unclaimed(provider, found)
                if mine is not None:
                    return (provider, mine.provider_message_id), _answer(mine.status)
        return None, "cannot_tell" if unsure or not messages else "not_found"

    async def _unclaimed(self, provider: str, found: Sequence[Found]) -> Found | None:
        """The newest candidate no other delivery holds: a content match (Twilio, Termii) can be another
        notification's identical message to the same recipient, which must not be taken for ours."""
        if not found:
            return None
        pool = await db.async_pool(self.settings)
        async with pool.connection() as conn:
            rows = await (await conn.execute(
                "SELECT provider_message_id FROM deliveries WHERE provider = %s AND provider_message_id = ANY(%s)",
                (provider, [f.provider_message_id for f in found]))).fetchall()
        held = {r[0] for r in rows} | self.taken
        for candidate in found:
            if candidate.provider_message_id not in held:
                self.taken.add(candidate.provider_message_id)  # this round's other lookups skip it too
                return candidate
        return None

    async def _apply(self, pool: Any, stuck: str, row: deliveries.DeliveryRow, step: recovery.ReconcileStep,
                     found: tuple[str, str] | None) -> str:
        provider, message_id = found if found is not None else (None, None)
        state: str = step.action
        fallback_from = None
        if step.action == "leave":
            return "leave"
        if step.action == "failed" and stuck == "accepted" and row.task is not None:
            order = deliveries.provider_order(self.routing, self.ctx.codec, row)
            fallback = recovery.next_provider(order, row.provider or "", row.fallback_from)
            if fallback is not None:
                state, fallback_from = "queued", row.provider
        if step.action == "resend":
            state = "queued" if stuck == "queued" else "retry_scheduled"
        if step.action == "dead_letter":
            state = "dead_lettered"
        try:
            async with pool.connection() as conn:
                moved = await deliveries.transition(
                    conn, row, state, provider=provider, provider_message_id=message_id,
                    code=f"reconciled:{stuck}", message=step.reason, fallback_from=fallback_from,
                    clear_provider=fallback_from is not None)
        except psycopg.errors.UniqueViolation:  # a live send recorded that message id first: it is theirs
            return "raced"
        if not moved:
            return "raced"
        if state in ("queued", "retry_scheduled"):
            deliveries.reinject(self.ctx, row)
        if state == "dead_lettered" and row.task is not None:
            self._dead_letter(row, step.reason)
        self.ctx.emit(row.subject, state, channel=row.channel, provider=provider or row.provider, lane=row.lane,
                            attempt=row.attempt_count, error_code=f"reconciled:{stuck}", error_message=step.reason)
        return "fallback" if fallback_from else step.action

    def _dead_letter(self, row: deliveries.DeliveryRow, reason: str) -> None:
        """The row's task to the DLQ, as the sender parks one, so `notify dlq redrive` can send it again."""
        send_topic = topics.send_topic(row.channel, row.lane)
        base = retry.delivery_headers(row.notification_id, row.channel, row.lane, send_topic, [])
        self.ctx.send(topics.DLQ, row.user_id, row.task,
                      retry.dead_letter_headers(base, LOST_AT_PROVIDER, reason, "reconcile"))
        retry.DEAD_LETTERED.labels(row.lane, row.channel, LOST_AT_PROVIDER).inc()

    # ------------------------------------------------------------------------------------------- the loop

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """A round every NOTIFY_RECONCILE_INTERVAL_S until stop(), the first one soon after start; and the retention
        sweep when it is due (NOTIFY_PRUNE_INTERVAL_S), in the same process since both are elected per database."""
        schedule = RetentionSchedule(self.settings)
        try:
            while not self._stopping.is_set():
                try:
                    summary = await self.round()
                    if summary.actions:
                        log.warning("reconciliation round: %s", summary.as_dict())
                except Exception:  # the database may be down: the next round tries again
                    ERRORS.labels(self.ctx.stage, "", "round").inc()
                    log.exception("reconciliation round failed")
                try:
                    await schedule.maybe_sweep()
                except Exception:  # likewise: the next interval tries again
                    ERRORS.labels(self.ctx.stage, "", "retention").inc()
                    log.exception("retention sweep failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=self.settings.reconcile_interval_s)
        finally:
            await self.ctx.settle()
            await self.close()


def reconciler(settings: Settings, only: Sequence[str] | None = None) -> Reconciler:
    return Reconciler(StageContext(settings=settings, stage="reconcile", lane="critical",
                                   producer=clients.producer(settings)), only=only)


async def reconcile_once(settings: Settings, only: Sequence[str] | None = None) -> Summary:
    """One round (`notify reconcile --once [--notification ID ...]`)."""
    made = reconciler(settings, only)
    try:
        return await made.round()
    finally:
        await made.ctx.settle()
        await made.close()
        await db.close_async_pools()

