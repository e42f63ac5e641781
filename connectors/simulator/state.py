"""Simulator state: programmable faults per provider, the ledger of accepted messages, request counters.

Faults (POST /_admin/providers/{name}, any subset of the keys; `error_rates` is replaced as a whole):

    {"latency_ms": 20, "jitter_ms": 10,                         # answer delay: latency_ms +- jitter_ms
     "error_rates": {"5xx": 0.2, "429": 0.1, "permanent": 0.05}, # share of requests answered with that error
     "retry_after_s": 2,                                         # Retry-After of 429 answers
     "rate_limit_per_s": 50,                                     # more requests in one second: 429 (null: off)
     "outage_s": 30,                                             # answer 503 for the next 30 s (0 ends it)
     "accept_then_hang": 1.0,                                    # share accepted, recorded, then never answered
     "undelivered_rate": 0.0,                                    # share of accepted messages that fail delivery
     "delivery_delay_ms": 500,                                   # accepted -> delivered (status API, callback)
     "lost_receipts": 0.0,                                       # share of receipts never posted (status API only)
     "webhook_url": "http://...",                                # receipts of this provider (null: none)
     "device_faults": {"<push token>": ["outage", "5xx"]}}       # FCM, APNs: that token's next answers

A request meets at most one fault, drawn after the latency in this order: outage, rate limit, then one draw over
error_rates and accept_then_hang together. Outage, 5xx and 429 are answered before auth and input checks (the
provider's front door is down or busy); the "permanent" fault and accept_then_hang only apply to requests that pass
auth and validation.

`device_faults` (push only; replaced as a whole) programs single devices: each request to that token takes the
first fault of its list, instead of the draw, once it passed auth and validation; an emptied list is dropped and
the token answers normally again. The faults are those above ("outage" is the provider's 503, UNAVAILABLE or
ServiceUnavailable), so `{"tok": ["outage"]}` fails one push to that token transiently and accepts the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, Literal

PROVIDERS = ("twilio", "termii", "sendgrid", "mailgun", "fcm", "apns")
ERROR_KINDS = ("5xx", "429", "permanent")
Fault = Literal["outage", "5xx", "429", "permanent", "hang"]
FAULTS: tuple[Fault, ...] = ("outage", "5xx", "429", "permanent", "hang")
PUSH_PROVIDERS = ("fcm", "apns")


class FaultConfigError(ValueError):
    """A fault configuration that makes no sense (unknown key, rate outside [0, 1], ...)."""


@dataclass(frozen=True)
class FaultConfig:
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rates: dict[str, float] = field(default_factory=dict)
    retry_after_s: float = 1.0
    rate_limit_per_s: int | None = None
    outage_until: float = 0.0  # time.monotonic(); set through "outage_s"
    accept_then_hang: float = 0.0
    undelivered_rate: float = 0.0
    lost_receipts: float = 0.0
    delivery_delay_ms: float = 500.0
    webhook_url: str | None = None
    device_faults: dict[str, tuple[Fault, ...]] = field(default_factory=dict)  # push token -> its next answers

    def updated(self, changes: dict[str, Any]) -> FaultConfig:
        known = {f.name for f in fields(self)} - {"outage_until"} | {"outage_s"}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise FaultConfigError(f"unknown fault setting(s) {unknown}; known: {sorted(known)}")
        values = dict(changes)
        if "outage_s" in values:
            seconds = _number(values.pop("outage_s"), "outage_s")
            values["outage_until"] = time.monotonic() + seconds if seconds > 0 else 0.0
        if isinstance(values.get("accept_then_hang"), bool):
            values["accept_then_hang"] = 1.0 if values["accept_then_hang"] else 0.0
        for key in ("latency_ms", "jitter_ms", "retry_after_s", "delivery_delay_ms"):
            if key in values:
                values[key] = _number(values[key], key)
        for key in ("accept_then_hang", "undelivered_rate", "lost_receipts"):
            if key in values:
                values[key] = _rate(values[key], key)
        if "error_rates" in values:
            rates = values["error_rates"] or {}
            if not isinstance(rates, dict) or set(rates) - set(ERROR_KINDS):
                raise FaultConfigError(f"error_rates must map some of {list(ERROR_KINDS)} to rates")
            values["error_rates"] = {k: _rate(v, f"error_rates.{k}") for k, v in rates.items()}
        if values.get("rate_limit_per_s") is not None:
            values["rate_limit_per_s"] = int(_number(values["rate_limit_per_s"], "rate_limit_per_s"))
        if values.get("webhook_url") is not None and not str(values["webhook_url"]).startswith("http"):
            raise FaultConfigError("webhook_url must be an http(s) URL or null")
        if "device_faults" in values:
            values["device_faults"] = _device_faults(values["device_faults"])
        new = replace(self, **values)
        if sum(new.error_rates.values()) + new.accept_then_hang > 1.0 + 1e-9:
            raise FaultConfigError("error_rates and accept_then_hang add up to more than 1")
        return new

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("outage_until")
        data["outage_remaining_s"] = round(max(0.0, self.outage_until - time.monotonic()), 3)
        return data


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise FaultConfigError(f"{key} must be a number >= 0, not {value!r}")
    return float(value)


def _device_faults(value: Any) -> dict[str, tuple[Fault, ...]]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
            isinstance(token, str) and token and isinstance(faults, list) and set(faults) <= set(FAULTS)
            for token, faults in value.items()):
        raise FaultConfigError(f"device_faults must map push tokens to lists of {list(FAULTS)}")
    return {token: tuple(faults) for token, faults in value.items() if faults}


def _rate(value: Any, key: str) -> float:
    rate = _number(value, key)
    if rate > 1:
        raise FaultConfigError(f"{key} must be between 0 and 1, not {value!r}")
    return rate


@dataclass(slots=True)
class LedgerEntry:
    """One message a provider accepted: the ground truth of what was sent."""

    seq: int
    provider: str
    provider_message_id: str
    notification_id: str | None
    to: str
    sender: str
    body: str
    subject: str | None
    accepted_at: float  # epoch seconds
    deliver_at: float  # epoch seconds; the final status holds from then on
    final_status: Literal["delivered", "failed"]
    hung: bool = False  # accepted, but the answer never came (accept_then_hang)
    callback_url: str | None = None
    callbacks: list[dict[str, Any]] = field(default_factory=list)  # each attempt: url, status or error, at
    collapse_id: str | None = None  # push: the collapse key the provider received (FCM android, APNs header)
    html: str | None = None  # email: the HTML part, when the message had one

    def status(self, now: float | None = None) -> Literal["accepted", "delivered", "failed"]:
        return self.final_status if (now or time.time()) >= self.deliver_at else "accepted"

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status()
        data["accepted_at_iso"] = datetime.fromtimestamp(self.accepted_at, UTC).isoformat()
        return data


class SimulatorState:
    def __init__(self, *, delivery_delay_ms: float, webhook_urls: dict[str, str | None], seed: int | None = None,
                 max_hang_s: float = 300.0) -> None:
        self.rng = random.Random(seed)
        self.default = {p: FaultConfig(delivery_delay_ms=delivery_delay_ms, webhook_url=webhook_urls.get(p))
                        for p in PROVIDERS}
        self.faults = dict(self.default)
        self.ledger: list[LedgerEntry] = []
        self.test_sends: list[LedgerEntry] = []  # accepted in the provider's test mode: never delivered
        self.by_id: dict[tuple[str, str], LedgerEntry] = {}
        self.counters: Counter[tuple[str, str]] = Counter()
        self._window: dict[str, tuple[int, int]] = {}  # provider -> (second, requests in it)
        self.max_hang_s = max_hang_s
        self.stopping = asyncio.Event()

    def reset(self) -> None:
        self.faults = dict(self.default)
        self.ledger.clear()
        self.test_sends.clear()
        self.by_id.clear()
        self.counters.clear()
        self._window.clear()

    def configure(self, provider: str, changes: dict[str, Any]) -> FaultConfig:
        if changes.get("device_faults") and provider not in PUSH_PROVIDERS:
            raise FaultConfigError(f"device_faults is for push providers {list(PUSH_PROVIDERS)}, not {provider}")
        self.faults[provider] = self.faults[provider].updated(changes)
        return self.faults[provider]

    def device_fault(self, provider: str, token: str) -> Fault | None:
        """The next fault programmed for this push token (taken off its list), or None."""
        cfg = self.faults[provider]
        queued = cfg.device_faults.get(token)
        if not queued:
            return None
        rest = {t: f for t, f in cfg.device_faults.items() if t != token}
        if len(queued) > 1:
            rest[token] = queued[1:]
        self.faults[provider] = replace(cfg, device_faults=rest)
        return queued[0]

    def count(self, provider: str, what: str) -> None:
        self.counters[(provider, what)] += 1

    async def draw_fault(self, provider: str) -> Fault | None:
        """Wait the programmed latency, then say which fault (if any) this request meets."""
        cfg = self.faults[provider]
        delay_ms = cfg.latency_ms + (self.rng.uniform(-cfg.jitter_ms, cfg.jitter_ms) if cfg.jitter_ms else 0.0)
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        if cfg.outage_until > time.monotonic():
            return "outage"
        if cfg.rate_limit_per_s is not None:
            second = int(time.monotonic())
            start, seen = self._window.get(provider, (second, 0))
            seen = seen + 1 if start == second else 1
            self._window[provider] = (second, seen)
            if seen > cfg.rate_limit_per_s:
                return "429"
        draw = self.rng.random()
        for kind in ERROR_KINDS:
            rate = cfg.error_rates.get(kind, 0.0)
            if draw < rate:
                return kind  # type: ignore[return-value]  # ERROR_KINDS are Fault values
            draw -= rate
        return "hang" if draw < cfg.accept_then_hang else None

    def accept(self, provider: str, provider_message_id: str, *, notification_id: str | None, to: str, sender: str,
               body: str, subject: str | None = None, fails: bool = False, test_mode: bool = False,
               collapse_id: str | None = None, html: str | None = None) -> LedgerEntry:
        """Record an accepted message; it fails delivery when `fails` (a magic recipient) or by undelivered_rate.

        A test-mode send (shadow traffic) goes to `test_sends`, not the ledger: the provider checked and answered
        it, but nobody receives it.
        """
        cfg = self.faults[provider]
        now = time.time()
        failed = fails or self.rng.random() < cfg.undelivered_rate
        entry = LedgerEntry(
            seq=len(self.ledger) + 1, provider=provider, provider_message_id=provider_message_id,
            notification_id=notification_id, to=to, sender=sender, body=body, subject=subject, accepted_at=now,
            deliver_at=now + cfg.delivery_delay_ms / 1000, final_status="failed" if failed else "delivered",
            collapse_id=collapse_id, html=html,
        )
        if test_mode:
            self.test_sends.append(entry)
            self.count(provider, "test_accepted")
            return entry
        self.ledger.append(entry)
        self.by_id[(provider, provider_message_id)] = entry
        self.count(provider, "accepted")
        return entry

    def summary(self, show: int = 20) -> dict[str, Any]:
        """How many messages were accepted, for how many notifications, and which notifications reached a user more
        than once on one channel provider (the ones to look at)."""
        seen: Counter[tuple[str | None, str]] = Counter(
            (e.notification_id, e.to) for e in self.ledger if e.notification_id is not None)
        repeated = [{"notification_id": nid, "to": to, "times": n} for (nid, to), n in seen.items() if n > 1]
        return {"count": len(self.ledger), "distinct": len(seen),
                "without_notification_id": sum(1 for e in self.ledger if e.notification_id is None),
                "by_provider": dict(Counter(e.provider for e in self.ledger)),
                "repeated_count": len(repeated), "repeated": repeated[:show]}

    def find(self, provider: str, provider_message_id: str) -> LedgerEntry | None:
        return self.by_id.get((provider, provider_message_id))

    def query(self, **filters: str | None) -> list[LedgerEntry]:
        return [e for e in self.ledger
                if all(value is None or str(getattr(e, key)) == value for key, value in filters.items())]

    async def hang(self) -> None:
        """Never answer (until the simulator stops or max_hang_s passes): the client's timeout fires first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), self.max_hang_s)
