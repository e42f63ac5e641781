"""docker-compose.kafka.yml cannot run here (no Docker engine); it must still describe the local stack exactly."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import config
from pipeline.config import LOCAL_DB_NAME, LOCAL_DB_PASSWORD, LOCAL_DB_USER, Settings
from pipeline.stack.common import find_binary
from pipeline.stack.kafka import kafka_version, server_properties

REPO = Path(__file__).resolve().parent.parent
# settings that only make sense inside a container (addresses, data folder)
CONTAINER_SPECIFIC = {"listeners", "advertised.listeners", "controller.quorum.bootstrap.servers", "log.dirs"}
GRAFANA_PORT = 53000  # Grafana runs only under compose; the stack has no setting for it


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


def listens(name: str, service: dict[str, Any]) -> tuple[str, int]:
    """(address, port) a service on the host's network listens on, from its command or environment."""
    if name == "prometheus":
        host, port = flag(service, "web.listen-address").rsplit(":", 1)
    elif name == "grafana":
        host, port = service["environment"]["GF_SERVER_HTTP_ADDR"], service["environment"]["GF_SERVER_HTTP_PORT"]
    else:
        raise AssertionError(f"{name} uses the host's network: say here how it sets its listen address")
    return str(host), int(port)


def image_tag(service: dict[str, Any]) -> str:
    return str(service["image"]).rsplit(":", 1)[1]


def test_compose_has_the_local_stack_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"kafka", "postgres", "redis", "prometheus", "grafana"}
    for name, service in compose["services"].items():
        assert "healthcheck" in service, f"{name} needs a health check"
        for host, _ in published(service).values():
            assert host == "127.0.0.1", f"{name} must publish on loopback only"


def test_services_on_the_host_network_listen_on_loopback_only(compose: dict[str, Any]) -> None:
    on_host = {name: service for name, service in compose["services"].items()
               if service.get("network_mode") == "host"}
    assert set(on_host) == {"prometheus", "grafana"}
    for name, service in on_host.items():
        assert "ports" not in service, f"{name} shares the host's network: there is nothing to publish"
        host, port = listens(name, service)
        assert host == "127.0.0.1", f"{name} must listen on the host's loopback only"
        assert f"http://{host}:{port}/" in " ".join(service["healthcheck"]["test"]), (
            f"{name}'s health check must ask the address it listens on")


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
    assert listens("prometheus", prometheus) == ("127.0.0.1", settings.prometheus_port)
    assert flag(prometheus, "config.file") == "/etc/prometheus/prometheus.yml"
    assert flag(prometheus, "storage.tsdb.path") == "/prometheus"
    assert "./infra/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert yaml.safe_load((REPO / "infra" / "prometheus" / "prometheus.yml").read_text())["global"]


def test_grafana_is_pinned_provisioned_and_open_to_anonymous_viewers(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", image_tag(grafana)), "pin Grafana to a release"
    assert grafana["network_mode"] == "host"
    assert listens("grafana", grafana) == ("127.0.0.1", GRAFANA_PORT)
    assert "./infra/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./infra/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    env = grafana["environment"]
    assert (env["GF_AUTH_ANONYMOUS_ENABLED"], env["GF_AUTH_ANONYMOUS_ORG_ROLE"]) == ("true", "Viewer")
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
