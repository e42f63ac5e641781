"""Latest wins, decided without a broker: which task a newer notification of its collapse key replaces."""

from __future__ import annotations

import datetime
from typing import Any

from pipeline.policy.latest import collapse_group, is_superseded

T0 = datetime.datetime(2026, 12, 4, 12, 0, tzinfo=datetime.UTC)


def alert(nid: str, at: datetime.datetime, kind: str = "price_alert", key: str | None = "BTC") -> dict[str, Any]:
    return {"notification_id": nid, "user_id": "u1", "type": kind, "collapse_key": key, "created_at": at}


def test_an_older_alert_of_the_same_key_is_superseded_the_latest_is_not() -> None:
    older, newer = alert("a", T0), alert("b", T0 + datetime.timedelta(seconds=5))
    latest = (newer["created_at"], "b")
    assert is_superseded(older, latest) and not is_superseded(newer, latest)
    assert not is_superseded(older, None)  # nothing newer found


def test_the_id_breaks_a_tie_of_creation_times() -> None:
    first, second = alert("a", T0), alert("b", T0)
    assert is_superseded(first, (T0, "b")) and not is_superseded(second, (T0, "b"))


def test_critical_types_and_tasks_without_a_key_never_collapse() -> None:
    newer = (T0 + datetime.timedelta(minutes=1), "z")
    assert collapse_group(alert("a", T0, kind="otp")) is None and not is_superseded(alert("a", T0, kind="otp"), newer)
    assert collapse_group(alert("a", T0, key=None)) is None and collapse_group(alert("a", T0, key="")) is None
    assert collapse_group(alert("a", T0)) == ("u1", "price_alert", "BTC")
