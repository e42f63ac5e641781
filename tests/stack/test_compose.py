"""docker-compose.kafka.yml and the Dockerfile cannot run here (no Docker engine); they must still describe the local
stack and the pipeline's processes exactly."""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from connectors import fcm_push
from pipeline import config
from pipeline.api.app import DEFAULT_HOST as API_HOST
from pipeline.cli.parser import build_parser
from pipeline.config import LOCAL_DB_NAME, LOCAL_DB_PASSWORD, LOCAL_DB_USER, REPO_ROOT, Settings
from pipeline.domain import LANES, STAGES
from pipeline.kafka import schemas, topics
from pipeline.policy import ratelimit
from pipeline.stack.common import find_binary
from pipeline.stack.kafka import cluster_nodes, kafka_version, server_properties
from pipeline.stages.worker import exporter_port, metrics_port, processes
from pipeline.state import migrate

REPO = Path(__file__).resolve().parents[2]
# settings that only make sense inside a container (addresses, data folder)
CONTAINER_SPECIFIC = {"listeners", "advertised.listeners", "controller.quorum.bootstrap.servers", "log.dirs"}
GRAFANA_PORT = 53000  # Grafana runs only under compose; the stack has no setting for it
INFRASTRUCTURE = {"kafka", "postgres", "redis", "prometheus", "grafana"}
# the three-node Kafka (`NOTIFY_KAFKA_BROKERS=3 notify stack up`), under the "cluster" profile
CLUSTER_PROFILE = "cluster"
CLUSTER = {"kafka-1": 1, "kafka-2": 2, "kafka-3": 3}
# the pipeline's processes, built from the Dockerfile, under the "pipeline" profile
PIPELINE_PROFILE = "pipeline"
ONE_SHOT = {"migrate": ["migrate"], "topics": ["topics", "apply"]}
LONG_RUNNING = {"api": ["api"], "workers": ["worker", "--all"], "simulator": ["simulator"]}
WORKER_HOST = "127.0.0.1"  # pipeline/process/health.py: serve binds the loopback
# the health check the pipeline's services use: `python -c PROBE PATH PORT...` asks http://127.0.0.1:PORT/PATH
PROBE_URL = 'f"http://127.0.0.1:{port}{path}"'


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    parsed: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.kafka.yml").read_text())
    return parsed


