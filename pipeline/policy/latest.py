"""Latest wins: a notification that a newer one of the same user, type and collapse key replaces.

A price alert for BTC that has not gone out yet is worth nothing once a newer BTC alert exists: sending both is
the "twice or stale" the product must not do. The sender asks, just before it claims a batch, for the latest
notification of each (user, type, collapse key) among its tasks, and a task that is not the latest ends
`suppressed` with reason `superseded`. One that was already sent is not recalled (nothing can be). Critical types
never collapse: a newer OTP must not make an older one vanish while the user is typing it.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from pipeline.domain import CRITICAL_TYPES

Latest = tuple[datetime.datetime, str]  # (created_at, notification id) of the latest notification of a key


def collapse_group(task: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """(user, type, collapse key) of a task that collapses; None for one that does not."""
    key = task.get("collapse_key")
    if not key or task.get("type") in CRITICAL_TYPES:
        return None
    return str(task["user_id"]), str(task["type"]), str(key)


def is_superseded(task: Mapping[str, Any], latest: Latest | None) -> bool:
    """Whether a newer notification of the task's group exists: later created, the id breaking a tie."""
    if latest is None or collapse_group(task) is None:
        return False
    return latest > (task["created_at"], str(task["notification_id"]))
