"""Topics as code: the catalogue of topics/topics.toml, the names stages use, and plan/apply against Kafka.

Code never spells a topic name: it asks this module (`requests_topic(lane)`, `send_topic(channel, lane)`, ...)
for the logical name and `settings.topic(name)` for the physical one. The file is checked strictly when loaded
(unknown keys, unknown Kafka configs, co-partition groups with unequal partition counts are TopicSpecError).

`plan(settings)` compares the file with the cluster and changes nothing; `apply(settings)` creates what is
missing, sets drifted configs and grows partition counts when allowed, then waits until the cluster shows it.
Neither ever deletes a topic or removes partitions.
"""

from __future__ import annotations

import dataclasses
import re
import time
import tomllib
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # public, but re-exported without __all__
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
    ResourceType,
)

from pipeline.config import REPO_ROOT, Settings
from pipeline.errors import NotifyError, TopicSpecError
from pipeline.kafka import clients
from pipeline.kafka.topic_plan import MIN_ISR, ClusterState, ObservedTopic, Plan, TopicSpec, compute_plan

TOPICS_FILE = REPO_ROOT / "topics" / "topics.toml"

LANES = ("critical", "bulk")
CHANNELS = ("sms", "email", "push")
USER_GROUP = "user"  # the co-partition group of everything keyed by user id

DLQ = "dlq"
INVALID = "invalid"
DELIVERY_EVENTS = "delivery-events"
RECEIPTS = "receipts"
USER_SETTINGS = "user-settings"

ADMIN_TIMEOUT_S = 30.0


class TopicAdminError(NotifyError):
    """The cluster could not be read, or refused a change apply asked for."""


# ---------------------------------------------------------------------------------------------- loading

_SETTING_KEYS = frozenset({"partitions", "replication_factor", "copartition_group", "configs"})
_TOPIC_KEYS = _SETTING_KEYS | {"description", "delay_s"}
_NAME = re.compile(r"[a-z0-9]+(?:[.-][a-z0-9]+)*")  # no '_': Kafka's metric names confuse '.' and '_'
_RETRY_NAME = re.compile(r"retry\.([a-z0-9-]+)\.([1-9][0-9]*)")
_CLEANUP_POLICIES = frozenset({"delete", "compact", "compact,delete", "delete,compact"})
_REQUIRED_CONFIGS = ("cleanup.policy", "retention.ms", MIN_ISR)

# Topic-level configs of Kafka 4.x; a typo here would otherwise show up as drift on every plan.
KNOWN_CONFIGS = frozenset({
    "cleanup.policy", "compression.type", "compression.gzip.level", "compression.lz4.level",
    "compression.zstd.level", "delete.retention.ms", "file.delete.delay.ms", "flush.messages", "flush.ms",
    "index.interval.bytes", "local.retention.bytes", "local.retention.ms", "max.compaction.lag.ms",
    "max.message.bytes", "message.timestamp.after.max.ms", "message.timestamp.before.max.ms",
    "message.timestamp.type", "min.cleanable.dirty.ratio", "min.compaction.lag.ms", MIN_ISR, "preallocate",
    "remote.storage.enable", "retention.bytes", "retention.ms", "segment.bytes", "segment.index.bytes",
    "segment.jitter.ms", "segment.ms", "unclean.leader.election.enable",
})


