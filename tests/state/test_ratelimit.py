"""The rate limiter against the real local Redis: limits, replays, sliding windows, concurrency and a dead Redis.

Every test uses its own user id, so keys never meet; times are `now_ms` values the test controls.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from pipeline.config import Settings
from pipeline.domain import Lane
from pipeline.policy.ratelimit import load_policy, parse_policy
from pipeline.state.ratelimit import RateDecision, RateLimiter

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
# A dead Redis must cost a message well under a second (socket timeouts are 200 ms).
DOWN_BUDGET_S = 1.0


@pytest_asyncio.fixture(loop_scope="function")
async def limiter(settings: Settings) -> AsyncIterator[RateLimiter]:
    """A limiter with the shipped policy on the stack's Redis."""
    limiter = RateLimiter.from_url(settings.redis_dsn)
    yield limiter
    await limiter.aclose()


@pytest_asyncio.fixture(loop_scope="function")
async def client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis_dsn)
    yield client
    await client.aclose()


@pytest_asyncio.fixture(loop_scope="function")
async def user(client: aioredis.Redis) -> AsyncIterator[str]:
    """A user id of this test's own; its windows are deleted afterwards."""
    user = f"u-{uuid.uuid4().hex}"
    yield user
    keys = [key async for key in client.scan_iter(match=f"rl:*{user}*")]
    if keys:
        await client.delete(*keys)


@pytest.fixture
def t0() -> int:
    return int(time.time() * 1000)


def new_id() -> str:
    return str(uuid.uuid4())


async def bulk_sms(limiter: RateLimiter, user: str, now_ms: int, notification_id: str | None = None) -> RateDecision:
    return await limiter.check(user_id=user, channel="sms", notification_type="marketing", lane="bulk",
                               notification_id=notification_id or new_id(), now_ms=now_ms)


async def otp(limiter: RateLimiter, user: str, now_ms: int, channel: str = "sms") -> RateDecision:
    return await limiter.check(user_id=user, channel=channel, notification_type="otp", lane="critical",
                               notification_id=new_id(), now_ms=now_ms)


async def test_the_fourth_bulk_sms_in_an_hour_is_limited_naming_the_rule_while_push_is_still_allowed(
        limiter: RateLimiter, user: str, t0: int) -> None:
    first_three = [await bulk_sms(limiter, user, t0 + i * MINUTE_MS) for i in range(3)]
    fourth = await bulk_sms(limiter, user, t0 + 3 * MINUTE_MS)
    push = await limiter.check(user_id=user, channel="push", notification_type="price_alert", lane="bulk",
                               notification_id=new_id(), now_ms=t0 + 3 * MINUTE_MS)

    assert [d.outcome for d in first_three] == ["allowed"] * 3
    assert fourth == RateDecision("limited", rule="bulk_sms_per_hour", retry_after_s=57 * 60)
    assert push == RateDecision("allowed")


async def test_a_critical_sms_is_not_held_back_by_the_bulk_sms_limit(
        limiter: RateLimiter, user: str, t0: int) -> None:
    for i in range(3):
        await bulk_sms(limiter, user, t0 + i)

    transaction = await limiter.check(user_id=user, channel="sms", notification_type="transaction", lane="critical",
                                      notification_id=new_id(), now_ms=t0 + 10)

    assert transaction == RateDecision("allowed")


async def test_the_otp_ceiling_stops_the_sixth_otp_within_ten_minutes_across_channels(
        limiter: RateLimiter, user: str, t0: int) -> None:
    channels = ["sms", "email", "push", "sms", "email"]
    first_five = [await otp(limiter, user, t0 + i * MINUTE_MS, channel) for i, channel in enumerate(channels)]
    sixth = await otp(limiter, user, t0 + 9 * MINUTE_MS, "push")

    assert [d.outcome for d in first_five] == ["allowed"] * 5
    assert sixth == RateDecision("limited", rule="otp_per_10_min", retry_after_s=60)
    # ten minutes after the first, one slot is free again
    assert (await otp(limiter, user, t0 + 10 * MINUTE_MS)).outcome == "allowed"


