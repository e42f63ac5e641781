"""Provider routing policy: which providers to try for a send, in what order, and what an outcome does next.

Pure functions over plain data; the sender stage reads breaker states and latency figures, asks here, and acts.

- Order: the channel's provider list (Twilio then Termii, SendGrid then Mailgun, FCM then APNs), overridable per
  lane and per country (the phone number's calling code) in configuration.
- A provider whose circuit breaker is open is skipped while another is usable; half-open lets one probe through.
  If every provider's breaker is open, the first in order is still tried: an OTP is better attempted than parked.
- Deadline-aware: a provider whose recent p95 latency exceeds the time the notification has left to live is
  skipped (an OTP answered after it expired is worthless), unless no provider is fast enough.
- Outcomes: accepted ends the attempt; permanent fails the channel (no other provider: an invalid number is
  invalid everywhere); transient falls over to the next candidate, and when none is left the delivery is
  scheduled for retry; ambiguous stops everything (the provider may have sent it): the row goes to `unknown` and
  reconciliation asks the provider before anything is re-sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from connectors.base import OutcomeKind  # the connectors' four outcome kinds, defined once

BreakerState = Literal["closed", "open", "half_open"]

DEFAULT_ORDER: Final[Mapping[str, tuple[str, ...]]] = {
    "sms": ("twilio", "termii"),
    "email": ("sendgrid", "mailgun"),
    "push": ("fcm", "apns"),
}


@dataclass(frozen=True)
class RoutingTable:
    """Provider order per channel, with overrides per (channel, lane) and per (channel, calling code)."""

    default: Mapping[str, tuple[str, ...]]
    by_lane: Mapping[tuple[str, str], tuple[str, ...]]
    by_country: Mapping[tuple[str, str], tuple[str, ...]]  # (channel, calling code without "+", e.g. "234")

    def order(self, channel: str, lane: str, phone: str | None = None) -> tuple[str, ...]:
        if phone and phone.startswith("+"):
            # the longest calling code that has an override wins (+1 vs +1876)
            for length in (4, 3, 2, 1):
                override = self.by_country.get((channel, phone[1:1 + length]))
                if override:
                    return override
        return self.by_lane.get((channel, lane)) or self.default[channel]


DEFAULT_ROUTING: Final = RoutingTable(DEFAULT_ORDER, {}, {})


def routing_table(overrides: Iterable[tuple[tuple[str, str], tuple[str, ...]]]) -> RoutingTable:
    """The table from NOTIFY_ROUTING's parsed overrides: keys (channel, lane) or (channel, "+<calling code>")."""
    pairs = list(overrides)
    by_lane = {key: order for key, order in pairs if not key[1].startswith("+")}
    by_country = {(channel, scope[1:]): order for (channel, scope), order in pairs if scope.startswith("+")}
    return RoutingTable(DEFAULT_ORDER, by_lane, by_country)


def is_apns_token(token: str) -> bool:
    """An APNs device token (32 bytes as 64 hex digits); FCM registration tokens look nothing like it."""
    return len(token) == 64 and all(c in "0123456789abcdefABCDEF" for c in token)


def for_device(order: Sequence[str], platform: str, token: str) -> tuple[str, ...]:
    """The push providers of `order` that can use this device's token.

    A token names one provider's registration: an APNs device token is only good at APNs, an FCM registration
    token (Android, web, or an iOS app registered with FCM) only at FCM. So a push to one device has one provider,
    and "FCM then APNs" is the order between devices whose tokens allow either; it is never a fallback with the
    same token (FCM would refuse an APNs token and vice versa).
    """
    wanted = "apns" if platform == "ios" and is_apns_token(token) else "fcm"
    return tuple(p for p in order if p == wanted)


def candidates(order: Sequence[str], breakers: Mapping[str, BreakerState],
               p95_latency_s: Mapping[str, float], remaining_s: float | None) -> list[str]:
    """Providers to try, best first. Never empty when `order` is not."""
    usable = [p for p in order if breakers.get(p, "closed") != "open"] or list(order[:1])
    if remaining_s is None:
        return usable
    in_time = [p for p in usable if p95_latency_s.get(p, 0.0) <= remaining_s]
    return in_time or usable


