"""The rate-limit stage's decision: per-user sliding windows in Redis, all of a delivery's rules in one Lua call.

Each rule a delivery matches (pipeline/policy/ratelimit.py) is a sorted set per user: members are deliveries
(`<notification id>:<channel>`), scores the millisecond time they were admitted. One atomic script, for all keys:
trim entries older than the window; if this delivery is already in every window it was admitted before (a replay
or redelivery) and is allowed again without being counted twice; otherwise, if any window is full the delivery is
limited, naming the first full rule in policy order and when its oldest entry leaves the window; otherwise the
delivery is added to every window, and each key expires with its window.

Redis unreachable (connection refused, timeout, loading, read-only replica) — the decision:
- critical lane: "allowed" with `degraded=True`. A rate-limiter outage must never stop an OTP, a debit alert or a
  security notice; the stage counts degraded decisions in a metric so the outage is seen.
- bulk lane: "unavailable". The stage defers the delivery to a retry tier: marketing waits rather than risking a
  flood the limiter can no longer see.
Socket timeouts are short (200 ms) with one immediate reconnect and an overall deadline, so a dead or stalled
Redis costs a message well under a second and never stalls the stream. Other Redis errors (a bug such as WRONGTYPE)
propagate.

A delivery that matches no rule (e.g. a transaction alert) is allowed without asking Redis.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pipeline.domain import Lane
from pipeline.policy.ratelimit import RatePolicy, Rule, load_policy, rules_for
from pipeline.state import redis_client

log = logging.getLogger(__name__)

Outcome = Literal["allowed", "limited", "unavailable"]

SOCKET_TIMEOUT_S: Final[float] = redis_client.SOCKET_TIMEOUT_S
# Upper bound on one check whatever the socket layer does: connect + one retry, each within the socket timeout.
CHECK_DEADLINE_S: Final[float] = 0.6
BATCH_DEADLINE_PER_CHECK_S: Final[float] = 0.002  # a batch's round trip may take longer: Redis runs each script

# BusyLoadingError and MaxConnectionsError are ConnectionError subclasses; ReadOnlyError is a replica mid-failover.
_UNAVAILABLE: Final = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, TimeoutError, OSError)

# KEYS: one per matching rule. ARGV: now_ms, member, then limit and window_ms for each key in KEYS order.
# Returns {allowed (1/0), index of the full rule (1-based, 0 if none), retry_after_ms, replayed (1/0)}.
SLIDING_WINDOW_LUA: Final[str] = """
local now = tonumber(ARGV[1])
local member = ARGV[2]
local n = #KEYS
local present = {}
local seen = 0
for i = 1, n do
  local window = tonumber(ARGV[2 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  present[i] = redis.call('ZSCORE', KEYS[i], member) ~= false
  if present[i] then seen = seen + 1 end
end
if seen == n then
  return {1, 0, 0, 1}
end
for i = 1, n do
  local limit = tonumber(ARGV[1 + 2 * i])
  local count = redis.call('ZCARD', KEYS[i])
  if not present[i] and count >= limit then
    -- room comes back when the entry that brings the count under the limit leaves (the oldest, unless the limit
    -- was lowered below what the window already holds)
    local window = tonumber(ARGV[2 + 2 * i])
    local freeing = redis.call('ZRANGE', KEYS[i], count - limit, count - limit, 'WITHSCORES')
    return {0, i, tonumber(freeing[2]) + window - now, 0}
  end
end
for i = 1, n do
  local window = tonumber(ARGV[2 + 2 * i])
  -- NX: a partly counted delivery keeps its first admission time
  redis.call('ZADD', KEYS[i], 'NX', now, member)
  redis.call('PEXPIRE', KEYS[i], window)
end
return {1, 0, 0, 0}
"""


@dataclass(frozen=True, slots=True)
class RateCheck:
    """One delivery to count: whose, on which channel, of which type."""

    user_id: str
    channel: str
    notification_type: str
    notification_id: str


@dataclass(frozen=True)
class RateDecision:
    """What the stage does with a delivery.

    allowed: send it (`degraded`: Redis was unreachable, nothing was counted; `replayed`: already counted before).
    limited: a window is full; `rule` names it, `retry_after_s` is when it will have room.
    unavailable: Redis was unreachable for a bulk delivery; defer it.
    """

    outcome: Outcome
    rule: str | None = None
    retry_after_s: float | None = None
    degraded: bool = False
    replayed: bool = False

    @property
    def allowed(self) -> bool:
        return self.outcome == "allowed"


class RateLimiter:
    def __init__(self, client: aioredis.Redis, policy: RatePolicy, *, deadline_s: float = CHECK_DEADLINE_S) -> None:
        self._client = client
        self._policy = policy
        self._deadline_s = deadline_s
        # EVALSHA with a SCRIPT LOAD on NOSCRIPT (a restarted or failed-over Redis forgets scripts).
        self._script = client.register_script(SLIDING_WINDOW_LUA)
        self._redis_down = False

    @classmethod
    def from_url(cls, url: str, policy: RatePolicy | None = None, *,
                 socket_timeout_s: float = SOCKET_TIMEOUT_S) -> RateLimiter:
        """A limiter with its own client on `url` (e.g. `Settings.redis_dsn`); policy defaults to the policy file."""
        client = redis_client.async_client(url, socket_timeout_s=socket_timeout_s)
        return cls(client, policy if policy is not None else load_policy())

    @property
    def policy(self) -> RatePolicy:
        return self._policy

    async def aclose(self) -> None:
        await self._client.aclose()

    async def check(self, *, user_id: str, channel: str, notification_type: str, lane: Lane,
                    notification_id: str, now_ms: int) -> RateDecision:
        """Count this delivery against every rule it matches, or say which rule stops it."""
        (decision,) = await self.check_all([RateCheck(user_id, channel, notification_type, notification_id)],
                                           lane=lane, now_ms=now_ms)
        return decision

    async def check_all(self, checks: Sequence[RateCheck], *, lane: Lane, now_ms: int) -> list[RateDecision]:
        """Decide every check of a batch, in order, in one Redis round trip (a pipeline of script calls: Redis runs
        them one after another, so a user's deliveries are counted in the order given)."""
        decisions: list[RateDecision | None] = []
        asked: list[tuple[int, tuple[Rule, ...]]] = []  # position, rules of each scripted check
        calls: list[tuple[int, list[str | int]]] = []  # EVALSHA's number of keys, then keys and arguments
        for check in checks:
            rules = rules_for(self._policy, channel=check.channel, notification_type=check.notification_type,
                              lane=lane)
            if not rules:
                decisions.append(RateDecision("allowed"))
                continue
            args: list[str | int] = [now_ms, f"{check.notification_id}:{check.channel}"]
            for rule in rules:
                args += [rule.limit, rule.window_ms]
            keys = [rule.key(user_id=check.user_id, channel=check.channel) for rule in rules]
            calls.append((len(keys), [*keys, *args]))
            asked.append((len(decisions), rules))
            decisions.append(None)
        if asked:
            try:
                async with asyncio.timeout(self._deadline_s + BATCH_DEADLINE_PER_CHECK_S * len(asked)):
                    answers = await self._execute(calls)
            except _UNAVAILABLE as exc:
                self._note_redis_down(exc)
                down = RateDecision("allowed", degraded=True) if lane == "critical" else RateDecision("unavailable")
                return [d if d is not None else down for d in decisions]
            self._note_redis_up()
            for (position, rules), answer in zip(asked, answers, strict=True):
                allowed, full_index, retry_after_ms, replayed = answer
                decisions[position] = (
                    RateDecision("allowed", replayed=bool(replayed)) if allowed else
                    RateDecision("limited", rule=rules[int(full_index) - 1].name,
                                 retry_after_s=max(int(retry_after_ms), 0) / 1000))
        return [d for d in decisions if d is not None]

    async def _execute(self, calls: Sequence[tuple[int, list[str | int]]]) -> list[Any]:
        """Run the script calls in one pipeline; a Redis that forgot the script (restarted, failed over) gets it and
        runs them again. A second run is safe: a delivery already in its windows is recognised as a replay."""
        answers = await self._pipeline(calls)
        if any(isinstance(a, NoScriptError) for a in answers):
            await self._client.script_load(SLIDING_WINDOW_LUA)
            answers = await self._pipeline(calls)
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        return answers

    async def _pipeline(self, calls: Sequence[tuple[int, list[str | int]]]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for numkeys, keys_and_args in calls:
            pipe.evalsha(self._script.sha, numkeys, *keys_and_args)
        answers: list[Any] = await pipe.execute(raise_on_error=False)
        return answers

    # Log transitions only: during an outage every message would otherwise log the same line.
    def _note_redis_down(self, exc: BaseException) -> None:
        if not self._redis_down:
            self._redis_down = True
            log.warning("rate limiter: Redis unreachable (%s: %s); critical lane allowed unlimited, bulk deferred",
                        type(exc).__name__, exc)

    def _note_redis_up(self) -> None:
        if self._redis_down:
            self._redis_down = False
            log.warning("rate limiter: Redis reachable again; limits enforced")
