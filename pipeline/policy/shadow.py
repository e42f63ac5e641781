"""Shadow comparisons: what the primary and the candidate made of the same message, and a report over many.

Pure: the sender builds one `ShadowResult` per mirrored message (a `side` each), buffers them and writes them in one
statement per flush (table `shadow_results`); `notify shadow report` reads a window of them back and `summarise`s
them per channel and (primary, candidate) pair.

SMS formatting, as a carrier bills it: a text of the GSM-7 basic alphabet and its extension table (whose characters
take two septets) fits 160 septets in one segment and 153 per segment when split; one character outside GSM-7 (an
emoji, Cyrillic, a Naira sign) turns the whole text into UCS-2, 70 UTF-16 units in one segment, 67 when split (an
astral character such as an emoji takes two units); a character is never split across two segments.

Each side's figures are those of the text that provider sends. Neither of our SMS connectors rewrites a body:
Twilio's Smart Encoding (replacing curly quotes, dashes and the like by GSM-7 look-alikes) is a Messaging Service
option our connector does not use, and Termii gets `type: plain` with the body as it is. So both sides see the same
text today, and the formatting columns show equal figures per side; a provider that transliterates gets its table
in `TRANSLITERATION`, and its differences in encoding and segments then show up in the report.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pipeline.policy.sms import Encoding, encoding, segments, units

# provider -> {character: replacement} for a provider that rewrites SMS text before it sends it (none of ours does;
# see the module docstring).
TRANSLITERATION: Final[Mapping[str, Mapping[str, str]]] = {}
ACCEPTED: Final = "accepted"


def as_sent(provider: str, text: str) -> str:
    """The text `provider` puts on the air for `text` (its transliteration applied, if it has one)."""
    table = TRANSLITERATION.get(provider)
    return text if not table else "".join(table.get(c, c) for c in text)


@dataclass(frozen=True)
class Side:
    """One provider's part of a comparison: what it answered, how fast, and how it would format the message."""

    provider: str
    outcome: str  # accepted, permanent, transient, ambiguous; `error` when the call itself raised
    code: str | None  # the error code (the provider's, else our reason); None when accepted
    latency_ms: float
    encoding: Encoding | None  # SMS only
    segments: int | None  # SMS only
    length: int  # SMS: units as counted for its encoding; other channels: characters

    @property
    def accepted(self) -> bool:
        return self.outcome == ACCEPTED


def side(provider: str, channel: str, body: str, *, outcome: str, code: str | None, latency_s: float) -> Side:
    """A Side for `body` as `provider` sends it on `channel`."""
    if channel != "sms":
        return Side(provider, outcome, None if outcome == ACCEPTED else code, latency_s * 1000, None, None,
                    len(body))
    text = as_sent(provider, body)
    return Side(provider, outcome, None if outcome == ACCEPTED else code, latency_s * 1000, encoding(text),
                segments(text), units(text))


@dataclass(frozen=True)
class ShadowResult:
    """One mirrored message: the live provider's call and the candidate's test-mode call of the same message."""

    notification_id: str
    channel: str
    lane: str
    primary: Side
    candidate: Side

    @property
    def encoding_differs(self) -> bool:
        return self.primary.encoding != self.candidate.encoding

    @property
    def segments_differ(self) -> bool:
        return self.primary.segments != self.candidate.segments


def is_mirrored(notification_id: str, share: float) -> bool:
    """Whether a notification belongs to the mirrored share: a stable draw from its id (the same on every worker,
    retry and fallback), so a notification is compared on every call or on none."""
    draw = int.from_bytes(hashlib.blake2b(notification_id.encode(), digest_size=8).digest(), "big") / 2**64
    return draw < share


def shadow_columns(results: Sequence[ShadowResult]) -> dict[str, list[Any]]:
    """The comparisons as one array per column of shadow_results (the sender's one INSERT ... unnest)."""
    columns: dict[str, list[Any]] = {"notification_ids": [r.notification_id for r in results],
                                     "channels": [r.channel for r in results], "lanes": [r.lane for r in results]}
    for prefix, sides in (("primary", [r.primary for r in results]), ("candidate", [r.candidate for r in results])):
        columns |= {f"{prefix}_providers": [x.provider for x in sides],
                    f"{prefix}_outcomes": [x.outcome for x in sides], f"{prefix}_codes": [x.code for x in sides],
                    f"{prefix}_latencies_ms": [x.latency_ms for x in sides],
                    f"{prefix}_encodings": [x.encoding for x in sides],
                    f"{prefix}_segments": [x.segments for x in sides], f"{prefix}_lengths": [x.length for x in sides]}
    return columns


SINCE_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str) -> datetime.timedelta:
    """`--since` as a window back from now: a number and a unit (s, m, h, d, w), e.g. 24h, 30m, 7d."""
    text = text.strip().lower()
    number, unit = text[:-1], text[-1:]
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if unit not in SINCE_UNITS or not amount > 0:
        raise ValueError(f"{text!r}: expected a number and a unit (s, m, h, d, w), e.g. 24h")
    return datetime.timedelta(seconds=amount * SINCE_UNITS[unit])


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation between the closest ranks (PostgreSQL's percentile_cont);
    None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


QUANTILES: Final = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    return {name: _round(percentile(latencies_ms, q)) for name, q in QUANTILES}


@dataclass
class _Pair:
    mirrored: int = 0
    accepted: list[int] = field(default_factory=lambda: [0, 0])  # primary, candidate
    latencies: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))
    segments: list[int] = field(default_factory=lambda: [0, 0])
    encodings: tuple[collections.Counter[str], collections.Counter[str]] = field(
        default_factory=lambda: (collections.Counter(), collections.Counter()))
    encoding_differs: int = 0
    segments_differ: int = 0
    errors: tuple[collections.Counter[str], collections.Counter[str]] = field(
        default_factory=lambda: (collections.Counter(), collections.Counter()))


