"""topics/ as code: the catalogue, the plan computed without a broker, and apply against the real Kafka."""

from __future__ import annotations

import time
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # public, but re-exported without __all__
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)

from pipeline.config import Settings
from pipeline.errors import TopicSpecError
from pipeline.kafka import clients, topics
from pipeline.kafka.topic_plan import (
    AddPartitions,
    AlterConfig,
    ClusterState,
    ObservedTopic,
    Plan,
    TopicSpec,
    compute_plan,
)

# The topics ARCHITECTURE.md ("Topics") names, per lane and shared.
PER_LANE = ("requests", "accepted", "routed")
SHARED = ("dlq", "invalid", "delivery-events", "receipts", "user-settings")
USER_KEYED = (
    "requests", "accepted", "routed", "send", "retry", "deferred", "user-settings", "delivery-events")


def specs_from(text: str) -> Mapping[str, TopicSpec]:
    return topics.parse(tomllib.loads(text))


SMALL = """
[defaults]
partitions = 4
replication_factor = 3
copartition_group = "user"
[defaults.configs]
"cleanup.policy" = "delete"
"retention.ms" = 1000
"min.insync.replicas" = 2

[topics."requests.bulk"]
description = "requests"
[topics."routed.bulk"]
description = "routed"
[topics."dlq"]
description = "dead letters"
partitions = 1
copartition_group = ""
"""


def observed(spec: TopicSpec, *, partitions: int | None = None, rf: int = 1, **configs: str) -> ObservedTopic:
    """The topic as apply would have made it on a one-broker cluster, with `configs` overridden."""
    values = {**spec.configs, "min.insync.replicas": str(min(spec.min_insync_replicas, rf))}
    values.update({key.replace("_", "."): value for key, value in configs.items()})
    return ObservedTopic(spec.partitions if partitions is None else partitions, rf, values)


def in_sync(specs: Mapping[str, TopicSpec], prefix: str = "", **changed: ObservedTopic) -> ClusterState:
    """A one-broker cluster holding every spec as declared, but the topics in `changed` (_ stands for .)."""
    state = {prefix + name: observed(spec) for name, spec in specs.items()}
    state.update({prefix + name.replace("_", "."): topic for name, topic in changed.items()})
    return ClusterState(broker_count=1, topics=state)


# ---------------------------------------------------------------------------------------------- the catalogue

def test_the_real_topics_file_loads_and_every_topic_has_a_description() -> None:
    catalogue = topics.catalogue()
    assert len(catalogue) >= 24
    assert all(spec.description for spec in catalogue.values())


@pytest.mark.parametrize("lane", topics.LANES)
def test_every_topic_of_the_architecture_exists_for_both_lanes(lane: str) -> None:
    catalogue = topics.catalogue()
    for stage in PER_LANE:
        assert f"{stage}.{lane}" in catalogue
    for channel in topics.CHANNELS:
        assert f"send.{channel}.{lane}" in catalogue
    assert len(topics.retry_topics(lane)) == 3
    for name in SHARED:
        assert name in catalogue


def test_retry_tiers_declare_their_delays_and_critical_waits_less_than_bulk() -> None:
    bulk = [topics.spec(name).delay_s or 0 for name in topics.retry_topics("bulk")]
    critical = [topics.spec(name).delay_s or 0 for name in topics.retry_topics("critical")]
    assert bulk == [30, 120, 600]
    assert 0 < critical[0] < critical[1] < critical[2]
    assert all(c < b for c, b in zip(critical, bulk, strict=True))


def test_user_keyed_topics_are_one_co_partition_group_with_one_partition_count() -> None:
    catalogue = topics.catalogue()
    user = [spec for spec in catalogue.values() if spec.copartition_group == topics.USER_GROUP]
    for spec in catalogue.values():
        if spec.name.split(".")[0] in USER_KEYED:
            assert spec.copartition_group == topics.USER_GROUP, spec.name
    assert len({spec.partitions for spec in user}) == 1
    assert topics.spec("dlq").partitions < user[0].partitions


def test_declared_values_are_the_production_ones() -> None:
    for spec in topics.catalogue().values():
        assert spec.replication_factor == 3, spec.name
        assert spec.min_insync_replicas == 2, spec.name
        assert spec.configs["unclean.leader.election.enable"] == "false"


def test_user_settings_is_compacted_and_kept_forever() -> None:
    configs = topics.spec(topics.USER_SETTINGS).configs
    assert configs["cleanup.policy"] == "compact"
    assert configs["retention.ms"] == "-1"
    assert int(configs["min.compaction.lag.ms"]) > 0
    assert int(configs["segment.ms"]) <= 86_400_000


