"""How each setting's text becomes a value: one parser per kind, raising ValueError with what was expected."""

from __future__ import annotations

import itertools

from pipeline.domain import CHANNELS, PROVIDERS


def port(raw: str) -> int:
    port = int(raw)
    if not 0 < port < 65536:
        raise ValueError(f"{port} is not a TCP port")
    return port


def positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError(f"{value} is not a positive integer")
    return value


def non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(f"{value} is negative")
    return value


def positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError(f"{value} is not a positive number")
    return value


def broker_count(raw: str) -> int:
    value = int(raw)
    if not 1 <= value <= 9:
        raise ValueError(f"{value}: the local stack runs 1 to 9 Kafka nodes")
    return value


def url(raw: str) -> str:
    if not raw.startswith(("http://", "https://")):
        raise ValueError(f"{raw!r} is not an http(s) URL")
    return raw.rstrip("/")


def heap(raw: str) -> str:
    if not raw[:-1].isdigit() or raw[-1].lower() not in "mg":
        raise ValueError(f"{raw!r} is not a JVM heap size such as 512m or 1g")
    return raw


def topic_prefix(raw: str) -> str:
    if raw and not all(c.isalnum() or c in "._-" for c in raw):
        raise ValueError(f"{raw!r} may only hold letters, digits, '.', '_' and '-'")
    return raw


def database_name(raw: str) -> str:
    # Lower-case, since PostgreSQL folds unquoted names, and at most 63 bytes, its identifier limit.
    if not (0 < len(raw) <= 63 and raw[0].isalpha() and all(c.isascii() and (c.isalnum() or c == "_") for c in raw)
            and raw == raw.lower()):
        raise ValueError(f"{raw!r}: a database name of 1..63 lower-case letters, digits and '_', starting with a "
                         "letter")
    return raw


def providers(raw: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in raw.split(",") if p.strip())
    unknown = [p for p in names if p not in PROVIDERS]
    if not names or unknown:
        raise ValueError(f"{raw!r}: expected provider names from {list(PROVIDERS)}")
    return names


def routing(raw: str) -> tuple[tuple[tuple[str, str], tuple[str, ...]], ...]:
    """`sms.bulk=termii,twilio;sms.+234=termii` -> ((("sms", "+234"), (...)), (("sms", "bulk"), (...))).

    Pairs rather than a dict: Settings stays hashable (cached per settings elsewhere)."""
    table: dict[tuple[str, str], tuple[str, ...]] = {}
    for part in filter(None, (p.strip() for p in raw.split(";"))):
        key, sep, value = part.partition("=")
        channel, dot, scope = key.strip().partition(".")
        if not sep or not dot or channel not in CHANNELS or not (
                scope in ("critical", "bulk") or (scope.startswith("+") and scope[1:].isdigit())):
            raise ValueError(f"{part!r}: expected <channel>.<lane>=p1,p2 or <channel>.+<calling code>=p1,p2")
        table[(channel, scope)] = providers(value)
    return tuple(sorted(table.items()))


def shadow(raw: str) -> tuple[tuple[str, tuple[str, float]], ...]:
    """`sms=twilio:0.05` -> (("sms", ("twilio", 0.05)),) (pairs: Settings stays hashable)."""
    out: dict[str, tuple[str, float]] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        channel, sep, value = part.partition("=")
        provider, colon, share = value.partition(":")
        if not sep or not colon or channel.strip() not in CHANNELS:
            raise ValueError(f"{part!r}: expected <channel>=<provider>:<share>")
        fraction = float(share)
        if not 0 < fraction <= 1:
            raise ValueError(f"{part!r}: the share must be in (0, 1]")
        out[channel.strip()] = (providers(provider)[0], fraction)
    return tuple(sorted(out.items()))


def delays(raw: str) -> tuple[float, ...]:
    """`5,15,45` -> (5.0, 15.0, 45.0): one delay per retry tier, each longer than the one before."""
    delays = tuple(positive_float(part.strip()) for part in raw.split(",") if part.strip())
    if not delays or any(b <= a for a, b in itertools.pairwise(delays)):
        raise ValueError("expected positive delays in seconds, each longer than the one before, e.g. 30,120,600")
    return delays


def switch(raw: str) -> bool:
    if raw.lower() not in ("on", "off"):
        raise ValueError(f"{raw!r}: expected on or off")
    return raw.lower() == "on"


def prices(raw: str) -> tuple[tuple[str, float], ...]:
    """`twilio=0.0079,sendgrid=0.00095` -> (("sendgrid", 0.00095), ("twilio", 0.0079)); every provider needs one."""
    prices: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        provider, sep, value = part.partition("=")
        if not sep or provider.strip() not in PROVIDERS or float(value) < 0:
            raise ValueError(f"{part!r}: expected <provider>=<price in USD, 0 or more>")
        prices[provider.strip()] = float(value)
    missing = [p for p in PROVIDERS if p not in prices]
    if missing:
        raise ValueError(f"no price for {', '.join(missing)}")
    return tuple(sorted(prices.items()))
