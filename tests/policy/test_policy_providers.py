"""Provider routing policy: order, breakers, deadlines, and what each outcome leads to."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline.policy.providers import (
    DEFAULT_ROUTING,
    Breaker,
    BreakerPolicy,
    RoutingTable,
    after,
    breaker_after_call,
    breaker_state,
    candidates,
)

ROUTING = RoutingTable(DEFAULT_ROUTING.default, by_lane={("sms", "bulk"): ("termii", "twilio")},
                       by_country={("sms", "234"): ("termii", "twilio"), ("sms", "1876"): ("twilio",)})


def test_order_defaults_then_lane_then_longest_calling_code() -> None:
    assert DEFAULT_ROUTING.order("sms", "critical") == ("twilio", "termii")
    assert DEFAULT_ROUTING.order("email", "bulk") == ("sendgrid", "mailgun")
    assert DEFAULT_ROUTING.order("push", "critical") == ("fcm", "apns")
    assert ROUTING.order("sms", "bulk") == ("termii", "twilio")
    assert ROUTING.order("sms", "critical", "+2348012345678") == ("termii", "twilio")
    assert ROUTING.order("sms", "critical", "+18765550100") == ("twilio",)
    assert ROUTING.order("sms", "critical", "+14155550100") == ("twilio", "termii")


def test_an_open_breaker_is_skipped_unless_every_breaker_is_open() -> None:
    order = ("twilio", "termii")
    assert candidates(order, {"twilio": "open"}, {}, None) == ["termii"]
    assert candidates(order, {"twilio": "half_open"}, {}, None) == ["twilio", "termii"]
    assert candidates(order, {"twilio": "open", "termii": "open"}, {}, None) == ["twilio"]


def test_an_otp_skips_a_provider_slower_than_its_remaining_time_to_live() -> None:
    order = ("twilio", "termii")
    assert candidates(order, {}, {"twilio": 40.0, "termii": 2.0}, remaining_s=30.0) == ["termii"]
    assert candidates(order, {}, {"twilio": 40.0, "termii": 50.0}, remaining_s=30.0) == ["twilio", "termii"]
    assert candidates(order, {}, {"twilio": 40.0}, remaining_s=None) == ["twilio", "termii"]


@given(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, unique=True),
       st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.sampled_from(["closed", "open", "half_open"])),
       st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.floats(0, 100)),
       st.none() | st.floats(0, 100))
def test_candidates_are_never_empty_and_keep_the_configured_order(
        order: list[str], breakers: dict[str, str], latency: dict[str, float], remaining: float | None) -> None:
    chosen = candidates(order, breakers, latency, remaining)  # type: ignore[arg-type]
    assert chosen
    assert chosen == [p for p in order if p in chosen]


def test_each_outcome_leads_to_its_step() -> None:
    assert after("accepted", 1, 2).action == "record_accepted"
    assert after("permanent", 1, 2).action == "fail"  # an invalid number is invalid at every provider
    assert after("transient", 1, 2).action == "try_next"
    assert after("transient", 2, 2).action == "schedule_retry"
    assert after("ambiguous", 1, 2).action == "mark_unknown"  # never re-sent blindly


def test_a_breaker_opens_on_the_failure_rate_probes_after_the_open_time_and_closes_on_success() -> None:
    policy = BreakerPolicy(failure_rate=0.5, min_calls=10, open_s=15)
    closed = Breaker("closed")
    assert breaker_state(closed, calls=9, failures=9, now=100, policy=policy) == closed  # too few calls
    assert breaker_state(closed, calls=10, failures=4, now=100, policy=policy) == closed
    opened = breaker_state(closed, calls=10, failures=5, now=100, policy=policy)
    assert opened == Breaker("open", 100)
    assert breaker_state(opened, calls=0, failures=0, now=114, policy=policy) == opened
    probing = breaker_state(opened, calls=0, failures=0, now=115, policy=policy)
    assert probing.state == "half_open"
    assert breaker_after_call(probing, succeeded=True, now=116) == Breaker("closed")
    assert breaker_after_call(probing, succeeded=False, now=116) == Breaker("open", 116)
    assert breaker_after_call(closed, succeeded=False, now=116) == closed
