"""pipeline.policy.quiet_hours: windows across midnight, clock changes in every time zone, bad input."""

from __future__ import annotations

import functools
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, available_timezones

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.policy.quiet_hours import known_timezone, parse_clock_time, quiet_until

NEW_YORK = "America/New_York"  # 2024: clocks jump 02:00 -> 03:00 on 10 March, fall 02:00 -> 01:00 on 3 November
LAGOS = "Africa/Lagos"  # UTC+1 all year


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


# --- windows without clock changes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local_now", "expected_local_end"),
    [
        (datetime(2025, 6, 1, 22, 0), datetime(2025, 6, 2, 7, 0)),  # start is inclusive
        (datetime(2025, 6, 1, 23, 30), datetime(2025, 6, 2, 7, 0)),
        (datetime(2025, 6, 2, 0, 0), datetime(2025, 6, 2, 7, 0)),
        (datetime(2025, 6, 2, 6, 59), datetime(2025, 6, 2, 7, 0)),
        (datetime(2025, 6, 2, 7, 0), None),  # end is exclusive
        (datetime(2025, 6, 2, 12, 0), None),
        (datetime(2025, 6, 2, 21, 59), None),
    ],
)
def test_a_window_across_midnight_holds_from_start_until_end_the_next_morning(
    local_now: datetime, expected_local_end: datetime | None
) -> None:
    lagos = ZoneInfo(LAGOS)
    result = quiet_until(local_now.replace(tzinfo=lagos), LAGOS, "22:00", "07:00")
    expected = None if expected_local_end is None else expected_local_end.replace(tzinfo=lagos).astimezone(UTC)
    assert result == expected


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (utc(2025, 6, 1, 12, 59), None),
        (utc(2025, 6, 1, 13, 0), utc(2025, 6, 1, 14, 30)),
        (utc(2025, 6, 1, 14, 29), utc(2025, 6, 1, 14, 30)),
        (utc(2025, 6, 1, 14, 30), None),
    ],
)
def test_a_window_within_one_day_holds_between_start_and_end(now: datetime, expected: datetime | None) -> None:
    assert quiet_until(now, "UTC", "13:00", "14:30") == expected


@pytest.mark.parametrize("moment", [utc(2025, 1, 1, 0, 0), utc(2025, 1, 1, 22, 0), utc(2025, 7, 4, 9, 17)])
def test_equal_start_and_end_mean_no_quiet_hours(moment: datetime) -> None:
    assert quiet_until(moment, "UTC", "22:00", "22:00") is None


def test_the_result_is_in_utc_whatever_zone_now_is_given_in() -> None:
    now = datetime(2025, 6, 1, 23, 0, tzinfo=ZoneInfo("Asia/Tokyo"))
    result = quiet_until(now, "Asia/Tokyo", "22:00", "07:00")
    assert result is not None
    assert result.tzinfo is UTC
    assert result == utc(2025, 6, 1, 22, 0)  # 07:00 in Tokyo (UTC+9)


# --- clock changes --------------------------------------------------------------------------------------------------


def test_an_end_time_skipped_by_spring_forward_ends_the_window_when_the_clock_jumps() -> None:
    # 02:30 does not exist on 10 March 2024 in New York; the first instant after it is 03:00 EDT = 07:00 UTC.
    now = utc(2024, 3, 10, 6, 0)  # 01:00 EST
    assert quiet_until(now, NEW_YORK, "22:00", "02:30") == utc(2024, 3, 10, 7, 0)


def test_a_start_time_skipped_by_spring_forward_starts_the_window_when_the_clock_jumps() -> None:
    assert quiet_until(utc(2024, 3, 10, 6, 59, 59), NEW_YORK, "02:30", "06:00") is None  # 01:59:59 EST
    assert quiet_until(utc(2024, 3, 10, 7, 0), NEW_YORK, "02:30", "06:00") == utc(2024, 3, 10, 10, 0)


def test_an_end_time_repeated_by_fall_back_ends_the_window_at_its_second_occurrence() -> None:
    # 01:30 happens twice on 3 November 2024 in New York: 05:30 UTC (EDT) and 06:30 UTC (EST).
    between_the_two = utc(2024, 11, 3, 5, 45)  # 01:45 EDT, after the first 01:30
    assert quiet_until(between_the_two, NEW_YORK, "22:00", "01:30") == utc(2024, 11, 3, 6, 30)
    assert quiet_until(utc(2024, 11, 3, 6, 30), NEW_YORK, "22:00", "01:30") is None