async def test_the_daily_otp_ceiling_stops_the_twenty_first_otp_of_the_day(
        limiter: RateLimiter, user: str, t0: int) -> None:
    # five every eleven minutes stays under the 10-minute ceiling
    decisions = [await otp(limiter, user, t0 + (i // 5) * 11 * MINUTE_MS + i) for i in range(21)]

    assert [d.outcome for d in decisions[:20]] == ["allowed"] * 20
    assert decisions[20].outcome == "limited"
    assert decisions[20].rule == "otp_per_day"


async def test_the_same_notification_checked_twice_counts_once(limiter: RateLimiter, user: str, t0: int) -> None:
    redelivered = new_id()
    first = await bulk_sms(limiter, user, t0, redelivered)
    again = await bulk_sms(limiter, user, t0 + 1000, redelivered)
    others = [await bulk_sms(limiter, user, t0 + 2000 + i) for i in range(3)]

    assert first == RateDecision("allowed")
    assert again == RateDecision("allowed", replayed=True)
    assert [d.outcome for d in others] == ["allowed", "allowed", "limited"]


async def test_a_replayed_notification_is_allowed_again_even_when_its_window_is_full(
        limiter: RateLimiter, user: str, t0: int) -> None:
    ids = [new_id() for _ in range(3)]
    for i, notification_id in enumerate(ids):
        await bulk_sms(limiter, user, t0 + i, notification_id)

    replay = await bulk_sms(limiter, user, t0 + MINUTE_MS, ids[0])

    assert replay == RateDecision("allowed", replayed=True)
    assert (await bulk_sms(limiter, user, t0 + MINUTE_MS)).outcome == "limited"


async def test_a_limited_notification_is_not_counted(limiter: RateLimiter, user: str, t0: int) -> None:
    for i in range(3):
        await bulk_sms(limiter, user, t0 + i * MINUTE_MS)
    refused = new_id()
    assert (await bulk_sms(limiter, user, t0 + 30 * MINUTE_MS, refused)).outcome == "limited"

    # once the first entry has left the window, the refused one gets the freed slot (it was never a replay)
    retried = await bulk_sms(limiter, user, t0 + HOUR_MS, refused)

    assert retried == RateDecision("allowed")


async def test_the_window_slides_so_an_hour_after_the_first_sms_one_more_is_allowed(
        limiter: RateLimiter, user: str, t0: int) -> None:
    for i in range(3):
        await bulk_sms(limiter, user, t0 + i * 10 * MINUTE_MS)

    just_before = await bulk_sms(limiter, user, t0 + HOUR_MS - 1)
    an_hour_later = await bulk_sms(limiter, user, t0 + HOUR_MS)
    right_after = await bulk_sms(limiter, user, t0 + HOUR_MS + 1)

    assert just_before == RateDecision("limited", rule="bulk_sms_per_hour", retry_after_s=0.001)
    assert an_hour_later == RateDecision("allowed")
    assert right_after == RateDecision("limited", rule="bulk_sms_per_hour", retry_after_s=599.999)


async def test_twenty_concurrent_checks_for_one_user_allow_exactly_the_limit(
        limiter: RateLimiter, user: str, t0: int) -> None:
    decisions = await asyncio.gather(*(bulk_sms(limiter, user, t0 + i) for i in range(20)))

    assert sum(d.outcome == "allowed" for d in decisions) == 3
    assert sum(d.outcome == "limited" for d in decisions) == 17


async def test_users_have_windows_of_their_own(limiter: RateLimiter, user: str, t0: int) -> None:
    for i in range(3):
        await bulk_sms(limiter, user, t0 + i)

    assert (await bulk_sms(limiter, f"{user}-other", t0 + 10)).outcome == "allowed"


async def test_every_counted_key_expires_with_its_window(
        limiter: RateLimiter, client: aioredis.Redis, user: str, t0: int) -> None:
    await otp(limiter, user, t0)
    rules = {rule.name: rule for rule in load_policy().rules}

    for name in ("otp_per_10_min", "otp_per_day"):
        ttl_ms = await client.pttl(rules[name].key(user_id=user, channel="sms"))
        assert rules[name].window_ms - 5000 < ttl_ms <= rules[name].window_ms


async def test_the_first_full_rule_in_policy_order_is_named_and_per_channel_rules_count_each_channel_apart(
        settings: Settings, user: str, t0: int) -> None:
    policy = parse_policy("""
[rules.per_channel_burst]
match = { class = "bulk" }
limit = 1
window_s = 60
per_channel = true

[rules.all_channels_per_hour]
match = { class = "bulk" }
limit = 2
window_s = 3600
""")
    limiter = RateLimiter.from_url(settings.redis_dsn, policy)
    try:
        async def check(channel: str, now_ms: int) -> RateDecision:
            return await limiter.check(user_id=user, channel=channel, notification_type="portfolio", lane="bulk",
                                       notification_id=new_id(), now_ms=now_ms)

        first_sms = await check("sms", t0)
        second_sms = await check("sms", t0 + 1000)
        first_email = await check("email", t0 + 2000)
        first_push = await check("push", t0 + 3000)
    finally:
        await limiter.aclose()

    assert first_sms == RateDecision("allowed")
    assert second_sms == RateDecision("limited", rule="per_channel_burst", retry_after_s=59)
    assert first_email == RateDecision("allowed")
    assert first_push == RateDecision("limited", rule="all_channels_per_hour", retry_after_s=3600 - 3)


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on: connections are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections (kernel backlog) but never answers: a stalled Redis."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port: int = listener.getsockname()[1]
        yield port


async def timed_check(limiter: RateLimiter, notification_type: str, lane: Lane) -> tuple[RateDecision, float]:
    started = time.monotonic()
    decision = await limiter.check(user_id=f"u-{uuid.uuid4().hex}", channel="sms",
                                   notification_type=notification_type, lane=lane, notification_id=new_id(),
                                   now_ms=int(time.time() * 1000))
    return decision, time.monotonic() - started


@pytest.mark.parametrize("port_fixture", ["closed_port", "silent_port"])
async def test_with_redis_down_an_otp_is_allowed_degraded_and_bulk_is_unavailable_within_a_bounded_time(
        port_fixture: str, request: pytest.FixtureRequest) -> None:
    port: int = request.getfixturevalue(port_fixture)
    limiter = RateLimiter.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        critical, critical_s = await timed_check(limiter, "otp", "critical")
        bulk, bulk_s = await timed_check(limiter, "marketing", "bulk")
    finally:
        await limiter.aclose()

    assert critical == RateDecision("allowed", degraded=True)
    assert bulk == RateDecision("unavailable")
    assert critical_s < DOWN_BUDGET_S
    assert bulk_s < DOWN_BUDGET_S


async def test_with_redis_down_a_delivery_no_rule_matches_is_allowed_without_asking_redis(closed_port: int) -> None:
    limiter = RateLimiter.from_url(f"redis://127.0.0.1:{closed_port}/0")
    try:
        decision, _ = await timed_check(limiter, "transaction", "critical")
    finally:
        await limiter.aclose()

    assert decision == RateDecision("allowed", degraded=False)