def published(service: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """container port -> (host address, host port)"""
    result = {}
    for mapping in service.get("ports", []):
        host, host_port, container_port = mapping.split(":")
        result[int(container_port)] = (host, int(host_port))
    return result


def flag(service: dict[str, Any], name: str) -> str:
    """The value of `--name=value` in a service's command."""
    values = [str(arg).split("=", 1)[1] for arg in service["command"] if str(arg).startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name}= should be given once in {service['command']}"
    return values[0]


def cli_args(service: dict[str, Any]) -> argparse.Namespace:
    """A pipeline service's command as `python -m pipeline` (the Dockerfile's entry point) parses it."""
    try:
        return build_parser().parse_args([str(arg) for arg in service["command"]])
    except SystemExit as exc:  # argparse's way of rejecting a command line
        raise AssertionError(f"{service['command']} is not a command of `python -m pipeline`") from exc


def pipeline_settings(service: dict[str, Any]) -> Settings:
    """The settings a pipeline service's processes read from its environment (unknown NOTIFY_* variables fail)."""
    return config.load({key: str(value) for key, value in service.get("environment", {}).items()})


def listens(name: str, service: dict[str, Any]) -> list[tuple[str, int]]:
    """(address, port) of each HTTP server a service on the host's network runs, from its command or environment."""
    if name == "prometheus":
        host, port = flag(service, "web.listen-address").rsplit(":", 1)
        return [(str(host), int(port))]
    if name == "grafana":
        env = service["environment"]
        return [(str(env["GF_SERVER_HTTP_ADDR"]), int(env["GF_SERVER_HTTP_PORT"]))]
    if name in CLUSTER:  # PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093
        return [(str(urlsplit(url).hostname), int(urlsplit(url).port or 0))
                for url in str(service["environment"]["KAFKA_LISTENERS"]).split(",")]
    if name in LONG_RUNNING:
        settings, args = pipeline_settings(service), cli_args(service)
        if args.command == "api":
            return [(API_HOST, args.port or settings.api_port)]
        if args.command == "worker":
            return [*((WORKER_HOST, metrics_port(settings, stage, lane)) for stage, lane in processes(LANES, STAGES)),
                    (WORKER_HOST, exporter_port(settings))]
        if args.command == "simulator":  # its HTTP/1.1 port (APNs' HTTP/2 port is not probed)
            return [(args.host, args.port or settings.simulator_port)]
    raise AssertionError(f"{name} uses the host's network: say here how it sets its listen address")


def probed(service: dict[str, Any]) -> set[str]:
    """The URLs a service's health check asks."""
    test = [str(arg) for arg in service["healthcheck"]["test"]]
    if test[:3] == ["CMD", "python", "-c"]:
        script, path, ports = test[3], test[4], test[5:]
        assert PROBE_URL in script and "urlopen" in script, f"unexpected health check script {script!r}"
        return {f"http://127.0.0.1:{int(port)}{path}" for port in ports}
    if test[0] == "CMD-SHELL" and "--bootstrap-server" in test[1]:  # a Kafka node: Kafka's own client asks it
        return {f"kafka://{test[1].split('--bootstrap-server', 1)[1].split()[0]}/"}
    return {arg for arg in test if arg.startswith("http://")}


def pipeline_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: service for name, service in compose["services"].items()
            if name not in INFRASTRUCTURE and name not in CLUSTER}


def image_tag(service: dict[str, Any]) -> str:
    return str(service["image"]).rsplit(":", 1)[1]


def test_compose_has_the_local_stack_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == INFRASTRUCTURE | set(CLUSTER) | set(ONE_SHOT) | set(LONG_RUNNING)
    for name, service in compose["services"].items():
        if name not in ONE_SHOT:
            assert "healthcheck" in service, f"{name} needs a health check"
        for host, _ in published(service).values():
            assert host == "127.0.0.1", f"{name} must publish on loopback only"


