"""Quiet hours: is a moment inside a user's daily quiet window, and if so, when does the window end?

A window is a pair of local clock times in the user's IANA time zone, start inclusive and end exclusive; an
end before the start spans midnight (22:00-07:00), and start == end means no quiet hours at all.

Clock changes are resolved so that a window is never cut short (nothing is released early):
- a local time that occurs twice (fall-back) starts the window at its earlier occurrence and ends it at its
  later one;
- a local time that does not exist (spring-forward gap) resolves to the first instant after it, the moment the
  clock jumps past it.
So a window can last up to 24 h plus the repeated hour of a fall-back day, and quiet_until() can return an
instant that far ahead, never further.

An unknown time zone name falls back to UTC: quiet hours are still honoured, at UTC clock times. Callers that
want to report it check known_timezone(name) first.

Pure functions, no I/O (zoneinfo reads the system's tz database once per zone and caches it).
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_CLOCK_TIME = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")  # [0-9], not \d: no other scripts' digits


def parse_clock_time(text: str) -> time:
    """A local clock time in the form HH:MM (24 h, two digits each); ValueError for anything else."""
    match = _CLOCK_TIME.match(text)
    if match is None:
        raise ValueError(f"not a clock time HH:MM (00:00-23:59): {text!r}")
    return time(int(match[1]), int(match[2]))


def known_timezone(name: str) -> ZoneInfo | None:
    """The IANA time zone called `name`, or None when there is none (unknown, malformed or a folder name)."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def quiet_until(now_utc: datetime, timezone: str, start: str, end: str) -> datetime | None:
    """None when `now_utc` is outside the quiet window `start`-`end` (HH:MM, local to `timezone`); otherwise the
    instant (UTC) the window ends.

    `now_utc` must be timezone-aware (ValueError otherwise); `start` and `end` must be HH:MM (ValueError).
    If two windows overlap around a clock change, the later end is returned, so the result is never inside a
    window.
    """
    if now_utc.tzinfo is None or now_utc.utcoffset() is None:
        raise ValueError("now_utc must be a timezone-aware datetime")
    start_time, end_time = parse_clock_time(start), parse_clock_time(end)
    if start_time == end_time:
        return None
    zone: tzinfo = known_timezone(timezone) or UTC
    now = now_utc.astimezone(UTC)
    today = _wall_clock(now, zone).date()
    # Yesterday's window may still be running; the days either side only matter when a clock change moves the
    # local date backwards, and cost four conversions.
    ends = [
        window_end
        for start_day in (today + timedelta(days=shift) for shift in (-2, -1, 0, 1))
        for window_start, window_end in [_window(start_day, start_time, end_time, zone)]
        if window_start <= now < window_end
    ]
    return max(ends, default=None)


def _window(start_day: date, start: time, end: time, zone: tzinfo) -> tuple[datetime, datetime]:
    """The UTC instants of the window that starts on local date `start_day`."""
    end_day = start_day if end > start else start_day + timedelta(days=1)
    return (
        _instant(datetime.combine(start_day, start), zone, later=False),
        _instant(datetime.combine(end_day, end), zone, later=True),
    )


def _wall_clock(instant: datetime, zone: tzinfo) -> datetime:
    """What a clock in `zone` reads at `instant`, as a naive datetime."""
    return instant.astimezone(zone).replace(tzinfo=None)


def _instant(wall: datetime, zone: tzinfo, *, later: bool) -> datetime:
    """The UTC instant at which the clock in `zone` reads `wall` (naive, whole seconds).

    Read twice (fall-back): the later reading if `later`, else the earlier. Never read (spring-forward gap): the
    first instant after, when the clock jumps past `wall`.
    """
    # fold=0 and fold=1 apply the offsets before and after a clock change; outside one they agree.
    readings = {wall.replace(tzinfo=zone, fold=fold).astimezone(UTC) for fold in (0, 1)}
    exact = [instant for instant in readings if _wall_clock(instant, zone) == wall]
    if exact:
        return max(exact) if later else min(exact)
    # In a gap: the clock reads before `wall` at the earlier reading and past it at the later one. Clock changes
    # happen on whole seconds, so a search over whole seconds finds the jump exactly.
    before, after = int(min(readings).timestamp()), int(max(readings).timestamp())
    while after - before > 1:
        middle = (before + after) // 2
        if _wall_clock(datetime.fromtimestamp(middle, UTC), zone) >= wall:
            after = middle
        else:
            before = middle
    return datetime.fromtimestamp(after, UTC)