def _check_keys(table: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise TopicSpecError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _table(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise TopicSpecError(f"{where} must be a table")
    return value


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TopicSpecError(f"{where} must be a positive integer, not {value!r}")
    return value


def _config_value(value: Any, where: str) -> str:
    """TOML values as Kafka reports them: booleans lower-case, numbers in decimal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    raise TopicSpecError(f"{where} must be a string, number or boolean, not {value!r}")


def _configs(value: Any, where: str) -> dict[str, str]:
    configs: dict[str, str] = {}
    for key, raw in _table(value, where).items():
        if key not in KNOWN_CONFIGS:
            raise TopicSpecError(f"{where}: {key!r} is not a Kafka topic config")
        configs[key] = _config_value(raw, f"{where}.{key}")
    return configs


def _spec(name: str, table: Mapping[str, Any], defaults: Mapping[str, Any]) -> TopicSpec:
    where = f"topics.{name!r}"
    if not _NAME.fullmatch(name):
        raise TopicSpecError(f"{where}: a name is lower-case letters and digits separated by '.' or '-'")
    _check_keys(table, _TOPIC_KEYS, where)
    merged = {**defaults, **{k: v for k, v in table.items() if k != "configs"}}
    configs = {**_configs(defaults.get("configs", {}), "defaults.configs"),
               **_configs(table.get("configs", {}), f"{where}.configs")}
    missing = [key for key in _REQUIRED_CONFIGS if key not in configs]
    if missing:
        raise TopicSpecError(f"{where}: declares no {', '.join(missing)} (nor do the defaults)")
    if configs["cleanup.policy"] not in _CLEANUP_POLICIES:
        raise TopicSpecError(f"{where}: cleanup.policy {configs['cleanup.policy']!r} is not one of "
                             f"{', '.join(sorted(_CLEANUP_POLICIES))}")
    description = merged.get("description")
    if not isinstance(description, str) or not description.strip():
        raise TopicSpecError(f"{where}: needs a description")
    partitions = _positive_int(merged.get("partitions"), f"{where}.partitions")
    replication = _positive_int(merged.get("replication_factor"), f"{where}.replication_factor")
    raw_isr = configs[MIN_ISR]
    min_isr = _positive_int(int(raw_isr) if raw_isr.isdigit() else raw_isr, f"{where}.{MIN_ISR}")
    if min_isr > replication:
        raise TopicSpecError(f"{where}: {MIN_ISR} {min_isr} exceeds replication factor {replication}")
    group = merged.get("copartition_group")
    if not isinstance(group, str | None):
        raise TopicSpecError(f"{where}.copartition_group must be a string")
    delay = table.get("delay_s")
    if _RETRY_NAME.fullmatch(name):
        delay = _positive_int(delay, f"{where}.delay_s")
    elif delay is not None:
        raise TopicSpecError(f"{where}: only retry.<lane>.<n> topics have a delay_s")
    return TopicSpec(name, partitions, replication, MappingProxyType(configs), group or None,
                     description.strip(), delay)


def _check_copartitioning(specs: Mapping[str, TopicSpec]) -> None:
    groups: dict[str, dict[int, list[str]]] = {}
    for spec in specs.values():
        if spec.copartition_group:
            groups.setdefault(spec.copartition_group, {}).setdefault(spec.partitions, []).append(spec.name)
    for group, by_count in groups.items():
        if len(by_count) > 1:
            detail = "; ".join(f"{count}: {', '.join(names)}" for count, names in sorted(by_count.items()))
            raise TopicSpecError(f"co-partition group {group!r} needs one partition count, has {detail}")


def _check_retry_tiers(specs: Mapping[str, TopicSpec]) -> None:
    tiers: dict[str, dict[int, TopicSpec]] = {}
    for spec in specs.values():
        if match := _RETRY_NAME.fullmatch(spec.name):
            tiers.setdefault(match[1], {})[int(match[2])] = spec
    for lane, by_tier in tiers.items():
        if sorted(by_tier) != list(range(1, len(by_tier) + 1)):
            raise TopicSpecError(f"retry tiers of lane {lane!r} must be numbered 1..n, are {sorted(by_tier)}")
        delays = [by_tier[n].delay_s or 0 for n in sorted(by_tier)]
        if delays != sorted(set(delays)):
            raise TopicSpecError(f"retry tiers of lane {lane!r} must wait longer at each tier, wait {delays}")


def parse(document: Mapping[str, Any]) -> Mapping[str, TopicSpec]:
    """Validate a parsed topics TOML document; the specs by logical name, in file order."""
    _check_keys(document, {"defaults", "topics"}, "topics file")
    defaults = _table(document.get("defaults", {}), "defaults")
    _check_keys(defaults, _SETTING_KEYS, "defaults")
    topics = _table(document.get("topics", {}), "topics")
    if not topics:
        raise TopicSpecError("the topics file declares no topics")
    specs = {name: _spec(name, _table(table, f"topics.{name!r}"), defaults) for name, table in topics.items()}
    _check_copartitioning(specs)
    _check_retry_tiers(specs)
    return MappingProxyType(specs)


def load(path: Path = TOPICS_FILE) -> Mapping[str, TopicSpec]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TopicSpecError(f"{path}: {exc}") from None
    return parse(document)


@cache
def catalogue() -> Mapping[str, TopicSpec]:
    """The topics of topics/topics.toml, read once per process."""
    return load()


# ---------------------------------------------------------------------------------------------- names

def spec(name: str) -> TopicSpec:
    try:
        return catalogue()[name]
    except KeyError:
        raise TopicSpecError(f"topic {name!r} is not declared in {TOPICS_FILE.name}") from None


def _lane(lane: str) -> str:
    if lane not in LANES:
        raise ValueError(f"unknown lane {lane!r}; lanes: {', '.join(LANES)}")
    return lane


def requests_topic(lane: str) -> str:
    return spec(f"requests.{_lane(lane)}").name


def accepted_topic(lane: str) -> str:
    return spec(f"accepted.{_lane(lane)}").name


def routed_topic(lane: str) -> str:
    return spec(f"routed.{_lane(lane)}").name


def send_topic(channel: str, lane: str) -> str:
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}; channels: {', '.join(CHANNELS)}")
    return spec(f"send.{channel}.{_lane(lane)}").name


def retry_topics(lane: str) -> tuple[str, ...]:
    """The retry tiers of `lane`, first tier first; `spec(name).delay_s` is each tier's delay."""
    prefix = f"retry.{_lane(lane)}."
    names = [name for name in catalogue() if name.startswith(prefix)]
    return tuple(sorted(names, key=lambda name: int(name[len(prefix):])))


def dedup_topic(lane: str) -> str:
    """The changelog of intake's dedup table of `lane` (co-partitioned with requests.<lane>)."""
    return spec(f"dedup.{_lane(lane)}").name


# ---------------------------------------------------------------------------------------------- the cluster

def _result(future: Future[Any], what: str, failures: list[str]) -> Any:
    try:
        return future.result(timeout=ADMIN_TIMEOUT_S)
    except Exception as exc:  # KafkaException, or TimeoutError: either way the change is not known to be made
        failures.append(f"{what}: {exc}")
        return None


def observe(client: AdminClient, specs: Mapping[str, TopicSpec], prefix: str) -> ClusterState:
    """Broker count, every topic's partitions and replication, and the configs of the declared ones."""
    try:
        metadata = client.list_topics(timeout=ADMIN_TIMEOUT_S)
    except KafkaException as exc:
        raise TopicAdminError(f"cannot list topics: {exc}") from None
    declared = {prefix + name for name in specs}
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in metadata.topics if name in declared]
    failures: list[str] = []
    configs: dict[str, dict[str, str]] = {}
    if resources:
        for resource, future in client.describe_configs(resources, request_timeout=ADMIN_TIMEOUT_S).items():
            entries = _result(future, f"describe {resource.name}", failures) or {}
            configs[resource.name] = {
                key: entry.value for key, entry in entries.items() if entry.value is not None}
    if failures:
        raise TopicAdminError("cannot read topic configs: " + "; ".join(failures))
    topics: dict[str, ObservedTopic] = {}
    for name, topic in metadata.topics.items():
        partitions = list(topic.partitions.values())
        replicas = len(partitions[0].replicas) if partitions else 0
        topics[name] = ObservedTopic(len(partitions), replicas, configs.get(name, {}))
    return ClusterState(broker_count=len(metadata.brokers), topics=topics)


def _execute(client: AdminClient, todo: Plan) -> None:
    failures: list[str] = []
    if todo.creates:
        new = [NewTopic(c.physical, num_partitions=c.partitions, replication_factor=c.replication_factor,
                        config=dict(c.configs)) for c in todo.creates]
        for name, future in client.create_topics(
                new, operation_timeout=ADMIN_TIMEOUT_S, request_timeout=ADMIN_TIMEOUT_S).items():
            _result(future, f"create {name}", failures)
    if todo.alters:
        by_topic: dict[str, list[ConfigEntry]] = {}
        for alter in todo.alters:
            by_topic.setdefault(alter.physical, []).append(
                ConfigEntry(alter.key, alter.new, incremental_operation=AlterConfigOpType.SET))
        resources = [ConfigResource(ResourceType.TOPIC, name, incremental_configs=entries)
                     for name, entries in by_topic.items()]
        for resource, future in client.incremental_alter_configs(
                resources, request_timeout=ADMIN_TIMEOUT_S).items():
            _result(future, f"alter {resource.name}", failures)
    if todo.partition_increases:
        grow = [NewPartitions(p.physical, p.new) for p in todo.partition_increases]
        for name, future in client.create_partitions(
                grow, operation_timeout=ADMIN_TIMEOUT_S, request_timeout=ADMIN_TIMEOUT_S).items():
            _result(future, f"grow {name}", failures)
    if failures:
        raise TopicAdminError(
            f"{len(failures)} of {len(todo.changes)} change(s) failed: " + "; ".join(failures))


def _current_plan(client: AdminClient, settings: Settings) -> Plan:
    specs = catalogue()
    return compute_plan(specs, observe(client, specs, settings.topic_prefix), settings.topic_prefix)


def plan(settings: Settings) -> Plan:
    """What apply would change; changes nothing."""
    return _current_plan(clients.admin(settings), settings)


def apply(settings: Settings) -> Plan:
    """Make the cluster match topics/ (never deleting anything); the plan that was carried out."""
    client = clients.admin(settings)
    todo = _current_plan(client, settings)
    if todo.changes:
        _execute(client, todo)
        # The controller has committed the changes; wait until the metadata and configs the brokers serve show
        # them, so that the next plan (or a stage starting now) sees what was applied.
        # With several brokers a new topic reaches each one's metadata a moment apart: a broker that lists it may
        # answer another's "unknown topic" to describe_configs meanwhile, which is "not visible yet", not a failure.
        deadline = time.monotonic() + ADMIN_TIMEOUT_S
        while True:
            try:
                if not _current_plan(client, settings).changes:
                    break
                unseen = "changes made but not visible"
            except TopicAdminError as exc:
                unseen = str(exc)
            if time.monotonic() > deadline:
                raise TopicAdminError(f"{unseen} after {ADMIN_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
    return dataclasses.replace(todo, applied=True)