@dataclass(frozen=True)
class Next:
    """What the sender does after one provider's outcome."""

    action: Literal["record_accepted", "fail", "try_next", "schedule_retry", "mark_unknown"]
    reason: str = ""


# Permanent refusals that are about our account at that provider, not about the recipient: another provider may
# well take the message.
PROVIDER_SIDE_PERMANENT: Final = frozenset({"auth"})


def after(outcome: OutcomeKind, tried: int, candidates_total: int, reason: str = "") -> Next:
    """The step after the `tried`-th candidate (1-based) answered `outcome` (with the connector's `reason`)."""
    if outcome == "accepted":
        return Next("record_accepted")
    if outcome == "permanent":
        if reason in PROVIDER_SIDE_PERMANENT and tried < candidates_total:
            return Next("try_next", f"permanent at this provider ({reason})")
        return Next("fail", "permanent")
    if outcome == "ambiguous":
        return Next("mark_unknown", "ambiguous: the provider may have accepted it")
    if tried < candidates_total:
        return Next("try_next", "transient")
    return Next("schedule_retry", "transient on every provider")


# --------------------------------------------------------------------------------------------- circuit breaker


@dataclass(frozen=True)
class BreakerPolicy:
    failure_rate: float = 0.5  # open when failures / calls in the window reach this ...
    min_calls: int = 20  # ... over at least this many calls
    window_s: int = 30  # rolling window
    open_s: float = 15.0  # how long it stays open before a half-open probe


@dataclass(frozen=True)
class Breaker:
    state: BreakerState
    opened_at: float | None = None  # epoch seconds


def breaker_state(breaker: Breaker, calls: int, failures: int, now: float, policy: BreakerPolicy) -> Breaker:
    """The breaker after looking at the window's counts at `now` (before a call)."""
    if breaker.state == "open":
        if breaker.opened_at is not None and now - breaker.opened_at >= policy.open_s:
            return Breaker("half_open", breaker.opened_at)
        return breaker
    if breaker.state == "closed" and calls >= policy.min_calls and failures / calls >= policy.failure_rate:
        return Breaker("open", now)
    return breaker


def breaker_after_call(breaker: Breaker, succeeded: bool, now: float) -> Breaker:
    """A half-open probe closes the breaker on success and re-opens it on failure."""
    if breaker.state != "half_open":
        return breaker
    return Breaker("closed") if succeeded else Breaker("open", now)


def counts_against_provider(outcome: OutcomeKind, reason: str) -> bool:
    """Whether an outcome is the provider's failure, for its breaker. A refused recipient is a healthy answer."""
    return outcome in ("transient", "ambiguous") or reason in PROVIDER_SIDE_PERMANENT


def p95(latencies_s: Sequence[float]) -> float:
    """The 95th percentile (nearest rank) of recent latencies; 0.0 when there are none."""
    if not latencies_s:
        return 0.0
    ordered = sorted(latencies_s)
    return ordered[min(len(ordered) - 1, max(0, -(-95 * len(ordered) // 100) - 1))]


def retry_delay_s(base_s: float, retry_after_s: Sequence[float | None]) -> float:
    """When to retry after every provider failed transiently: the base delay, or later if a provider asked."""
    return max([base_s, *(r for r in retry_after_s if r is not None)])


DeliveryResult = Literal["accepted", "failed", "retry_scheduled", "unknown"]


def combine(results: Sequence[DeliveryResult]) -> DeliveryResult:
    """One delivery sent as several messages (push to each device): its state from theirs.

    Accepted by any device's provider wins (the user got it); else an ambiguous one makes the whole unknown (it
    may have arrived; reconciliation decides); else any transient one schedules a retry; else it failed.
    """
    order: tuple[DeliveryResult, ...] = ("accepted", "unknown", "retry_scheduled")
    for result in order:
        if result in results:
            return result
    return "failed"