def test_retention_keeps_events_longer_than_requests() -> None:
    def days(name: str) -> float:
        return int(topics.spec(name).configs["retention.ms"]) / 86_400_000

    assert days("requests.critical") == 7
    assert days(topics.DELIVERY_EVENTS) == days(topics.DLQ) == 30
    assert days(topics.INVALID) == 14


def test_name_helpers_return_declared_names_and_refuse_unknown_lanes_and_channels() -> None:
    assert topics.requests_topic("critical") == "requests.critical"
    assert topics.accepted_topic("bulk") == "accepted.bulk"
    assert topics.routed_topic("bulk") == "routed.bulk"
    assert topics.send_topic("push", "critical") == "send.push.critical"
    assert topics.retry_topics("bulk") == ("retry.bulk.1", "retry.bulk.2", "retry.bulk.3")
    assert topics.dedup_topic("bulk") == "dedup.bulk"
    assert topics.spec("dedup.critical").partitions == topics.spec("requests.critical").partitions
    with pytest.raises(ValueError, match="lane"):
        topics.requests_topic("urgent")
    with pytest.raises(ValueError, match="channel"):
        topics.send_topic("fax", "bulk")
    with pytest.raises(TopicSpecError, match="not declared"):
        topics.spec("requests.nowhere")


def test_a_small_file_merges_defaults_under_each_topic() -> None:
    specs = specs_from(SMALL)
    assert specs["requests.bulk"].partitions == 4
    assert specs["requests.bulk"].configs["retention.ms"] == "1000"
    assert specs["dlq"].copartition_group is None
    assert specs["dlq"].partitions == 1


def test_co_partitioned_topics_with_different_partition_counts_are_refused_by_name() -> None:
    text = SMALL.replace('description = "routed"', 'description = "routed"\npartitions = 8')
    with pytest.raises(TopicSpecError, match=r"'user'.*4: requests\.bulk.*8: routed\.bulk"):
        specs_from(text)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ('description = "routed"\nretention = 5', "unknown key.*retention"),
        ('description = "routed"\nconfigs = { "retention.msx" = 1 }', "not a Kafka topic config"),
        ('description = "routed"\nreplication_factor = 1', "min.insync.replicas 2 exceeds replication"),
        ('description = "routed"\nconfigs = { "cleanup.policy" = "forever" }', "cleanup.policy"),
        ('description = "routed"\ndelay_s = 5', "only retry"),
        ('description = ""', "needs a description"),
    ],
)
def test_inconsistent_declarations_are_refused(edit: str, message: str) -> None:
    with pytest.raises(TopicSpecError, match=message):
        specs_from(SMALL.replace('description = "routed"', edit))


def test_unknown_top_level_tables_are_refused() -> None:
    with pytest.raises(TopicSpecError, match="unknown key"):
        specs_from(SMALL + "\n[topic.typo]\ndescription = 'x'\n")


def test_retry_tiers_need_a_delay_and_must_wait_longer_at_each_tier() -> None:
    tier = '[topics."retry.bulk.{n}"]\ndescription = "t"\n'
    with pytest.raises(TopicSpecError, match="delay_s"):
        specs_from(SMALL + tier.format(n=1))
    with pytest.raises(TopicSpecError, match="longer"):
        specs_from(SMALL + tier.format(n=1) + "delay_s = 60\n" + tier.format(n=2) + "delay_s = 30\n")
    with pytest.raises(TopicSpecError, match=r"numbered 1\.\.n"):
        specs_from(SMALL + tier.format(n=2) + "delay_s = 60\n")


def test_a_file_that_is_not_toml_is_a_spec_error(tmp_path: Path) -> None:
    broken = tmp_path / "topics.toml"
    broken.write_text("[defaults\n")
    with pytest.raises(TopicSpecError, match=str(broken)):
        topics.load(broken)


# ---------------------------------------------------------------------------------------------- the plan

def test_an_empty_cluster_plans_every_topic_with_replication_capped_at_its_one_broker() -> None:
    specs = specs_from(SMALL)
    plan = compute_plan(specs, ClusterState(broker_count=1, topics={}), "p.")
    assert [c.physical for c in plan.creates] == ["p.requests.bulk", "p.routed.bulk", "p.dlq"]
    assert {(c.partitions, c.replication_factor) for c in plan.creates} == {(4, 1), (1, 1)}
    assert all(c.configs["min.insync.replicas"] == "1" for c in plan.creates)
    assert "+ create requests.bulk (4 partitions, rf 1)" in plan.render().splitlines()
    assert "1 broker(s): replication factor 3, min.insync.replicas 2 declared, capped at 1" in plan.render()
    assert not plan.is_empty