def test_a_start_time_repeated_by_fall_back_starts_the_window_at_its_first_occurrence() -> None:
    first_0140 = utc(2024, 11, 3, 5, 40)  # 01:40 EDT; 01:30 EDT (the first 01:30) has passed
    assert quiet_until(first_0140, NEW_YORK, "01:30", "06:00") == utc(2024, 11, 3, 11, 0)  # 06:00 EST


def test_a_window_across_a_skipped_day_ends_at_the_first_instant_after_it() -> None:
    # Samoa skipped 30 December 2011 (UTC-10 -> UTC+14): 29 Dec 23:59:59 was followed by 31 Dec 00:00.
    now = utc(2011, 12, 30, 9, 0)  # 29 December 23:00 local
    assert quiet_until(now, "Pacific/Apia", "22:00", "07:00") == utc(2011, 12, 30, 10, 0)  # 31 Dec 00:00 local


def test_a_half_hour_clock_change_is_handled_like_any_other() -> None:
    # Lord Howe Island moves 30 minutes: 02:00 -> 02:30 local on 6 October 2024 (UTC+10:30 -> UTC+11).
    now = datetime(2024, 10, 6, 1, 0, tzinfo=ZoneInfo("Australia/Lord_Howe"))
    assert quiet_until(now, "Australia/Lord_Howe", "23:00", "02:15") == utc(2024, 10, 5, 15, 30)  # 02:30 local


# --- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Mars/Olympus_Mons", "", "America", "../etc/passwd", "utc", "Europe/London "])
def test_an_unknown_time_zone_is_reported_and_quiet_hours_fall_back_to_utc(name: str) -> None:
    assert known_timezone(name) is None
    now = utc(2025, 6, 1, 23, 0)
    assert quiet_until(now, name, "22:00", "07:00") == utc(2025, 6, 2, 7, 0)


def test_a_known_time_zone_is_found() -> None:
    assert known_timezone(LAGOS) == ZoneInfo(LAGOS)


@pytest.mark.parametrize("text", ["7:00", "24:00", "12:60", "ab:cd", "12:00:00", "", " 12:00", "1\uff12:3\uff10"])
def test_a_clock_time_that_is_not_hh_mm_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="HH:MM"):
        parse_clock_time(text)
    with pytest.raises(ValueError, match="HH:MM"):
        quiet_until(utc(2025, 1, 1), "UTC", text, "07:00")


def test_clock_times_parse_to_hours_and_minutes() -> None:
    assert parse_clock_time("00:00") == time(0, 0)
    assert parse_clock_time("23:59") == time(23, 59)


def test_a_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        quiet_until(datetime(2025, 1, 1, 23, 0), "UTC", "22:00", "07:00")


# --- properties over every time zone, around clock changes --------------------------------------------------------

ZONES = sorted(available_timezones())
SCAN_FROM, SCAN_TO = utc(2010, 1, 1), utc(2030, 1, 1)


def wall(instant: datetime, zone: ZoneInfo) -> datetime:
    return instant.astimezone(zone).replace(tzinfo=None)


def offset(instant: datetime, zone: ZoneInfo) -> timedelta:
    shift = instant.astimezone(zone).utcoffset()
    assert shift is not None
    return shift


@functools.cache
def clock_changes(name: str) -> tuple[datetime, ...]:
    """The instants (whole seconds, UTC) at which the zone's offset changes between SCAN_FROM and SCAN_TO."""
    zone, found, day = ZoneInfo(name), [], timedelta(days=1)
    instant = SCAN_FROM
    while instant < SCAN_TO:
        if offset(instant, zone) != offset(instant + day, zone):
            before, after = int(instant.timestamp()), int((instant + day).timestamp())
            while after - before > 1:
                middle = (before + after) // 2
                if offset(datetime.fromtimestamp(middle, UTC), zone) == offset(instant, zone):
                    before = middle
                else:
                    after = middle
            found.append(datetime.fromtimestamp(after, UTC))
        instant += day
    return tuple(found)


def minute_of(moment: datetime) -> time:
    return moment.time().replace(second=0, microsecond=0)


