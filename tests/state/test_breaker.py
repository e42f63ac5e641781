"""Circuit breakers shared through the real Redis: two boards stand for two workers."""

from __future__ import annotations

import asyncio

from pipeline.config import Settings
from pipeline.policy.providers import BreakerPolicy
from pipeline.state.breaker import LATENCY_SAMPLE, BoardView, BreakerBoard

POLICY = BreakerPolicy(failure_rate=0.5, min_calls=10, window_s=5, open_s=2.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


def test_every_worker_sees_a_breaker_open_on_the_failure_rate_then_one_probe_closes_it(
        settings: Settings, unique: str) -> None:
    async def scenario() -> None:
        clock = Clock()
        one, two = (BreakerBoard.from_url(settings.redis_dsn, POLICY, prefix=f"t{unique}.", clock=clock)
                    for _ in range(2))
        try:
            await one.record({"twilio": (6, 2)})
            await two.record({"twilio": (3, 1)})
            assert await one.states(["twilio", "termii"]) == {"twilio": "closed", "termii": "closed"}  # 9 calls
            await two.record({"twilio": (3, 3), "termii": (50, 0)})  # 12 calls, 6 failed: 50%
            assert await one.states(["twilio", "termii"]) == {"twilio": "open", "termii": "closed"}
            assert (await two.states(["twilio"]))["twilio"] == "open"  # the other worker sees it too

            clock.now += 2.5  # past open_s: exactly one worker wins the half-open probe
            seen = [(await one.states(["twilio"]))["twilio"], (await two.states(["twilio"]))["twilio"]]
            assert sorted(seen) == ["half_open", "open"]
            await one.probe_done("twilio", succeeded=False)  # the probe failed: open again, for another open_s
            clock.now += 1.0
            assert (await two.states(["twilio"]))["twilio"] == "open"

            clock.now += 1.5
            assert (await two.states(["twilio"]))["twilio"] == "half_open"
            await two.probe_done("twilio", succeeded=True)
            # closed, and the failures before the close no longer count
            assert (await one.states(["twilio"]))["twilio"] == "closed"
            await one.record({"twilio": (10, 1)})
            assert (await one.states(["twilio"]))["twilio"] == "closed"

            clock.now += 10  # the window slid past everything: nothing counts
            await one.record({"twilio": (4, 4)})
            assert (await one.states(["twilio"]))["twilio"] == "closed"  # 4 calls < min_calls
        finally:
            await one.reset(["twilio", "termii"])
            await one.aclose()
            await two.aclose()

    asyncio.run(scenario())


def test_with_redis_unreachable_every_breaker_reads_closed_and_nothing_raises(unused_tcp_port: int) -> None:
    async def scenario() -> None:
        board = BreakerBoard.from_url(f"redis://127.0.0.1:{unused_tcp_port}/0", POLICY)
        try:
            await board.record({"twilio": (20, 20)})
            await board.probe_done("twilio", succeeded=True)
            assert await board.states(["twilio", "termii"]) == {"twilio": "closed", "termii": "closed"}
        finally:
            await board.aclose()

    asyncio.run(scenario())


def test_every_worker_routes_on_the_p95_of_every_workers_recent_calls(settings: Settings, unique: str) -> None:
    async def scenario() -> None:
        one, two, newcomer = (BreakerBoard.from_url(settings.redis_dsn, POLICY, prefix=f"t{unique}.")
                              for _ in range(3))
        try:
            assert (await newcomer.read(["twilio"])).p95_s == {}  # nobody called it: no shared figure
            await one.record({"twilio": (50, 0)}, {"twilio": [0.05] * 50})
            await two.record({"twilio": (50, 0), "termii": (10, 0)},
                             {"twilio": [0.05] * 45 + [3.0] * 5, "termii": [0.2] * 10})
            view = await newcomer.read(["twilio", "termii", "fcm"])  # a worker that has made no call of its own
            assert view.p95_s == {"twilio": 0.05, "termii": 0.2}  # 5 slow of 100: the p95 is still fast
            await two.record({"twilio": (10, 0)}, {"twilio": [3.0] * 10})  # now 15 of the latest 110
            assert (await newcomer.read(["twilio"])).p95_s == {"twilio": 3.0}  # too slow for a 2 s OTP, for all
            await one.record({"twilio": (1, 0)}, {"twilio": [0.04] * (LATENCY_SAMPLE + 10)})
            assert (await two.read(["twilio"])).p95_s == {"twilio": 0.04}  # only the latest sample counts
            assert view.states == {"twilio": "closed", "termii": "closed", "fcm": "closed"}
        finally:
            await one.client.delete(*(f"t{unique}.notify:latency:{p}" for p in ("twilio", "termii")))
            for board in (one, two, newcomer):
                await board.aclose()

    asyncio.run(scenario())


def test_with_redis_unreachable_there_is_no_shared_latency_and_each_worker_keeps_its_own(
        unused_tcp_port: int) -> None:
    async def scenario() -> None:
        board = BreakerBoard.from_url(f"redis://127.0.0.1:{unused_tcp_port}/0", POLICY)
        try:
            await board.record({"twilio": (1, 0)}, {"twilio": [0.1]})
            assert await board.read(["twilio"]) == BoardView({"twilio": "closed"}, {})
        finally:
            await board.aclose()

    asyncio.run(scenario())