def test_a_cluster_of_three_brokers_gets_the_declared_replication() -> None:
    plan = compute_plan(specs_from(SMALL), ClusterState(broker_count=3, topics={}), "")
    assert {(c.replication_factor, c.configs["min.insync.replicas"]) for c in plan.creates} == {(3, "2")}
    assert plan.notes == ()


def test_a_cluster_of_two_brokers_caps_replication_at_two() -> None:
    plan = compute_plan(specs_from(SMALL), ClusterState(broker_count=2, topics={}), "")
    assert {(c.replication_factor, c.configs["min.insync.replicas"]) for c in plan.creates} == {(2, "2")}


def test_a_cluster_that_matches_has_nothing_to_do() -> None:
    specs = specs_from(SMALL)
    plan = compute_plan(specs, in_sync(specs, "p."), "p.")
    assert plan.is_empty
    assert plan.render().splitlines()[0] == "topics: nothing to do (3 topics up to date)"


def test_config_drift_is_planned_for_declared_keys_only() -> None:
    specs = specs_from(SMALL)
    drifted = observed(specs["routed.bulk"], retention_ms="5", segment_ms="123")  # segment.ms is not declared
    plan = compute_plan(specs, in_sync(specs, routed_bulk=drifted), "")
    assert plan.alters == (AlterConfig("routed.bulk", "routed.bulk", "retention.ms", "5", "1000"),)
    assert plan.creates == ()
    assert plan.partition_increases == ()
    assert plan.errors == ()
    assert "~ alter routed.bulk retention.ms: 5 -> 1000" in plan.render().splitlines()
    assert plan.up_to_date == 2


def test_min_insync_replicas_is_never_raised_above_the_replicas_a_topic_has() -> None:
    specs = specs_from(SMALL)
    cluster = in_sync(specs)
    three_brokers = ClusterState(broker_count=3, topics=cluster.topics)  # grown, but topics still have rf 1
    plan = compute_plan(specs, three_brokers, "")
    assert not [a for a in plan.alters if a.key == "min.insync.replicas"]
    assert len(plan.errors) == 3
    assert all("replication factor is 1, topics/ wants 3" in error for error in plan.errors)


def test_a_whole_co_partition_group_grows_together() -> None:
    specs = specs_from(SMALL)
    cluster = in_sync(specs, requests_bulk=observed(specs["requests.bulk"], partitions=2),
                      routed_bulk=observed(specs["routed.bulk"], partitions=2))
    plan = compute_plan(specs, cluster, "")
    assert plan.partition_increases == (
        AddPartitions("requests.bulk", "requests.bulk", 2, 4),
        AddPartitions("routed.bulk", "routed.bulk", 2, 4),
    )
    assert plan.errors == ()
    assert "^ partitions routed.bulk: 2 -> 4" in plan.render().splitlines()
    assert any("re-map user keys" in note for note in plan.notes)


def test_partitions_are_never_decreased_and_the_rest_of_the_group_is_not_grown_alone() -> None:
    specs = specs_from(SMALL)
    cluster = in_sync(specs, requests_bulk=observed(specs["requests.bulk"], partitions=8),
                      routed_bulk=observed(specs["routed.bulk"], partitions=2))
    plan = compute_plan(specs, cluster, "")
    assert plan.partition_increases == ()
    assert any(e.startswith("requests.bulk: 8 partitions in the cluster, 4 declared") for e in plan.errors)
    assert any(e.startswith("routed.bulk: not created or grown") and "requests.bulk has 8" in e
               for e in plan.errors)
    assert not plan.is_empty


def test_a_missing_member_of_a_broken_group_is_not_created_with_the_wrong_count() -> None:
    specs = specs_from(SMALL)
    present = in_sync(specs, requests_bulk=observed(specs["requests.bulk"], partitions=8)).topics
    cluster = ClusterState(1, {name: topic for name, topic in present.items() if name != "routed.bulk"})
    plan = compute_plan(specs, cluster, "")
    assert plan.creates == ()
    assert any(e.startswith("routed.bulk: not created") for e in plan.errors)


def test_a_decrease_outside_any_group_is_an_error_too() -> None:
    specs = specs_from(SMALL)
    plan = compute_plan(specs, in_sync(specs, dlq=observed(specs["dlq"], partitions=3)), "")
    assert plan.partition_increases == ()
    assert [e.split(":")[0] for e in plan.errors] == ["dlq"]


