"""Apache Kafka 4.x from Maven Central jars with the machine's JDK: one KRaft node (broker + controller) by default,
or `NOTIFY_KAFKA_BROKERS` of them.

A cluster is N combined nodes (each broker + controller) with a static quorum of all N (`controller.quorum.voters`),
every one formatted with the same cluster id. Combined nodes keep the local stack at N JVMs; the price is that a
node lost is a broker *and* a voter lost: three nodes survive one loss (a new leader for the dead node's partitions,
ISRs shrink to the two left), and with two lost the quorum is gone too, so leaders can neither move nor shrink their
ISR, and acks=all writes wait and time out rather than being acknowledged on fewer than min.insync.replicas.
Production runs a dedicated controller quorum; nothing in the pipeline depends on which.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

from pipeline.config import REPO_ROOT, Settings
from pipeline.errors import ConfigError, StackError
from pipeline.kafka import clients as kafka_clients
from pipeline.stack.common import OwnedProcess, ensure_debian_packages, tail_file, tail_text
from pipeline.stack.service import LocalService

POM = REPO_ROOT / "infra" / "kafka" / "pom.xml"
BROKER_LOG4J = REPO_ROOT / "infra" / "kafka" / "log4j2.yaml"
TOOLS_LOG4J = REPO_ROOT / "infra" / "kafka" / "tools-log4j2.yaml"

# `notify kafka <tool>` -> main class in kafka-tools (the same jars the broker runs from)
TOOLS = {
    "topics": "org.apache.kafka.tools.TopicCommand",
    "consumer-groups": "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
    "console-consumer": "org.apache.kafka.tools.consumer.ConsoleConsumer",
    "console-producer": "org.apache.kafka.tools.ConsoleProducer",
    "get-offsets": "org.apache.kafka.tools.GetOffsetShell",
    "configs": "org.apache.kafka.admin.ConfigCommand",
    "metadata-quorum": "org.apache.kafka.tools.MetadataQuorumCommand",
}


def kafka_version() -> str:
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    if not match:
        raise StackError(f"no <kafka.version> in {POM}")
    return match.group(1)


def jars_dir(settings: Settings) -> Path:
    """The broker's jars, copied from Maven Central once per pom.xml content."""
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:12]
    target = settings.cache_dir / f"kafka-{kafka_version()}-{digest}"
    if (target / ".complete").exists():
        return target
    ensure_debian_packages({"java": "openjdk-17-jre-headless", "mvn": "maven"})
    print(f"downloading Kafka {kafka_version()} jars from Maven Central into {target} ...", flush=True)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    command = [
        "mvn", "-B", "-q", "-f", str(POM), "dependency:copy-dependencies",
        f"-DoutputDirectory={partial}", "-DincludeScope=runtime",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise StackError(f"`{' '.join(command)}` failed:\n{tail_text(done.stdout + done.stderr)}")
    (partial / ".complete").write_text(kafka_version())
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def java_command(settings: Settings, main_class: str, *args: str, heap: str | None = None,
                 log4j: Path = TOOLS_LOG4J, logs_dir: Path | None = None) -> list[str]:
    command = ["java"]
    if heap:
        command += [f"-Xms{heap}", f"-Xmx{heap}"]
    command += [
        "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log4j}",
    ]
    if logs_dir is not None:
        command.append(f"-Dkafka.logs.dir={logs_dir}")
    return [*command, "-cp", f"{jars_dir(settings)}/*", main_class, *args]


def tool_argv(settings: Settings, tool: str, args: list[str]) -> list[str]:
    """The command line of a Kafka CLI tool, with --bootstrap-server added when the caller gave none."""
    if tool not in TOOLS:
        raise StackError(f"unknown Kafka tool {tool!r}; known: {', '.join(sorted(TOOLS))}")
    if "--bootstrap-server" not in args and "--bootstrap-controller" not in args:
        args = ["--bootstrap-server", settings.bootstrap_servers, *args]
    return java_command(settings, TOOLS[tool], *args)


@dataclasses.dataclass(frozen=True)
class KafkaNode:
    """One KRaft node of the local stack: its id and loopback ports."""

    node_id: int
    port: int
    controller_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def cluster_nodes(settings: Settings) -> tuple[KafkaNode, ...]:
    """The local stack's nodes: node n (from 1) on NOTIFY_KAFKA_PORT + 2(n-1) and the controller port + 2(n-1), so
    the default 9092/9093 becomes 9092/9093, 9094/9095, 9096/9097 for three. ConfigError when ports collide."""
    nodes = tuple(KafkaNode(n + 1, settings.kafka_port + 2 * n, settings.kafka_controller_port + 2 * n)
                  for n in range(settings.kafka_brokers))
    ports = [port for node in nodes for port in (node.port, node.controller_port)]
    if len(set(ports)) != len(ports) or max(ports) > 65535:
        raise ConfigError(f"NOTIFY_KAFKA_PORT {settings.kafka_port} and NOTIFY_KAFKA_CONTROLLER_PORT "
                          f"{settings.kafka_controller_port} give {settings.kafka_brokers} nodes colliding or "
                          f"impossible ports {ports}; keep the controller port odd-offset from the broker port")
    return nodes


def replication_defaults(brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) of the internal topics on `brokers` nodes: 3 and 2 where the
    cluster has them, else what it has."""
    replicas = min(3, brokers)
    return replicas, min(2, replicas)


def controller_voters(settings: Settings) -> str:
    return ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in cluster_nodes(settings))


def server_properties(settings: Settings, data_dir: Path, node_id: int = 1) -> str:
    """The node's server.properties: with one broker, the single standalone node; with more, node `node_id` of
    the static quorum."""
    if settings.kafka_brokers > 1:
        return _cluster_properties(settings, data_dir, node_id)
    broker, controller = settings.kafka_port, settings.kafka_controller_port
    return "\n".join([
        "# generated by `notify stack up` from pipeline/stack/kafka.py; edits are overwritten",
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.bootstrap.servers=127.0.0.1:{controller}",
        f"listeners=PLAINTEXT://127.0.0.1:{broker},CONTROLLER://127.0.0.1:{controller}",
        f"advertised.listeners=PLAINTEXT://127.0.0.1:{broker},CONTROLLER://127.0.0.1:{controller}",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=PLAINTEXT",
        f"log.dirs={data_dir}",
        # our topics come from topics/; a misspelt name must fail, not quietly create a topic
        "auto.create.topics.enable=false",
        "num.partitions=1",
        # a single node: internal topics cannot have more than one replica
        "offsets.topic.replication.factor=1",
        "offsets.topic.num.partitions=12",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        # consumers join at once instead of waiting 3 s for more members (tests and restarts are faster)
        "group.initial.rebalance.delay.ms=0",
        # the cleaner's dedupe buffer defaults to 128 MiB, too much for a 512 MB heap
        "log.cleaner.dedupe.buffer.size=33554432",
        "num.network.threads=2",
        "num.io.threads=4",
        "",
    ])


def _cluster_properties(settings: Settings, data_dir: Path, node_id: int) -> str:
    node = next((n for n in cluster_nodes(settings) if n.node_id == node_id), None)
    if node is None:
        raise StackError(f"node {node_id} is not one of the {settings.kafka_brokers} nodes")
    replicas, min_isr = replication_defaults(settings.kafka_brokers)
    listeners = f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}"
    return "\n".join([
        "# generated by `notify stack up` from pipeline/stack/kafka.py; edits are overwritten",
        f"# node {node_id} of {settings.kafka_brokers}: broker + controller, a static quorum of every node",
        "process.roles=broker,controller",
        f"node.id={node_id}",
        f"controller.quorum.voters={controller_voters(settings)}",
        f"listeners={listeners}",
        f"advertised.listeners={listeners}",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=PLAINTEXT",
        f"log.dirs={data_dir}",
        "auto.create.topics.enable=false",
        "num.partitions=1",
        # internal topics replicated as ours are (topics/ declares 3 and 2): an acknowledged commit survives a loss
        f"default.replication.factor={replicas}",
        f"min.insync.replicas={min_isr}",
        f"offsets.topic.replication.factor={replicas}",
        "offsets.topic.num.partitions=12",
        f"transaction.state.log.replication.factor={replicas}",
        f"transaction.state.log.min.isr={min_isr}",
        f"share.coordinator.state.topic.replication.factor={replicas}",
        f"share.coordinator.state.topic.min.isr={min_isr}",
        "unclean.leader.election.enable=false",
        "group.initial.rebalance.delay.ms=0",
        "log.cleaner.dedupe.buffer.size=33554432",
        "num.network.threads=2",
        "num.io.threads=4",
        "",
    ])


def format_command(settings: Settings, cluster_id: str, properties: Path) -> list[str]:
    """`StorageTool format`: standalone for one node; with a static quorum every node is formatted alike."""
    flags = ["--standalone"] if settings.kafka_brokers == 1 else []
    return java_command(settings, "kafka.tools.StorageTool", "format", *flags, "-t", cluster_id,
                        "-c", str(properties))


class KafkaService(LocalService):
    """One KRaft node: `kafka` when the stack runs one, `kafka-1`.. `kafka-N` (each its own folder) for a cluster."""

    name = "kafka"

    def __init__(self, settings: Settings, node_id: int = 1) -> None:
        super().__init__(settings)
        self.node = next(n for n in cluster_nodes(settings) if n.node_id == node_id)
        self.name = "kafka" if settings.kafka_brokers == 1 else f"kafka-{node_id}"

    @property
    def external(self) -> bool:
        return self.settings.kafka_external

    @property
    def address(self) -> str:
        return self.settings.bootstrap_servers if self.settings.kafka_brokers == 1 else self.node.address

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.node.port, self.node.controller_port)

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"

    def ready(self, timeout_s: float = 3.0) -> bool:
        if self.external or self.settings.kafka_brokers == 1:
            return kafka_clients.cluster_ready(self.settings, timeout_s)
        # this node answers and is registered as a broker of the cluster
        own = dataclasses.replace(self.settings, kafka_bootstrap_servers=self.node.address)
        return self.node.node_id in kafka_clients.broker_ids(own, timeout_s)

    def _cluster_id(self) -> str:
        """One id for every node of the stack (kept beside the node folders), made on first use."""
        if self.settings.kafka_brokers == 1:
            return self._random_uuid()
        path = self.settings.stack_dir / "kafka-cluster.id"
        if not path.exists():
            path.write_text(self._random_uuid())
        return path.read_text().strip()

    def _random_uuid(self) -> str:
        return subprocess.run(
            java_command(self.settings, "kafka.tools.StorageTool", "random-uuid"),
            capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()[-1]

    def install(self) -> None:
        jars_dir(self.settings)

    def start(self) -> OwnedProcess:
        data_dir = self.home / "data"
        properties = self.home / "server.properties"
        properties.write_text(server_properties(self.settings, data_dir, self.node.node_id))
        if not (data_dir / "meta.properties").exists():  # format once; a new cluster id would not match the log
            formatted = subprocess.run(format_command(self.settings, self._cluster_id(), properties),
                                       capture_output=True, text=True, check=False)
            if formatted.returncode != 0:
                raise StackError(f"formatting Kafka storage failed:\n{tail_text(formatted.stdout + formatted.stderr)}")
        console = self.home / "kafka.out"
        with console.open("ab") as out:
            process = subprocess.Popen(
                java_command(self.settings, "kafka.Kafka", str(properties), heap=self.settings.kafka_heap,
                             log4j=BROKER_LOG4J, logs_dir=self.home),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.home,
                start_new_session=True,
            )
        owned = OwnedProcess.of(process.pid)
        if owned is None:
            raise StackError(f"kafka exited at once; last lines of {console}:\n{tail_file(console)}")
        return owned

    def failure_log(self) -> str:
        console = self.home / "kafka.out"
        return f"{tail_file(self.log_path)}\n--- {console} ---\n{tail_file(console, 15)}"
