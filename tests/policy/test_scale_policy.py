"""The decisions behind scaling out, without a broker: the nodes and ports of a local cluster and their settings, the
processes and metrics ports of `worker --all --replicas`, the capacity model's arithmetic, and the fault tests'
choices (which broker to kill, how long something stalled)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from support.kafka_cluster import busiest_leader, fully_replicated, longest_gap

from pipeline import config
from pipeline.bench import capacity
from pipeline.domain import LANES, STAGES
from pipeline.errors import ConfigError
from pipeline.kafka.topic_plan import ClusterState, compute_plan
from pipeline.kafka.topics import catalogue
from pipeline.stack import services
from pipeline.stack.kafka import cluster_nodes, format_command, replication_defaults, server_properties
from pipeline.stages.worker import exporter_port, metrics_port, parse_replicas, processes, replica_processes


def properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


# ------------------------------------------------------------------------------------------------ the local cluster

def test_one_broker_stays_the_default_on_the_ports_it_always_had() -> None:
    settings = config.load({})
    assert settings.kafka_brokers == 1
    assert [(n.node_id, n.port, n.controller_port) for n in cluster_nodes(settings)] == [(1, 9092, 9093)]
    assert settings.bootstrap_servers == "127.0.0.1:9092"
    assert [s.name for s in services(settings)] == ["kafka", "postgres", "redis", "prometheus"]
    single = properties(server_properties(settings, Path("/d")))
    assert single["controller.quorum.bootstrap.servers"] == "127.0.0.1:9093"
    assert single["offsets.topic.replication.factor"] == "1" and "controller.quorum.voters" not in single
    assert "--standalone" in format_command(settings, "id", Path("/p"))


def test_three_brokers_are_three_nodes_of_one_static_quorum_on_loopback() -> None:
    settings = config.load({"NOTIFY_KAFKA_BROKERS": "3"})
    nodes = cluster_nodes(settings)
    assert [(n.node_id, n.port, n.controller_port) for n in nodes] == [(1, 9092, 9093), (2, 9094, 9095),
                                                                       (3, 9096, 9097)]
    assert settings.bootstrap_servers == "127.0.0.1:9092,127.0.0.1:9094,127.0.0.1:9096"
    assert [s.name for s in services(settings)][:3] == ["kafka-1", "kafka-2", "kafka-3"]
    for node in nodes:
        props = properties(server_properties(settings, Path(f"/d{node.node_id}"), node.node_id))
        assert props["node.id"] == str(node.node_id)
        assert props["process.roles"] == "broker,controller"
        assert props["controller.quorum.voters"] == "1@127.0.0.1:9093,2@127.0.0.1:9095,3@127.0.0.1:9097"
        assert props["listeners"] == f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}"
        assert (props["offsets.topic.replication.factor"], props["transaction.state.log.min.isr"],
                props["min.insync.replicas"]) == ("3", "2", "2")
        assert props["unclean.leader.election.enable"] == "false"
    assert "--standalone" not in format_command(settings, "id", Path("/p"))


@pytest.mark.parametrize(("brokers", "expected"), [(1, (1, 1)), (2, (2, 2)), (3, (3, 2)), (5, (3, 2))])
def test_internal_topics_get_three_replicas_and_two_in_sync_where_the_cluster_has_them(
        brokers: int, expected: tuple[int, int]) -> None:
    assert replication_defaults(brokers) == expected


def test_broker_counts_and_ports_that_cannot_work_are_refused() -> None:
    with pytest.raises(ConfigError, match="NOTIFY_KAFKA_BROKERS"):
        config.load({"NOTIFY_KAFKA_BROKERS": "0"})
    with pytest.raises(ConfigError, match="NOTIFY_KAFKA_BROKERS"):
        config.load({"NOTIFY_KAFKA_BROKERS": "10"})
    colliding = config.load({"NOTIFY_KAFKA_BROKERS": "3", "NOTIFY_KAFKA_CONTROLLER_PORT": "9094"})
    with pytest.raises(ConfigError, match="colliding"):
        cluster_nodes(colliding)


def test_topics_get_the_declared_replication_on_three_brokers_and_are_capped_on_one() -> None:
    specs = catalogue()
    for brokers, rf, isr in ((1, 1, "1"), (3, 3, "2")):
        plan = compute_plan(specs, ClusterState(broker_count=brokers, topics={}), "p.")
        assert {c.replication_factor for c in plan.creates} == {rf}
        assert {c.configs["min.insync.replicas"] for c in plan.creates} == {isr}
        assert bool(plan.notes) == (brokers == 1)


# ------------------------------------------------------------------------------------------------ replicas

def test_replicas_parse_for_every_stage_or_by_name_and_the_reconciler_stays_one() -> None:
    assert parse_replicas(None) == dict.fromkeys(STAGES, 1)
    assert parse_replicas("3") == {**dict.fromkeys(STAGES, 3), "reconcile": 1}
    assert parse_replicas("sender=3,intake=2") == {**dict.fromkeys(STAGES, 1), "sender": 3, "intake": 2}
    assert parse_replicas("2,sender=4")["sender"] == 4 and parse_replicas("2,sender=4")["routing"] == 2
    for bad in ("0", "sender=0", "nope=2", "sender=x", "x"):
        with pytest.raises(ValueError, match="replicas"):
            parse_replicas(bad)


def test_replica_processes_repeat_each_stage_and_lane() -> None:
    plan = replica_processes(LANES, STAGES, parse_replicas("sender=3"))
    assert len(plan) == len(processes(LANES, STAGES)) + 2 * len(LANES)
    assert [(s, lane, n) for s, lane, n in plan if s == "sender"] == [
        ("sender", "critical", 0), ("sender", "critical", 1), ("sender", "critical", 2),
        ("sender", "bulk", 0), ("sender", "bulk", 1), ("sender", "bulk", 2)]
    assert replica_processes(LANES, STAGES) == [(s, lane, 0) for s, lane in processes(LANES, STAGES)]


def test_metrics_ports_of_every_replica_are_distinct_and_the_first_ones_never_move() -> None:
    settings = config.load({})
    assert metrics_port(settings, "intake", "critical") == 59401  # as compose's health check and the docs say
    assert exporter_port(settings) == 59415
    taken = {settings.metrics_port, exporter_port(settings)}
    for stage in STAGES:
        for lane in LANES:
            for replica in range(5):
                port = metrics_port(settings, stage, lane, replica)
                assert port not in taken, (stage, lane, replica)
                taken.add(port)
    assert max(taken) == exporter_port(settings) + 4 * len(STAGES) * len(LANES)
    with pytest.raises(ValueError):
        metrics_port(settings, "intake", "critical", -1)


# ------------------------------------------------------------------------------------------------ capacity model

README_RUN_E = capacity.Measured(
    stage_cpu_ms={"intake": 0.113, "preferences": 0.066, "routing": 0.089, "sender": 0.428, "retry": 0.007,
                  "receipts": 0.134},
    api_cpu_ms=0.305, broker_cpu_ms=0.169, postgres_cpu_ms=0.733, redis_cpu_ms=0.024, rows_written=5.98,
    transactions=0.03)


def test_the_model_reads_a_bench_runs_cpu_table_and_postgres_counters() -> None:
    measured = capacity.Measured.from_bench(
        {"worker:sender": 0.428, "worker:intake": 0.113, "kafka": 0.169, "postgres": 0.733, "redis": 0.024,
         "api": 0.305, "simulator": 0.305},
        {"rows inserted": 3.0, "rows updated": 2.98, "transactions": 0.03})
    assert measured.stage_cpu_ms["sender"] == 0.428 and measured.stage_cpu_ms["routing"] == 0.0
    assert measured.rows_written == pytest.approx(5.98)
    assert (measured.broker_cpu_ms, measured.postgres_cpu_ms, measured.api_cpu_ms) == (0.169, 0.733, 0.305)


def test_the_model_plans_processes_partitions_and_brokers_for_each_rate() -> None:
    small, medium, large = (capacity.plan(README_RUN_E, rate) for rate in capacity.RATES)
    # 1,000/s: the sender needs 0.43 cores, under one process at 60%: the floor of one process per lane
    assert small.processes["sender"] == 2 and small.processes["receipts"] == 1
    assert (small.partitions, small.brokers, small.postgres_servers, small.redis_shards) == (6, 3, 1, 1)
    # 10,000/s: 4.28 sender cores / 0.6 -> 8 processes, 4 per lane, partitions for twice that: 12
    assert medium.processes["sender"] == 8 and medium.partitions == 12
    assert medium.brokers == 3 and medium.postgres_servers == 1 and medium.limits == ()
    # 100,000/s: 42.8 / 0.6 -> 72 senders, 36 per lane -> 72 partitions; the broker's 16.9 cores triple with
    # replication: 50.7 over 8-core brokers at 60% -> 11; PostgreSQL's 73 cores outgrow one 16-core primary
    assert large.processes["sender"] == 72 and large.partitions == 72
    assert large.broker_cores == pytest.approx(50.7) and large.brokers == 11
    assert large.postgres_servers == 8 and large.rows_written_per_s == pytest.approx(598_000)
    assert large.redis_shards == 4
    assert [limit.split(":")[0] for limit in large.limits] == ["PostgreSQL", "Redis"]


def test_the_model_names_where_postgres_and_redis_become_the_limit() -> None:
    assert capacity.limit_rate(0.733, 16) == pytest.approx(13_097, abs=1)
    assert capacity.limit_rate(0.024, 1) == pytest.approx(25_000)
    text = "\n".join(capacity.render(README_RUN_E))
    assert "| notifications/s | 1,000 | 10,000 | 100,000 |" in text
    assert "| sender processes | 2 | 8 | 72 |" in text
    assert "One PostgreSQL primary carries up to 13,097 notifications/s" in text
    looser = dataclasses.replace(capacity.Assumptions(), postgres_cores=64)
    assert capacity.plan(README_RUN_E, 100_000, looser).postgres_servers == 2


# ------------------------------------------------------------------------------------------------ fault choices

def test_the_busiest_leader_leads_most_of_the_fullest_partitions() -> None:
    sizes = {("a", 0): 500, ("a", 1): 10, ("b", 0): 400, ("b", 1): 450, ("c", 0): 0}
    leaders = {("a", 0): 2, ("a", 1): 1, ("b", 0): 3, ("b", 1): 2, ("c", 0): 1}
    assert busiest_leader(sizes, leaders, top=3) == 2
    assert busiest_leader(sizes, {**leaders, ("b", 1): 3}, top=3) == 3  # b/0 and b/1 on 3 against a/0 on 2
    assert busiest_leader({("a", 0): 1, ("b", 0): 1}, {("a", 0): 3, ("b", 0): 1}) == 1  # a tie: the lower id
    with pytest.raises(ValueError):
        busiest_leader({("a", 0): 1}, {("a", 0): -1})


def test_the_longest_gap_is_the_stall_after_a_fault() -> None:
    assert longest_gap([1.0, 1.5, 2.0, 9.0, 9.5], since=1.2) == (7.0, 2.0)
    assert longest_gap([1.0, 2.0], since=5.0) == (0.0, 5.0)  # done before the fault: it never stalled
    assert longest_gap([6.0, 7.0], since=5.0, until=20.0) == (13.0, 7.0)
    assert fully_replicated({("a", 0): [1, 2, 3], ("a", 1): [2, 3, 1]}, 3)
    assert not fully_replicated({("a", 0): [1, 2, 3], ("a", 1): [2, 3]}, 3)
