"""Shadow traffic: a share of a channel's sends mirrored to its candidate provider in test mode (never delivered),
each primary and shadow answer compared, and the comparisons buffered and flushed to `shadow_results`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from connectors.base import Connector, Message, Outcome
from pipeline import metrics
from pipeline.config import Settings
from pipeline.domain import Lane
from pipeline.policy.shadow import ShadowResult, is_mirrored, shadow_columns, side
from pipeline.state import db

log = logging.getLogger("notify.sender")

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


class ShadowTraffic:
    """The sender's shadow calls of one lane, and their comparisons until they are written."""

    def __init__(self, settings: Settings, lane: Lane, connector: Callable[[str], Connector]) -> None:
        self.settings = settings
        self.lane = lane
        self.connector = connector  # the sender's: provider -> its connector
        self.tasks: set[asyncio.Task[None]] = set()
        self.plan = dict(settings.shadow)  # channel -> (candidate provider, share)
        self.results: list[ShadowResult] = []  # written by flush, off the batch's path
        self._flush: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)
        for _ in range(2):  # a flush already under way, then what is left
            if self._flush is not None:
                await asyncio.wait([self._flush], timeout=5)
            await self.flush()

    def mirror(self, primary: Outcome, message: Message) -> None:
        """Mirror a share of the channel's sends to the candidate provider in its test mode (never delivered). The
        share is drawn from the notification id, so a notification is mirrored on every call or on none."""
        plan = self.plan.get(message.channel)
        if plan is None or plan[0] == primary.provider or not is_mirrored(message.notification_id, plan[1]):
            return
        if len(self.tasks) >= SHADOW_MAX_IN_FLIGHT:
            SHADOW_OUTCOMES.labels(plan[0], message.channel, "skipped").inc()
            return
        task = asyncio.create_task(self._shadow(plan[0], replace(message, test_mode=True), primary))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

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
        if len(self.results) >= SHADOW_BUFFER_MAX:
            SHADOW_RESULTS_DROPPED.labels("buffer_full").inc()
            return
        try:
            self.results.append(ShadowResult(
                message.notification_id, message.channel, self.lane,
                side(primary.provider, message.channel, message.body, outcome=primary.kind,
                     code=primary.error_code or primary.reason, latency_s=primary.latency_s),
                side(provider, message.channel, message.body, outcome=kind, code=code, latency_s=latency_s)))
        except Exception:
            log.exception("shadow comparison of %s failed", message.notification_id)

    async def flush(self) -> None:
        """Write the buffered comparisons in one statement, in a task of its own: the batch loop never waits for it,
        and a slow or absent database only costs the comparisons (counted), never a send."""
        if not self.results or (self._flush is not None and not self._flush.done()):
            return
        rows, self.results = self.results, []
        self._flush = asyncio.create_task(self._write(rows))

    async def _write(self, rows: list[ShadowResult]) -> None:
        try:
            pool = await db.async_pool(self.settings)
            async with pool.connection(timeout=5) as conn:
                await conn.execute(SHADOW_RESULTS, shadow_columns(rows))
        except Exception as exc:
            SHADOW_RESULTS_DROPPED.labels("database").inc(len(rows))
            log.warning("writing %d shadow comparisons failed: %r; they are dropped", len(rows), exc)