@st.composite
def cases(draw: st.DrawFn) -> tuple[datetime, str, time, time]:
    """(now, zone, start, end): half the time close to one of the zone's clock changes, with the window's start
    and end near the local times the change skips or repeats."""
    name = draw(st.sampled_from(ZONES))
    zone = ZoneInfo(name)
    any_time = st.builds(time, st.integers(0, 23), st.integers(0, 59))
    changes = clock_changes(name)
    near_a_change = draw(st.booleans())
    if changes and near_a_change:
        change = draw(st.sampled_from(changes))
        now = change + timedelta(seconds=draw(st.integers(-30 * 3600, 30 * 3600)))
        local_change = wall(change, zone)
        near_change = st.integers(-90, 90).map(lambda minutes: minute_of(local_change + timedelta(minutes=minutes)))
        start, end = draw(st.one_of(any_time, near_change)), draw(st.one_of(any_time, near_change))
    else:
        now = draw(st.datetimes(datetime(2000, 1, 1), datetime(2040, 1, 1), timezones=st.just(UTC)))
        start, end = draw(any_time), draw(any_time)
    return now, name, start, end


def hhmm(clock: time) -> str:
    return clock.strftime("%H:%M")


def is_local_end(result: datetime, zone: ZoneInfo, end: time) -> bool:
    """The clock reads `end` at `result`, or `end` does not exist that day and the clock jumps past it there."""
    if minute_of(wall(result, zone)) == end and wall(result, zone).second == 0:
        return True
    just_before, at = wall(result - timedelta(seconds=1), zone), wall(result, zone)
    return any(just_before < datetime.combine(day, end) < at for day in (at.date(), at.date() - timedelta(days=1)))


@settings(max_examples=400, deadline=None)
@given(cases())
def test_quiet_until_is_later_than_now_and_at_the_local_end_time(case: tuple[datetime, str, time, time]) -> None:
    now, name, start, end = case
    result = quiet_until(now, name, hhmm(start), hhmm(end))
    if result is not None:
        zone = ZoneInfo(name)
        assert result > now
        assert is_local_end(result, zone, end)
        # A window lasts under 24 h of local clock time, so at most 24 h plus what clock changes add; its start
        # lies in the 25 h before now.
        span = [now - timedelta(hours=hours) for hours in range(26)] + [result]
        shifts = {offset(instant, zone) for instant in span}
        assert result - now <= timedelta(hours=24) + (max(shifts) - min(shifts))


@settings(max_examples=200, deadline=None)
@given(cases(), st.floats(0, 1))
def test_nothing_is_released_before_the_window_ends(case: tuple[datetime, str, time, time], share: float) -> None:
    now, name, start, end = case
    result = quiet_until(now, name, hhmm(start), hhmm(end))
    if result is not None:
        later = now + (result - now) * share
        if later < result:
            still = quiet_until(later, name, hhmm(start), hhmm(end))
            assert still is not None
            assert still >= result


@settings(max_examples=400, deadline=None)
@given(cases())
def test_away_from_clock_changes_the_window_is_the_local_clock_interval(case: tuple[datetime, str, time, time]) -> None:
    now, name, start, end = case
    zone = ZoneInfo(name)
    if len({offset(now + timedelta(hours=h), zone) for h in range(-26, 27)}) > 1:
        return  # covered by the properties above
    clock = wall(now, zone).time()
    inside = start <= clock < end if start < end else (clock >= start or clock < end) and start != end
    result = quiet_until(now, name, hhmm(start), hhmm(end))
    if not inside:
        assert result is None
    else:
        assert result is not None
        assert wall(result, zone).time() == end
        assert result - now <= timedelta(hours=24)


@settings(max_examples=100, deadline=None)
@given(st.datetimes(datetime(2000, 1, 1), datetime(2040, 1, 1), timezones=st.just(UTC)), st.sampled_from(ZONES))
def test_equal_start_and_end_are_never_quiet_in_any_zone(now: datetime, name: str) -> None:
    assert quiet_until(now, name, "03:15", "03:15") is None


def test_the_scan_for_clock_changes_finds_them() -> None:
    # guards the property tests above: without found changes they would only test quiet days
    changes = clock_changes(NEW_YORK)
    assert utc(2024, 3, 10, 7, 0) in changes
    assert utc(2024, 11, 3, 6, 0) in changes
    assert clock_changes("Asia/Tokyo") == ()
    assert date(2011, 12, 30) in {change.date() for change in clock_changes("Pacific/Apia")}