def test_plain_up_starts_the_infrastructure_alone(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name in INFRASTRUCTURE:
            assert "profiles" not in service, f"`docker compose up` must start {name}"
        elif name in CLUSTER:
            assert service["profiles"] == [CLUSTER_PROFILE], f"{name} belongs to the {CLUSTER_PROFILE!r} profile"
        else:
            assert service["profiles"] == [PIPELINE_PROFILE], f"{name} belongs to the {PIPELINE_PROFILE!r} profile"


def test_services_on_the_host_network_listen_on_loopback_only(compose: dict[str, Any]) -> None:
    on_host = {name: service for name, service in compose["services"].items()
               if service.get("network_mode") == "host"}
    assert set(on_host) == {"prometheus", "grafana"} | set(CLUSTER) | set(ONE_SHOT) | set(LONG_RUNNING)
    for name, service in on_host.items():
        assert "ports" not in service, f"{name} shares the host's network: there is nothing to publish"
        if name in ONE_SHOT:
            continue
        addresses = listens(name, service)
        for host, _ in addresses:
            assert host == "127.0.0.1", f"{name} must listen on the host's loopback only"
        host, port = addresses[0]  # a Kafka node's clients' listener comes first, its controller's after
        scheme = "kafka" if name in CLUSTER else "http"
        assert any(url.startswith(f"{scheme}://{host}:{port}/") for url in probed(service)), (
            f"{name}'s health check must ask the address it listens on ({host}:{port})")


def test_kafka_is_the_same_version_port_and_settings(compose: dict[str, Any]) -> None:
    settings = config.load({})
    kafka = compose["services"]["kafka"]
    assert image_tag(kafka) == kafka_version()
    assert published(kafka)[9092] == ("127.0.0.1", settings.kafka_port)
    env = kafka["environment"]
    local = dict(line.split("=", 1) for line in server_properties(settings, Path("/data")).splitlines()
                 if line and not line.startswith("#"))
    for key, value in local.items():
        if key in CONTAINER_SPECIFIC:
            continue
        env_key = "KAFKA_" + key.upper().replace(".", "_")
        assert env.get(env_key) == value, f"{env_key} should be {value!r} as in the local stack"
    assert env["KAFKA_HEAP_OPTS"] == f"-Xms{settings.kafka_heap} -Xmx{settings.kafka_heap}"


def test_the_cluster_profile_is_the_local_three_node_stack(compose: dict[str, Any]) -> None:
    """Each node of the "cluster" profile runs what `NOTIFY_KAFKA_BROKERS=3 notify stack up` runs for that node, every
    setting the same (host networking: the same listeners too) but the data folder; one cluster id for all."""
    settings = config.load({"NOTIFY_KAFKA_BROKERS": "3"})
    nodes = {node.node_id: node for node in cluster_nodes(settings)}
    assert sorted(CLUSTER.values()) == sorted(nodes)
    cluster_ids: set[str] = set()
    volumes: set[str] = set()
    for name, node_id in CLUSTER.items():
        service = compose["services"][name]
        assert image_tag(service) == kafka_version()
        assert service["network_mode"] == "host"
        env = {key: str(value) for key, value in service["environment"].items()}
        local = dict(line.split("=", 1) for line in server_properties(settings, Path("/data"), node_id).splitlines()
                     if line and not line.startswith("#"))
        expected = {"KAFKA_" + key.upper().replace(".", "_"): value for key, value in local.items()}
        expected["KAFKA_LOG_DIRS"] = "/var/lib/kafka/data"  # the container's own folder, on a volume of its own
        assert {key: value for key, value in env.items() if key.startswith("KAFKA_") and key != "KAFKA_HEAP_OPTS"} == (
            expected), f"{name} must run node {node_id} of the local three-node stack"
        assert env["KAFKA_HEAP_OPTS"] == f"-Xms{settings.kafka_heap} -Xmx{settings.kafka_heap}"
        assert listens(name, service)[0] == ("127.0.0.1", nodes[node_id].port)
        assert f"kafka://127.0.0.1:{nodes[node_id].port}/" in probed(service)
        cluster_ids.add(env["CLUSTER_ID"])
        volumes.update(v for v in service["volumes"] if v.endswith(":/var/lib/kafka/data"))
    assert len(cluster_ids) == 1, "every node of one cluster is formatted with the same cluster id"
    assert len(volumes) == len(CLUSTER), "each node keeps its own data"
    assert settings.bootstrap_servers == ",".join(node.address for node in nodes.values())


# These two compare with the Debian packages the stack installs: the `settings` fixture brings the stack up first.
def test_postgres_is_the_same_major_version_port_and_credentials(compose: dict[str, Any], settings: Settings) -> None:
    settings = config.load({})
    postgres = compose["services"]["postgres"]
    pg_ctl = find_binary("pg_ctl")
    assert pg_ctl is not None, "Debian's PostgreSQL must be installed (`notify stack up` installs it)"
    local_major = re.search(r"/postgresql/(\d+)/", str(Path(pg_ctl).resolve()))
    assert local_major is not None
    assert image_tag(postgres) == local_major.group(1)
    assert published(postgres)[5432] == ("127.0.0.1", settings.postgres_port)
    env = postgres["environment"]
    assert (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]) == (
        LOCAL_DB_USER, LOCAL_DB_PASSWORD, LOCAL_DB_NAME)