def summarise(results: Iterable[ShadowResult], *, top_errors: int = 5) -> list[dict[str, Any]]:
    """Per channel and (primary, candidate) pair: how many were mirrored, each side's acceptance rate and latency
    percentiles (ms) and the candidate's minus the primary's, formatting differences (messages whose encoding or
    segment count differ, each side's segment total) and the top error codes of each side. Sorted by channel, then
    most mirrored first."""
    pairs: dict[tuple[str, str, str], _Pair] = collections.defaultdict(_Pair)
    for result in results:
        pair = pairs[(result.channel, result.primary.provider, result.candidate.provider)]
        pair.mirrored += 1
        pair.encoding_differs += result.encoding_differs
        pair.segments_differ += result.segments_differ
        for i, one in enumerate((result.primary, result.candidate)):
            pair.accepted[i] += one.accepted
            pair.latencies[i].append(one.latency_ms)
            pair.segments[i] += one.segments or 0
            if one.encoding is not None:
                pair.encodings[i][one.encoding] += 1
            if not one.accepted:
                pair.errors[i][one.code or one.outcome] += 1
    out = []
    for (channel, primary, candidate), pair in pairs.items():
        sides: list[dict[str, Any]] = []
        for i, name in enumerate((primary, candidate)):
            sides.append({
                "provider": name, "accepted": pair.accepted[i],
                "acceptance_rate": round(pair.accepted[i] / pair.mirrored, 4),
                "latency_ms": latency_summary(pair.latencies[i]),
                "segments": pair.segments[i] if channel == "sms" else None,
                "encodings": dict(sorted(pair.encodings[i].items())),
                "top_errors": [[code, n] for code, n in _top(pair.errors[i], top_errors)],
            })
        p, c = sides[0]["latency_ms"], sides[1]["latency_ms"]
        out.append({
            "channel": channel, "primary": sides[0], "candidate": sides[1], "mirrored": pair.mirrored,
            "acceptance_rate_difference": round(sides[1]["acceptance_rate"] - sides[0]["acceptance_rate"], 4),
            "latency_difference_ms": {name: _round(c[name] - p[name]) if c[name] is not None and p[name] is not None
                                      else None for name, _ in QUANTILES},
            "formatting": {"encoding_differs": pair.encoding_differs, "segments_differ": pair.segments_differ,
                           "transliterates": sorted(n for n in (primary, candidate) if TRANSLITERATION.get(n))},
        })
    out.sort(key=lambda r: (r["channel"], -r["mirrored"], r["primary"]["provider"], r["candidate"]["provider"]))
    return out


def render_table(report: Sequence[Mapping[str, Any]], *, since: str) -> str:
    """The report for people: one block per channel and pair."""
    if not report:
        return f"no shadow results in the last {since} (is NOTIFY_SHADOW set on the senders?)"
    lines = [f"shadow comparisons, last {since}"]
    for pair in report:
        p, c = pair["primary"], pair["candidate"]
        lines += ["", f"{pair['channel']}: {p['provider']} (primary) vs {c['provider']} (candidate), "
                      f"{pair['mirrored']} mirrored",
                  f"  {'':22}{p['provider']:>14}{c['provider']:>14}{'difference':>14}",
                  f"  {'accepted':22}{_pct(p['acceptance_rate']):>14}{_pct(c['acceptance_rate']):>14}"
                  f"{_signed_pct(pair['acceptance_rate_difference']):>14}"]
        for name, _ in QUANTILES:
            lines.append(f"  {'latency ' + name + ' (ms)':22}{_ms(p['latency_ms'][name]):>14}"
                         f"{_ms(c['latency_ms'][name]):>14}{_ms(pair['latency_difference_ms'][name], True):>14}")
        if pair["channel"] == "sms":
            fmt = pair["formatting"]
            lines += [f"  {'segments (total)':22}{p['segments']:>14}{c['segments']:>14}"
                      f"{c['segments'] - p['segments']:>+14}",
                      f"  {'encodings':22}{_encodings(p['encodings']):>14}{_encodings(c['encodings']):>14}",
                      f"  formatting differs: {fmt['encoding_differs']} in encoding, {fmt['segments_differ']} in "
                      f"segment count" + (f" ({', '.join(fmt['transliterates'])} rewrites text)"
                                          if fmt["transliterates"] else " (no provider rewrites the text)")]
        errors = ", ".join(f"{code} x{n}" for code, n in c["top_errors"]) or "none"
        lines.append(f"  candidate's top errors: {errors}")
    return "\n".join(lines)


def _top(counter: collections.Counter[str], n: int) -> list[tuple[str, int]]:
    return sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _pct(rate: float) -> str:
    return f"{rate * 100:.1f}%"


def _signed_pct(rate: float) -> str:
    return f"{rate * 100:+.1f} pt"


def _ms(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def _encodings(counts: Mapping[str, int]) -> str:
    return " ".join(f"{name}:{n}" for name, n in counts.items()) or "-"
