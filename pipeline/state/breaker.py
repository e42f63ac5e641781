"""Circuit breakers per provider, shared by every worker through Redis.

The decisions are pipeline/policy/providers.py's (`breaker_state`, `breaker_after_call`); this module keeps their
inputs where every sender worker sees them:

    <prefix>notify:breaker:<provider>           hash: state (closed|open), opened_at, closed_at (epoch seconds)
    <prefix>notify:breaker:<provider>:<second>  hash: calls, failures of that second (expires after the window)
    <prefix>notify:breaker:<provider>:probe     the half-open probe's token (SET NX with a TTL)
    <prefix>notify:latency:<provider>           list: the latest LATENCY_SAMPLE call latencies (s), newest first

The latency list is the deadline-aware routing's shared view: every worker's calls go into it, so a provider
that turned slow for one worker is slow for all of them at once, and a worker that just started (no calls of its
own yet) already knows which provider cannot make an OTP's deadline.

A worker reads the board once per batch (one round trip for all providers), and writes its batch's call counts
in one pipeline. When the window's failure rate crosses the threshold, the breaker opens for everyone. After the
open time, exactly one worker wins the probe token (SET NX) and may send one message to the provider; its
result closes the breaker (counting starts afresh: older failures no longer count) or opens it again.

Redis down: every breaker reads as closed. Traffic then goes to the primary as if there were no breaker, which
is the behaviour without one; sends are never stopped because the breaker's store is unavailable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pipeline import metrics
from pipeline.policy.providers import Breaker, BreakerPolicy, BreakerState, breaker_after_call, breaker_state, p95
from pipeline.state import redis_client

log = logging.getLogger("notify.breaker")

BREAKER_STATE = metrics.gauge(
    "notify_breaker_state", "Circuit breaker of a provider as this worker last saw it: 0 closed, 1 half-open, "
    "2 open.", ["provider"])
BREAKER_TRANSITIONS = metrics.counter(
    "notify_breaker_transitions_total", "Breaker state changes this worker made, by new state.", ["provider", "to"])
BREAKER_STORE_ERRORS = metrics.counter(
    "notify_breaker_store_errors_total", "Breaker reads or writes that failed because Redis was unavailable.")
STATE_VALUE: Final[Mapping[BreakerState, int]] = {"closed": 0, "half_open": 1, "open": 2}
SOCKET_TIMEOUT_S: Final = 0.2
PROBE_TTL_S: Final = 30  # a probe whose worker died frees the token after this
LATENCY_SAMPLE: Final = 200  # latencies kept per provider, across workers
LATENCY_TTL_S: Final = 3600  # a provider nobody called for an hour has no recent latency


@dataclass(frozen=True)
class BoardView:
    """What a batch reads once: every provider's breaker, and the p95 of its shared recent latencies (absent where
    no worker called it lately, or Redis could not be read)."""

    states: dict[str, BreakerState]
    p95_s: dict[str, float]


class BreakerBoard:
    def __init__(self, client: aioredis.Redis, policy: BreakerPolicy, *, prefix: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.policy = policy
        self.prefix = prefix
        self.clock = clock

    @classmethod
    def from_url(cls, url: str, policy: BreakerPolicy, *, prefix: str = "",
                 clock: Callable[[], float] = time.time) -> BreakerBoard:
        client = redis_client.async_client(url, socket_timeout_s=SOCKET_TIMEOUT_S, decode_responses=True)
        return cls(client, policy, prefix=prefix, clock=clock)

    def _key(self, provider: str, suffix: str = "") -> str:
        return f"{self.prefix}notify:breaker:{provider}{':' + suffix if suffix else ''}"

    def _latency_key(self, provider: str) -> str:
        return f"{self.prefix}notify:latency:{provider}"

    async def states(self, providers: Iterable[str]) -> dict[str, BreakerState]:
        """Every provider's breaker now; `half_open` only for the one worker that won the probe token."""
        return (await self.read(providers)).states

    async def read(self, providers: Iterable[str]) -> BoardView:
        """Breakers and shared latencies of `providers`, in one round trip."""
        names = list(providers)
        now = self.clock()
        seconds = [int(now) - i for i in range(self.policy.window_s)]
        try:
            pipe = self.client.pipeline(transaction=False)
            for provider in names:
                pipe.hgetall(self._key(provider))
                for second in seconds:
                    pipe.hmget(self._key(provider, str(second)), "calls", "failures")
            for provider in names:
                pipe.lrange(self._latency_key(provider), 0, LATENCY_SAMPLE - 1)
            answers = await pipe.execute()
        except (RedisError, OSError) as exc:
            BREAKER_STORE_ERRORS.inc()
            log.warning("breaker store unavailable (%s): every breaker reads as closed", exc)
            return BoardView({p: "closed" for p in names}, {})
        out: dict[str, BreakerState] = {}
        step = 1 + len(seconds)
        shared = answers[len(names) * step:]
        latencies = {p: [float(v) for v in sample] for p, sample in zip(names, shared, strict=True) if sample}
        for index, provider in enumerate(names):
            stored, *buckets = answers[index * step:(index + 1) * step]
            closed_at = float(stored.get("closed_at", 0))
            calls = failures = 0
            for second, (c, f) in zip(seconds, buckets, strict=True):
                if second >= int(closed_at):  # counting starts afresh when a probe closes the breaker
                    calls += int(c or 0)
                    failures += int(f or 0)
            before = Breaker("open", float(stored["opened_at"])) if stored.get("state") == "open" else Breaker(
                "closed")
            after = breaker_state(before, calls, failures, now, self.policy)
            out[provider] = await self._settle(provider, before, after, now)
            BREAKER_STATE.labels(provider).set(STATE_VALUE[out[provider]])
        return BoardView(out, {p: p95(sample) for p, sample in latencies.items()})

    async def _settle(self, provider: str, before: Breaker, after: Breaker, now: float) -> BreakerState:
        try:
            if before.state == "closed" and after.state == "open":
                await self.client.hset(self._key(provider), mapping={"state": "open", "opened_at": str(now)})
                BREAKER_TRANSITIONS.labels(provider, "open").inc()
                log.warning("breaker of %s opened", provider)
                return "open"
            if after.state == "half_open":
                won = await self.client.set(self._key(provider, "probe"), str(now), nx=True, ex=PROBE_TTL_S)
                return "half_open" if won else "open"
        except (RedisError, OSError):
            BREAKER_STORE_ERRORS.inc()
        return after.state

    async def record(self, calls: Mapping[str, tuple[int, int]],
                     latencies_s: Mapping[str, Sequence[float]] | None = None) -> None:
        """Add (calls, failures) per provider to the current second's bucket, and the calls' latencies to the
        providers' shared samples."""
        if not calls and not latencies_s:
            return
        second = int(self.clock())
        try:
            pipe = self.client.pipeline(transaction=False)
            for provider, (count, failed) in calls.items():
                key = self._key(provider, str(second))
                pipe.hincrby(key, "calls", count)
                if failed:
                    pipe.hincrby(key, "failures", failed)
                pipe.expire(key, self.policy.window_s + 5)
            for provider, sample in (latencies_s or {}).items():
                if sample:
                    key = self._latency_key(provider)
                    pipe.lpush(key, *(f"{s:.4f}" for s in sample[-LATENCY_SAMPLE:]))
                    pipe.ltrim(key, 0, LATENCY_SAMPLE - 1)
                    pipe.expire(key, LATENCY_TTL_S)
            await pipe.execute()
        except (RedisError, OSError):
            BREAKER_STORE_ERRORS.inc()

    async def probe_done(self, provider: str, succeeded: bool) -> None:
        """The half-open probe's result: close the breaker (counting afresh) or open it again."""
        now = self.clock()
        after = breaker_after_call(Breaker("half_open"), succeeded, now)
        field = "closed_at" if after.state == "closed" else "opened_at"
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(self._key(provider), mapping={"state": after.state, field: str(now)})
            pipe.delete(self._key(provider, "probe"))
            await pipe.execute()
        except (RedisError, OSError):
            BREAKER_STORE_ERRORS.inc()
            return
        BREAKER_TRANSITIONS.labels(provider, after.state).inc()
        log.warning("breaker of %s %s after its probe", provider, "closed" if succeeded else "re-opened")

    async def release_probes(self, providers: Iterable[str]) -> None:
        """Give back probe tokens this worker won but did not use (its batch had nothing for that provider)."""
        names = list(providers)
        if not names:
            return
        try:
            await self.client.delete(*(self._key(p, "probe") for p in names))
        except (RedisError, OSError):
            BREAKER_STORE_ERRORS.inc()

    async def stored(self, provider: str) -> str:
        """The stored state (closed or open), read without side effects (unlike `states`, which may probe)."""
        state = await self.client.hget(self._key(provider), "state")
        return str(state or "closed")

    async def reset(self, providers: Iterable[str]) -> None:
        """Close every breaker of `providers`, forgetting the calls so far (tests, and ops after a provider fix)."""
        now = str(self.clock())
        pipe = self.client.pipeline(transaction=True)
        for provider in providers:
            pipe.hset(self._key(provider), mapping={"state": "closed", "closed_at": now})
            pipe.delete(self._key(provider, "probe"))
        await pipe.execute()

    async def aclose(self) -> None:
        await self.client.aclose()
