"""A Kafka of a test's own: one KRaft node or a cluster of them, started from the stack's own code
(pipeline.stack.kafka.KafkaService, the nodes `notify stack up` runs with NOTIFY_KAFKA_BROKERS), on free loopback
ports and in a folder of the test's own, so that a test may SIGKILL nodes without touching the broker the rest of
the suite shares."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import shutil
import signal
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from confluent_kafka import TopicPartition

from pipeline.bench.rig import free_port_block
from pipeline.config import Settings
from pipeline.kafka import clients
from pipeline.stack.common import OwnedProcess
from pipeline.stack.kafka import KafkaService, cluster_nodes


def busiest_leader(sizes: Mapping[tuple[str, int], int], leaders: Mapping[tuple[str, int], int], top: int = 6) -> int:
    """The broker leading most of the `top` partitions that hold the most records (a tie: the lower id)."""
    busiest = sorted(sizes, key=lambda tp: (-sizes[tp], tp))[:top]
    counts = collections.Counter(leaders[tp] for tp in busiest if leaders.get(tp, -1) >= 0)
    if not counts:
        raise ValueError("no partition of those has a leader")
    return min(counts, key=lambda broker: (-counts[broker], broker))


def longest_gap(times: Iterable[float], since: float, until: float | None = None) -> tuple[float, float]:
    """(seconds, start) of the longest stretch from `since` to `until` (default: the last of `times`) in which none
    of `times` fell: how long something that kept stamping its work stood still. (0, since) when nothing is left
    after `since`."""
    points = sorted(t for t in times if t >= since and (until is None or t <= until))
    if not points:
        return 0.0, since
    edges = [since, *points] if until is None else [since, *points, until]
    return max(((b - a, a) for a, b in itertools.pairwise(edges)), default=(0.0, since))


def fully_replicated(isrs: Mapping[tuple[str, int], list[int]], replicas: int) -> bool:
    """Every partition has its whole replica set in sync again."""
    return all(len(isr) >= replicas for isr in isrs.values())


class OwnCluster:
    """`brokers` combined KRaft nodes (ids 1..N) of this test's own, which it may SIGKILL and start again."""

    def __init__(self, settings: Settings, home: Path, brokers: int = 1, heap: str = "384m") -> None:
        port = free_port_block(2 * brokers)
        self.home = home
        self.settings = dataclasses.replace(settings, kafka_bootstrap_servers=None, kafka_port=port,
                                            kafka_controller_port=port + 1, kafka_brokers=brokers, kafka_heap=heap,
                                            stack_dir=home)
        self.nodes = {n.node_id: KafkaService(self.settings, n.node_id) for n in cluster_nodes(self.settings)}
        self.processes: dict[int, OwnedProcess] = {}
        self.bootstrap = self.settings.bootstrap_servers
        # what clients use: the bootstrap list of every node, as a given (external) cluster
        self.client_settings = dataclasses.replace(settings, kafka_bootstrap_servers=self.bootstrap)

    def alive(self) -> list[int]:
        return sorted(n for n, p in self.processes.items() if p.alive())

    def start(self, *node_ids: int, timeout_s: float = 120) -> float:
        """Start the nodes (all by default); seconds until each answered a metadata request as a broker."""
        started = time.monotonic()
        todo = list(node_ids or self.nodes)
        for n in todo:
            self.processes[n] = self.nodes[n].start()
        for n in todo:
            while not self.nodes[n].ready(2.0):
                assert self.processes[n].alive(), f"node {n} exited:\n{self.nodes[n].failure_log()}"
                assert time.monotonic() - started < timeout_s, (
                    f"node {n} did not answer within {timeout_s:.0f} s:\n{self.nodes[n].failure_log()}")
                time.sleep(0.5)
        return time.monotonic() - started

    def kill(self, *node_ids: int) -> None:
        """SIGKILL the nodes (all by default) and wait until they are gone."""
        for n in node_ids or list(self.processes):
            process = self.processes[n]
            assert process.alive(), f"node {n} is not running"
            os.kill(process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(self.processes[n].alive() for n in node_ids or list(self.processes)):
            assert time.monotonic() < deadline, "a SIGKILLed node did not go"
            time.sleep(0.1)

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate(timeout_s=20)
        shutil.rmtree(self.home, ignore_errors=True)

    # ------------------------------------------------------------------ what the cluster says
    def leaders(self, names: Iterable[str]) -> dict[tuple[str, int], int]:
        """(topic, partition) -> id of its leader (-1: none), for the physical topics `names`."""
        metadata = clients.admin(self.client_settings).list_topics(timeout=10)
        wanted = set(names)
        return {(name, p): part.leader for name, topic in metadata.topics.items() if name in wanted
                for p, part in topic.partitions.items()}

    def isrs(self, names: Iterable[str]) -> dict[tuple[str, int], list[int]]:
        """(topic, partition) -> its in-sync replicas, for the physical topics `names`."""
        metadata = clients.admin(self.client_settings).list_topics(timeout=10)
        wanted = set(names)
        return {(name, p): list(part.isrs) for name, topic in metadata.topics.items() if name in wanted
                for p, part in topic.partitions.items()}

    def end_offsets(self, names: Iterable[str]) -> dict[tuple[str, int], int]:
        """(topic, partition) -> high watermark, for the physical topics `names` (partitions of a live leader)."""
        reader = clients.consumer(self.client_settings, "offsets-reader")
        try:
            out = {}
            for (topic, p), leader in self.leaders(names).items():
                if leader >= 0:
                    out[(topic, p)] = int(reader.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1])
            return out
        finally:
            reader.close()
