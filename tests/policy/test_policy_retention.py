"""policy.retention: the cut-offs, and the rule that a notification outlives every record that could bring it back."""

from __future__ import annotations

import datetime

import pytest

from pipeline.kafka import topics
from pipeline.policy import retention

NOW = datetime.datetime(2026, 12, 7, 12, 0, tzinfo=datetime.UTC)
DAYS = datetime.timedelta(days=1)


@pytest.mark.parametrize(("configs", "kept"), [
    ({"retention.ms": "1209600000"}, 14 * DAYS),
    ({"cleanup.policy": "compact,delete", "retention.ms": "1209600000"}, 14 * DAYS),
    ({"cleanup.policy": "compact", "retention.ms": "-1"}, None),
    ({"cleanup.policy": "compact"}, None),  # compaction only: latest values, never deleted by time
    ({"retention.ms": "-1"}, None),  # kept forever
    ({}, 7 * DAYS),  # Kafka's default
])
def test_time_retention_reads_what_kafka_deletes_by_time(configs: dict[str, str],
                                                         kept: datetime.timedelta | None) -> None:
    assert retention.time_retention(configs) == kept


def test_the_replay_window_is_the_longest_time_retention_of_the_declared_topics() -> None:
    declared = [spec.configs for spec in topics.catalogue().values()]
    assert retention.replay_window(declared) == 30 * DAYS  # the DLQ and delivery-events keep 30 days
    assert retention.replay_window([{"retention.ms": "3600000"}, {"cleanup.policy": "compact"}]) == DAYS / 24
    assert retention.replay_window([]) == datetime.timedelta(0)


def test_notifications_are_kept_as_configured_when_that_is_past_the_replay_window() -> None:
    cut = retention.cutoffs(NOW, retention_days=365, shadow_retention_days=30, replay=30 * DAYS,
                            quarantine_retention=14 * DAYS)
    assert cut.notifications == NOW - 365 * DAYS
    assert not cut.raised
    assert cut.shadow_results == NOW - 30 * DAYS
    assert cut.settings_outbox == NOW - DAYS
    assert cut.quarantine_redrives == NOW - 15 * DAYS  # the quarantine topic's 14 days and the margin
    assert "raised" not in cut.describe()


def test_a_retention_shorter_than_the_replay_window_is_raised_to_it_and_says_so() -> None:
    cut = retention.cutoffs(NOW, retention_days=7, shadow_retention_days=1, replay=30 * DAYS,
                            quarantine_retention=None)
    assert cut.notifications == NOW - 31 * DAYS  # a replay 30 days back still meets the unique key
    assert cut.raised
    assert "raised to the replay window, 30 days + 1" in cut.describe()
    assert cut.shadow_results == NOW - DAYS  # nothing refers to shadow results: no floor
    assert cut.quarantine_redrives == NOW - 31 * DAYS  # no time retention given: the replay window