def test_redis_is_the_same_version_and_port(compose: dict[str, Any], settings: Settings) -> None:
    settings = config.load({})
    redis = compose["services"]["redis"]
    binary = find_binary("redis-server")
    assert binary is not None, "Debian's redis-server must be installed (`notify stack up` installs it)"
    version = re.search(r"v=(\d+\.\d+\.\d+)", subprocess.run([binary, "--version"], capture_output=True,
                                                            text=True, check=True).stdout)
    assert version is not None
    assert image_tag(redis) == version.group(1)
    assert published(redis)[6379] == ("127.0.0.1", settings.redis_port)


def test_prometheus_uses_the_repo_config_on_the_stack_port(compose: dict[str, Any]) -> None:
    settings = config.load({})
    prometheus = compose["services"]["prometheus"]
    # host networking: it scrapes the workers, API and exporter on the host's 127.0.0.1
    assert prometheus["network_mode"] == "host"
    assert listens("prometheus", prometheus) == [("127.0.0.1", settings.prometheus_port)]
    assert flag(prometheus, "config.file") == "/etc/prometheus/prometheus.yml"
    assert flag(prometheus, "storage.tsdb.path") == "/prometheus"
    assert "./infra/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert yaml.safe_load((REPO / "infra" / "prometheus" / "prometheus.yml").read_text())["global"]