def test_undeclared_topics_under_the_prefix_are_reported_and_never_changed() -> None:
    specs = specs_from(SMALL)
    cluster = in_sync(specs, "p.")
    extra = {"p.old.topic": ObservedTopic(1, 1), "other.topic": ObservedTopic(1, 1),
             "__consumer_offsets": ObservedTopic(50, 1)}
    plan = compute_plan(specs, ClusterState(1, {**cluster.topics, **extra}), "p.")
    assert plan.undeclared == ("p.old.topic",)
    assert plan.is_empty
    assert "? not declared in topics/, left alone: p.old.topic" in plan.render().splitlines()


def test_a_config_the_cluster_does_not_know_is_an_error_not_drift() -> None:
    specs = specs_from(SMALL)
    spec = specs["dlq"]
    values = {k: v for k, v in observed(spec).configs.items() if k != "retention.ms"}
    plan = compute_plan(specs, in_sync(specs, dlq=ObservedTopic(1, 1, values)), "")
    assert plan.alters == ()
    assert plan.errors == ("dlq: the cluster does not report config retention.ms (unknown to this Kafka?)",)


def test_a_cluster_without_brokers_plans_nothing() -> None:
    plan = compute_plan(specs_from(SMALL), ClusterState(broker_count=0, topics={}), "")
    assert plan.changes == ()
    assert plan.errors == ("the cluster reports no brokers",)


# ------------------------------------------------------------------------------------------- the real broker

@pytest.fixture
def isolated(prefixed_settings: Settings) -> Iterator[Settings]:
    """Settings with a prefix of this test's own; every topic under it is deleted afterwards."""
    assert prefixed_settings.topic_prefix
    yield prefixed_settings
    clients.delete_prefixed(prefixed_settings)


def _describe(settings: Settings, name: str) -> tuple[int, dict[str, str]]:
    """Partition count and configs of a topic, read straight from the broker."""
    client = clients.admin(settings)
    physical = settings.topic(name)
    metadata = client.list_topics(topic=physical, timeout=10).topics[physical]
    resource = ConfigResource(ResourceType.TOPIC, physical)
    entries: dict[str, Any] = client.describe_configs([resource])[resource].result(timeout=10)
    return len(metadata.partitions), {key: entry.value for key, entry in entries.items()}


def _wait_for(settings: Settings, predicate: Any, timeout_s: float = 15.0) -> Plan:
    deadline = time.monotonic() + timeout_s
    while True:
        plan = topics.plan(settings)
        if predicate(plan) or time.monotonic() > deadline:
            return plan
        time.sleep(0.2)


def test_apply_creates_every_topic_with_its_partitions_and_configs(isolated: Settings) -> None:
    result = topics.apply(isolated)
    catalogue = topics.catalogue()
    assert {c.name for c in result.creates} == set(catalogue)
    brokers = result.broker_count
    for name, spec in catalogue.items():
        partitions, configs = _describe(isolated, name)
        assert partitions == spec.partitions, name
        for key, value in spec.configs.items():
            want = str(min(spec.min_insync_replicas, brokers)) if key == "min.insync.replicas" else value
            assert configs[key] == want, (name, key)


def test_a_second_apply_has_nothing_to_do(isolated: Settings) -> None:
    assert not topics.apply(isolated).is_empty
    again = topics.apply(isolated)
    assert again.is_empty
    assert again.changes == ()
    expected = f"topics: nothing to do ({len(topics.catalogue())} topics up to date)"
    assert again.render().splitlines()[0] == expected


def test_drifted_retention_shows_in_the_plan_and_apply_repairs_it(isolated: Settings) -> None:
    topics.apply(isolated)
    name = "retry.bulk.1"
    resource = ConfigResource(ResourceType.TOPIC, isolated.topic(name), incremental_configs=[
        ConfigEntry("retention.ms", "1000", incremental_operation=AlterConfigOpType.SET)])
    client = clients.admin(isolated)  # held: a collected client cancels its pending futures
    client.incremental_alter_configs([resource])[resource].result(timeout=10)

    drift = _wait_for(isolated, lambda plan: bool(plan.changes))
    declared = topics.spec(name).configs["retention.ms"]
    assert drift.changes == (AlterConfig(name, isolated.topic(name), "retention.ms", "1000", declared),)
    assert f"~ alter {name} retention.ms: 1000 -> {declared}" in drift.render().splitlines()

    repaired = topics.apply(isolated)
    assert repaired.alters == drift.alters
    assert _describe(isolated, name)[1]["retention.ms"] == declared
    assert topics.plan(isolated).is_empty
