"""Rate-limit policy: named per-user sliding-window rules, loaded strictly from infra/policies/rate_limits.toml.

Pure (no I/O beyond reading the file): parsing, matching a delivery to its rules, and naming the Redis keys.
The Redis side lives in pipeline/state/ratelimit.py.

Keys are `rl:<rule>:{<user>}` or, for a per-channel rule, `rl:<rule>:{<user>}:<channel>`. The braces around the
user id are a Redis Cluster hash tag: all windows of one user land in one slot, so the single Lua script that checks
them all stays legal on a cluster (a multi-key script across slots fails with CROSSSLOT).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from pipeline.config import REPO_ROOT
from pipeline.domain import CHANNELS, LANE_OF_TYPE, LANES, NOTIFICATION_TYPES, Channel, Lane, NotificationType
from pipeline.errors import NotifyError

DEFAULT_POLICY_PATH: Final[Path] = REPO_ROOT / "infra" / "policies" / "rate_limits.toml"

# Rule names go into Redis keys between ':' separators.
_RULE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_RULE_KEYS: Final[frozenset[str]] = frozenset({"description", "match", "limit", "window_s", "per_channel"})
_MATCH_KEYS: Final[frozenset[str]] = frozenset({"channels", "types", "class"})

_T = TypeVar("_T", bound=str)


class RatePolicyError(NotifyError):
    """The rate-limit policy file is unreadable, or declares an unknown key or a bad value."""


@dataclass(frozen=True)
class Rule:
    """One sliding window per user (and per channel when `per_channel`). A None criterion matches anything."""

    name: str
    limit: int
    window_s: int
    channels: frozenset[Channel] | None = None
    notification_types: frozenset[NotificationType] | None = None
    lane: Lane | None = None
    per_channel: bool = False
    description: str = ""

    @property
    def window_ms(self) -> int:
        return self.window_s * 1000

    def matches(self, *, channel: str, notification_type: str, lane: str) -> bool:
        return ((self.channels is None or channel in self.channels)
                and (self.notification_types is None or notification_type in self.notification_types)
                and (self.lane is None or lane == self.lane))

    def key(self, *, user_id: str, channel: str) -> str:
        """The Redis key of this rule's window for one user (and channel)."""
        if not user_id:
            raise ValueError("a rate-limit key needs a user id")
        base = f"rl:{self.name}:{{{user_id}}}"
        return f"{base}:{channel}" if self.per_channel else base


@dataclass(frozen=True)
class RatePolicy:
    rules: tuple[Rule, ...]
    source: str = "<string>"

    def rule(self, name: str) -> Rule:
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(name)


def rules_for(policy: RatePolicy, *, channel: str, notification_type: str, lane: str) -> tuple[Rule, ...]:
    """The rules a delivery counts against, in policy order (the order decides which full rule is reported)."""
    return tuple(r for r in policy.rules
                 if r.matches(channel=channel, notification_type=notification_type, lane=lane))


def load_policy(path: Path | str | None = None) -> RatePolicy:
    """Read and check a policy file (default: infra/policies/rate_limits.toml); RatePolicyError if it is wrong."""
    policy_path = Path(path) if path is not None else DEFAULT_POLICY_PATH
    try:
        text = policy_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RatePolicyError(f"cannot read rate-limit policy {policy_path}: {exc.strerror or exc}") from None
    return parse_policy(text, source=str(policy_path))


def parse_policy(text: str, *, source: str = "<string>") -> RatePolicy:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RatePolicyError(f"{source}: not valid TOML: {exc}") from None
    _reject_unknown(document, frozenset({"rules"}), source)
    rules_table = document.get("rules")
    if not isinstance(rules_table, dict) or not rules_table:
        raise RatePolicyError(f"{source}: declares no rules; expected [rules.<name>] tables")
    rules = tuple(_parse_rule(name, body, source) for name, body in rules_table.items())
    return RatePolicy(rules=rules, source=source)


def _parse_rule(name: str, body: Any, source: str) -> Rule:
    where = f"{source}: rules.{name}"
    if not _RULE_NAME.match(name):
        raise RatePolicyError(f"{where}: a rule name is lower case letters, digits and '_' (it goes into Redis keys)")
    if not isinstance(body, dict):
        raise RatePolicyError(f"{where}: must be a table")
    _reject_unknown(body, _RULE_KEYS, where)
    match = body.get("match")
    if not isinstance(match, dict) or not match:
        raise RatePolicyError(f"{where}.match: required, a table with at least one of {', '.join(sorted(_MATCH_KEYS))}")
    _reject_unknown(match, _MATCH_KEYS, f"{where}.match")
    description = body.get("description", "")
    if not isinstance(description, str):
        raise RatePolicyError(f"{where}.description: must be a string")
    per_channel = body.get("per_channel", False)
    if not isinstance(per_channel, bool):
        raise RatePolicyError(f"{where}.per_channel: must be true or false, not {per_channel!r}")
    rule = Rule(
        name=name,
        limit=_positive_int(body, "limit", where),
        window_s=_positive_int(body, "window_s", where),
        channels=_choices(match, "channels", CHANNELS, f"{where}.match"),
        notification_types=_choices(match, "types", NOTIFICATION_TYPES, f"{where}.match"),
        lane=_lane(match, f"{where}.match"),
        per_channel=per_channel,
        description=description,
    )
    # A typo such as types = ["otp"] with class = "bulk" would silently limit nothing.
    if rule.notification_types is not None and rule.lane is not None and not any(
            LANE_OF_TYPE[t] == rule.lane for t in rule.notification_types):
        raise RatePolicyError(f"{where}.match: none of the types {sorted(rule.notification_types)} is in "
                              f"class {rule.lane!r}, so the rule could never match")
    return rule


def _reject_unknown(table: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise RatePolicyError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def _positive_int(table: Mapping[str, Any], key: str, where: str) -> int:
    if key not in table:
        raise RatePolicyError(f"{where}.{key}: required, a positive integer")
    value = table[key]
    # bool is an int in Python; `limit = true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RatePolicyError(f"{where}.{key}: must be a positive integer, not {value!r}")
    return value


def _choices(table: Mapping[str, Any], key: str, allowed: tuple[_T, ...], where: str) -> frozenset[_T] | None:
    if key not in table:
        return None
    values = table[key]
    if not isinstance(values, list) or not values:
        raise RatePolicyError(f"{where}.{key}: must be a non-empty list, one or more of {', '.join(allowed)}")
    chosen: set[_T] = set()
    for value in values:
        if value not in allowed:
            raise RatePolicyError(f"{where}.{key}: unknown value {value!r}; known: {', '.join(allowed)}")
        chosen.add(allowed[allowed.index(value)])
    return frozenset(chosen)


def _lane(table: Mapping[str, Any], where: str) -> Lane | None:
    if "class" not in table:
        return None
    value = table["class"]
    for lane in LANES:
        if value == lane:
            return lane
    raise RatePolicyError(f"{where}.class: must be one of {', '.join(LANES)}, not {value!r}")