def test_grafana_is_pinned_provisioned_and_open_to_anonymous_viewers(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", image_tag(grafana)), "pin Grafana to a release"
    assert grafana["network_mode"] == "host"
    assert listens("grafana", grafana) == [("127.0.0.1", GRAFANA_PORT)]
    assert "./infra/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./infra/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    env = grafana["environment"]
    assert (env["GF_AUTH_ANONYMOUS_ENABLED"], env["GF_AUTH_ANONYMOUS_ORG_ROLE"]) == ("true", "Viewer")
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_pipeline_services_run_real_commands_of_the_image(compose: dict[str, Any]) -> None:
    services = pipeline_services(compose)
    assert {name: service["command"] for name, service in services.items()} == ONE_SHOT | LONG_RUNNING
    for service in services.values():
        assert service["build"] == ".", "the pipeline's services run the Dockerfile's image"
        assert service["network_mode"] == "host"
        cli_args(service)


def test_pipeline_health_checks_ask_every_process_where_the_code_serves_it(compose: dict[str, Any]) -> None:
    services = pipeline_services(compose)
    defaults = config.load({})
    worker_ports = [metrics_port(defaults, stage, lane) for stage, lane in processes(LANES, STAGES)]
    expected = {
        # /health/ready: 200 only while the process reaches Kafka, PostgreSQL and Redis (pipeline/process/health.py)
        "api": {f"http://127.0.0.1:{defaults.api_port}/health/ready"},
        "workers": {f"http://127.0.0.1:{port}/health/ready" for port in [*worker_ports, exporter_port(defaults)]},
        # the simulator reaches none of them: its own health route (connectors/simulator/app.py)
        "simulator": {f"http://127.0.0.1:{defaults.simulator_port}/_admin/health"},
    }
    for name, urls in expected.items():
        assert probed(services[name]) == urls, f"{name}'s health check must ask {sorted(urls)}"
    for name in ONE_SHOT:
        assert "healthcheck" not in services[name], f"{name} runs once and exits: it has nothing to check"


def test_pipeline_services_point_at_the_compose_infrastructure(compose: dict[str, Any]) -> None:
    infra = compose["services"]
    postgres_env = infra["postgres"]["environment"]
    kafka_host, kafka_port = published(infra["kafka"])[9092]
    postgres_host, postgres_port = published(infra["postgres"])[5432]
    redis_host, redis_port = published(infra["redis"])[6379]
    api_settings = pipeline_settings(infra["api"])
    for name, service in pipeline_services(compose).items():
        env = service["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == f"{kafka_host}:{kafka_port}", name
        database = urlsplit(env["DATABASE_URL"])
        assert (database.scheme, database.hostname, database.port) == ("postgresql", postgres_host, postgres_port), name
        assert (database.username, database.password, database.path) == (
            postgres_env["POSTGRES_USER"], postgres_env["POSTGRES_PASSWORD"], f"/{postgres_env['POSTGRES_DB']}"), name
        cache = urlsplit(env["REDIS_URL"])
        assert (cache.scheme, cache.hostname, cache.port) == ("redis", redis_host, redis_port), name
        # receipts come back to the API's webhook receiver (POST /webhooks/{provider}, pipeline/api/webhooks.py)
        assert env["NOTIFY_WEBHOOK_BASE_URL"] == f"http://{API_HOST}:{api_settings.api_port}/webhooks", name
        # and these are the addresses the local stack has too: `make run` and compose are interchangeable
        settings, local = pipeline_settings(service), config.load({})
        assert (settings.bootstrap_servers, settings.dsn, settings.redis_dsn) == (
            local.bootstrap_servers, local.dsn, local.redis_dsn), name


def test_pipeline_services_start_after_the_infrastructure_and_the_one_shot_setup(compose: dict[str, Any]) -> None:
    services = pipeline_services(compose)
    healthy = {"condition": "service_healthy"}
    completed = {"condition": "service_completed_successfully"}
    assert services["migrate"]["depends_on"] == {"postgres": healthy}
    assert services["topics"]["depends_on"] == {"kafka": healthy}
    for name in ("api", "workers"):
        depends_on = services[name]["depends_on"]
        for dependency in ("kafka", "postgres", "redis"):
            assert depends_on[dependency] == healthy, f"{name} must wait for {dependency}'s health"
        for setup in ONE_SHOT:
            assert depends_on[setup] == completed, f"{name} must wait for {setup} to finish"
    assert services["workers"]["depends_on"]["simulator"] == healthy, "the senders call the simulator"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines
            if line and not line.startswith("#")]


def test_the_image_runs_the_cli_as_a_user_from_the_locked_install() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    entrypoints = [json.loads(args) for op, args in instructions if op == "ENTRYPOINT"]
    assert entrypoints == [["python", "-m", "pipeline"]]
    runs = " ".join(args for op, args in instructions if op == "RUN")
    # in place (-e): pipeline/config/catalogue.py's REPO_ROOT is then the copied tree, whose files the processes read
    assert "pip install -c requirements.lock -e ." in runs
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the processes must not run as root"


def test_the_image_holds_every_file_the_processes_read_at_runtime() -> None:
    instructions = dockerfile_instructions()
    workdir = [args for op, args in instructions if op == "WORKDIR"][-1].rstrip("/")
    copied = []
    for op, args in instructions:
        if op == "COPY":
            *sources, target = args.split()
            into = Path(target.removeprefix(f"{workdir}/") if target.startswith("/") else target)
            for source in (source.rstrip("/") for source in sources):
                # a folder's contents go into the target; a file into a target folder keeps its name
                landed = into if (REPO_ROOT / source).is_dir() or not target.endswith("/") else into / Path(source).name
                assert landed == Path(source), f"COPY {source} must keep the repository's layout under {workdir}"
                copied.append(source)
    ignored = [line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    needed = [schemas.SCHEMAS_DIR, topics.TOPICS_FILE, migrate.MIGRATIONS_DIR, ratelimit.DEFAULT_POLICY_PATH,
              fcm_push.SIMULATOR_ACCOUNT, config.load({}).apns_private_key, config.load({}).templates_dir,
              REPO_ROOT / "pyproject.toml", REPO_ROOT / "requirements.lock", REPO_ROOT / "pipeline",
              REPO_ROOT / "connectors"]
    for path in needed:
        relative = path.relative_to(REPO_ROOT).as_posix()
        assert path.exists(), relative
        assert any(relative == source or relative.startswith(f"{source}/") for source in copied), (
            f"the Dockerfile must copy {relative}")
        prefixes = [relative, *(parent.as_posix() for parent in Path(relative).parents if parent != Path("."))]
        for pattern in ignored:
            assert not any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes), (
                f".dockerignore's {pattern!r} leaves {relative} out")
