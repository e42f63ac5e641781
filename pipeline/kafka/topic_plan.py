"""The difference between topics/ and a cluster, computed without a broker.

`compute_plan(specs, cluster, prefix)` is pure: it takes the declared specs and a plain description of what
the cluster holds (`ClusterState`) and says what to create, which configs to set and which partition counts to
raise. `TopicSpec` is one declared topic.
It never plans a deletion or a decrease: those are reported (as errors or as undeclared topics) for a person
to decide. `pipeline.kafka.topics.plan/apply` read the cluster and carry the plan out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

MIN_ISR = "min.insync.replicas"


@dataclass(frozen=True)
class TopicSpec:
    name: str  # logical: the physical name is settings.topic(name)
    partitions: int
    replication_factor: int  # production value; capped at the broker count when applied
    configs: Mapping[str, str] = field(hash=False)  # Kafka topic configs, values as Kafka reports them
    copartition_group: str | None
    description: str
    delay_s: int | None = None  # retry tiers only: how long a record waits before it is re-sent

    @property
    def min_insync_replicas(self) -> int:
        return int(self.configs[MIN_ISR])


_MAX_UNDECLARED_SHOWN = 20


@dataclass(frozen=True)
class ObservedTopic:
    """One topic as the cluster reports it. `configs` holds at least the keys topics/ declares."""

    partitions: int
    replication_factor: int
    configs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusterState:
    broker_count: int
    topics: Mapping[str, ObservedTopic]  # by physical name (prefix included)


@dataclass(frozen=True)
class CreateTopic:
    name: str
    physical: str
    partitions: int
    replication_factor: int
    configs: Mapping[str, str]

    def render(self) -> str:
        return f"+ create {self.name} ({self.partitions} partitions, rf {self.replication_factor})"


@dataclass(frozen=True)
class AlterConfig:
    name: str
    physical: str
    key: str
    old: str
    new: str

    def render(self) -> str:
        return f"~ alter {self.name} {self.key}: {self.old} -> {self.new}"


@dataclass(frozen=True)
class AddPartitions:
    name: str
    physical: str
    old: int
    new: int

    def render(self) -> str:
        return f"^ partitions {self.name}: {self.old} -> {self.new}"


Change = CreateTopic | AlterConfig | AddPartitions


@dataclass(frozen=True)
class Plan:
    prefix: str
    broker_count: int
    creates: tuple[CreateTopic, ...] = ()
    alters: tuple[AlterConfig, ...] = ()
    partition_increases: tuple[AddPartitions, ...] = ()
    errors: tuple[str, ...] = ()  # differences apply will not fix; a person must act
    notes: tuple[str, ...] = ()  # e.g. replication capped to the broker count
    undeclared: tuple[str, ...] = ()  # physical names under our prefix that topics/ does not declare
    up_to_date: int = 0
    applied: bool = False  # True when returned by apply(): the changes were made

    @property
    def changes(self) -> tuple[Change, ...]:
        return (*self.creates, *self.alters, *self.partition_increases)

    @property
    def is_empty(self) -> bool:
        """Nothing to change and nothing wrong (undeclared topics and notes are information only)."""
        return not self.changes and not self.errors

    def render(self) -> str:
        lines: list[str] = []
        if self.is_empty:
            lines.append(f"topics: nothing to do ({self.up_to_date} topics up to date)")
        else:
            verb = "applied" if self.applied else "plan (dry run, nothing changed yet)"
            lines.append(f"topics {verb}, prefix {self.prefix!r}, {self.broker_count} broker(s):")
            lines += [change.render() for change in self.changes]
            lines += [f"! error: {error}" for error in self.errors]
            counts = (
                f"{len(self.creates)} {'created' if self.applied else 'to create'}, "
                f"{len(self.alters)} configs {'set' if self.applied else 'to set'}, "
                f"{len(self.partition_increases)} partition increases, {len(self.errors)} errors, "
                f"{self.up_to_date} up to date"
            )
            lines.append(counts)
        lines += [f"note: {note}" for note in self.notes]
        shown = self.undeclared[:_MAX_UNDECLARED_SHOWN]
        lines += [f"? not declared in topics/, left alone: {name}" for name in shown]
        if len(self.undeclared) > len(shown):
            lines.append(f"? ... and {len(self.undeclared) - len(shown)} more not declared")
        return "\n".join(lines)


def _same_value(key: str, have: str, want: str) -> bool:
    if key == "cleanup.policy":  # a list: "compact,delete" == "delete, compact"
        return sorted(p.strip() for p in have.split(",")) == sorted(p.strip() for p in want.split(","))
    return have == want


def _capping_note(specs: Mapping[str, TopicSpec], brokers: int) -> tuple[str, ...]:
    rfs = {s.replication_factor for s in specs.values() if s.replication_factor > brokers}
    isrs = {s.min_insync_replicas for s in specs.values() if s.min_insync_replicas > brokers}
    if not rfs and not isrs:
        return ()
    declared = ", ".join(
        part
        for part in (
            f"replication factor {'/'.join(map(str, sorted(rfs)))}" if rfs else "",
            f"min.insync.replicas {'/'.join(map(str, sorted(isrs)))}" if isrs else "",
        )
        if part
    )
    return (f"the cluster reports {brokers} broker(s): {declared} declared, capped at {brokers}",)


def compute_plan(specs: Mapping[str, TopicSpec], cluster: ClusterState, prefix: str) -> Plan:
    """What apply would do to make `cluster` match `specs` (physical names are `prefix + name`)."""
    brokers = cluster.broker_count
    if brokers < 1:
        return Plan(prefix, brokers, errors=("the cluster reports no brokers",))
    creates: list[CreateTopic] = []
    alters: list[AlterConfig] = []
    increases: list[AddPartitions] = []
    errors: list[str] = []
    blocked_groups: dict[str, list[str]] = {}  # group -> why its partition layout must not change
    touched: set[str] = set()

    for name, spec in specs.items():
        physical = prefix + name
        observed = cluster.topics.get(physical)
        rf = min(spec.replication_factor, brokers)
        if observed is None:
            configs = {**spec.configs, MIN_ISR: str(min(spec.min_insync_replicas, rf))}
            creates.append(CreateTopic(name, physical, spec.partitions, rf, configs))
            touched.add(name)
            continue
        if observed.replication_factor != rf:
            errors.append(
                f"{name}: replication factor is {observed.replication_factor}, topics/ wants {rf}; "
                "apply does not move replicas (use a partition reassignment)"
            )
            touched.add(name)
        # Never ask for more in-sync replicas than the topic really has: acks=all writes would all fail.
        want_isr = min(spec.min_insync_replicas, rf, max(observed.replication_factor, 1))
        for key, want in {**spec.configs, MIN_ISR: str(want_isr)}.items():
            have = observed.configs.get(key)
            if have is None:
                errors.append(f"{name}: the cluster does not report config {key} (unknown to this Kafka?)")
                touched.add(name)
            elif not _same_value(key, have, want):
                alters.append(AlterConfig(name, physical, key, have, want))
                touched.add(name)
        if observed.partitions > spec.partitions:
            errors.append(
                f"{name}: {observed.partitions} partitions in the cluster, {spec.partitions} declared; Kafka "
                "cannot remove partitions (raise the declaration, or recreate the topic)"
            )
            touched.add(name)
            if spec.copartition_group:
                blocked_groups.setdefault(spec.copartition_group, []).append(
                    f"{name} has {observed.partitions}"
                )
        elif observed.partitions < spec.partitions:
            increases.append(AddPartitions(name, physical, observed.partitions, spec.partitions))
            touched.add(name)

    # A co-partitioned topic changes its partition count only together with its whole group; when one member
    # cannot reach the declared count, creating or growing the others would break the co-partitioning.
    def allowed(name: str) -> bool:
        group = specs[name].copartition_group
        if group is None or group not in blocked_groups:
            return True
        errors.append(
            f"{name}: not created or grown: co-partition group {group!r} cannot reach "
            f"{specs[name].partitions} partitions together ({', '.join(blocked_groups[group])})"
        )
        return False

    creates = [c for c in creates if allowed(c.name)]
    increases = [i for i in increases if allowed(i.name)]

    notes = list(_capping_note(specs, brokers))
    if any(specs[i.name].copartition_group for i in increases):
        notes.append(
            "more partitions re-map user keys: stop the group's stages first, and grow their table "
            "changelogs to the same count"
        )
    undeclared = sorted(
        physical
        for physical in cluster.topics
        if physical.startswith(prefix)
        and not physical.startswith("_")  # the cluster's own topics (__consumer_offsets, _schemas, ...)
        and physical[len(prefix):] not in specs
    )
    return Plan(
        prefix=prefix,
        broker_count=brokers,
        creates=tuple(creates),
        alters=tuple(alters),
        partition_increases=tuple(increases),
        errors=tuple(errors),
        notes=tuple(notes),
        undeclared=tuple(undeclared),
        up_to_date=len(specs) - len(touched),
    )
