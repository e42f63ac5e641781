"""Retention: which rows are old enough to delete, and the one rule that bounds it.

A notification's row holds the unique key (user, type, idempotency key) that is intake's last guard against a
duplicate, so it must outlive every record that could bring the same request back: a consumer-offset reset that
re-reads a topic, a DLQ redrive, a quarantine redrive. Those records live as long as the longest time retention
among the pipeline's topics (the replay window). The cut-off for notifications is therefore never later than
`now - replay window - margin`, whatever NOTIFY_RETENTION_DAYS says; a shorter setting is raised to it, and the
plan says so. Only notifications whose every delivery is final go, with their deliveries, attempts and
transitions; a notification still in flight, held or waiting for a digest is kept however old.

The other tables are working state with no such guard in them: shadow comparisons (kept NOTIFY_SHADOW_RETENTION_DAYS),
published settings-outbox rows (kept a day past publication: Kafka holds the value then) and quarantine redrive
markers (kept as long as the quarantine topic keeps the entries they mark, plus the margin).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

DAY = datetime.timedelta(days=1)
MARGIN = DAY  # past the replay window: clock skew, a consumer that was down for a while
OUTBOX_KEEP = DAY  # published user-settings rows: Kafka holds the value now


@dataclass(frozen=True)
class Cutoffs:
    """Rows older than each instant may be deleted."""

    notifications: datetime.datetime  # received_at, of notifications whose deliveries are all final
    shadow_results: datetime.datetime  # created_at
    settings_outbox: datetime.datetime  # published_at (unpublished rows are never deleted)
    quarantine_redrives: datetime.datetime  # redriven_at
    replay_window: datetime.timedelta
    raised: bool  # NOTIFY_RETENTION_DAYS was shorter than the replay window allows

    def describe(self) -> str:
        text = (f"notifications finished and received before {self.notifications:%Y-%m-%d %H:%M} UTC; shadow results "
                f"before {self.shadow_results:%Y-%m-%d %H:%M}; published settings before "
                f"{self.settings_outbox:%Y-%m-%d %H:%M}; quarantine redrive marks before "
                f"{self.quarantine_redrives:%Y-%m-%d %H:%M}")
        if self.raised:
            text += (f" (NOTIFY_RETENTION_DAYS raised to the replay window, {self.replay_window.days} days + "
                     f"{MARGIN.days}: a notification's unique key must outlive any record that can bring it back)")
        return text


def time_retention(configs: Mapping[str, str]) -> datetime.timedelta | None:
    """How long a topic keeps records by time (None: forever, or compaction only)."""
    policy = {p.strip() for p in configs.get("cleanup.policy", "delete").split(",")}
    ms = int(configs.get("retention.ms", "604800000"))  # Kafka's default: 7 days
    if "delete" not in policy or ms < 0:
        return None
    return datetime.timedelta(milliseconds=ms)


def replay_window(topic_configs: Iterable[Mapping[str, str]]) -> datetime.timedelta:
    """The longest time any topic of the pipeline keeps a record: how far back a replay or redrive can reach.
    Topics compacted and never deleted by time (user settings) keep latest values, not requests: left out."""
    kept = [r for configs in topic_configs if (r := time_retention(configs)) is not None]
    return max(kept, default=datetime.timedelta(0))


def cutoffs(now: datetime.datetime, *, retention_days: int, shadow_retention_days: int,
            replay: datetime.timedelta, quarantine_retention: datetime.timedelta | None) -> Cutoffs:
    wanted = datetime.timedelta(days=retention_days)
    floor = replay + MARGIN
    return Cutoffs(
        notifications=now - max(wanted, floor),
        shadow_results=now - datetime.timedelta(days=shadow_retention_days),
        settings_outbox=now - OUTBOX_KEEP,
        quarantine_redrives=now - ((quarantine_retention or replay) + MARGIN),
        replay_window=replay,
        raised=wanted < floor,
    )
