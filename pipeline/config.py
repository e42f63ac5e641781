"""The one configuration module: environment variables with documented defaults.

Every setting is read once into a frozen `Settings`. A malformed value, or a `NOTIFY_*` variable this module does
not know (usually a typo), fails at start-up with a message that names it. The table in `SETTINGS` is the
documentation: `notify config` prints it with the values in force.

Three variables switch a service from "started locally by `notify stack up`" to "use what is given":
`KAFKA_BOOTSTRAP_SERVERS`, `DATABASE_URL` and `REDIS_URL`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Setting:
    env: str
    default: str | None
    help: str
    parse: Callable[[str], Any] = str


def _port(raw: str) -> int:
    port = int(raw)
    if not 0 < port < 65536:
        raise ValueError(f"{port} is not a TCP port")
    return port


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError(f"{value} is not a positive integer")
    return value


def _heap(raw: str) -> str:
    if not raw[:-1].isdigit() or raw[-1].lower() not in "mg":
        raise ValueError(f"{raw!r} is not a JVM heap size such as 512m or 1g")
    return raw


def _topic_prefix(raw: str) -> str:
    if raw and not all(c.isalnum() or c in "._-" for c in raw):
        raise ValueError(f"{raw!r} may only hold letters, digits, '.', '_' and '-'")
    return raw


# name -> Setting. Names are the Settings attributes.
SETTINGS: dict[str, Setting] = {
    "stack_dir": Setting(
        "NOTIFY_STACK_DIR", str(REPO_ROOT / ".stack"),
        "Folder of the local stack: data, logs and pid files of the services `notify stack up` starts.", Path),
    "cache_dir": Setting(
        "NOTIFY_CACHE_DIR", str(REPO_ROOT / ".cache"),
        "Folder for downloaded artefacts (the Kafka jars).", Path),
    "kafka_bootstrap_servers": Setting(
        "KAFKA_BOOTSTRAP_SERVERS", None,
        "Use this Kafka cluster instead of starting one (host:port[,host:port...]).", str),
    "kafka_port": Setting("NOTIFY_KAFKA_PORT", "9092", "Local Kafka broker port (127.0.0.1).", _port),
    "kafka_controller_port": Setting(
        "NOTIFY_KAFKA_CONTROLLER_PORT", "9093", "Local KRaft controller port (127.0.0.1).", _port),
    "kafka_heap": Setting("NOTIFY_KAFKA_HEAP", "512m", "Heap of the local Kafka broker JVM.", _heap),
    "database_url": Setting(
        "DATABASE_URL", None,
        "Use this PostgreSQL database instead of starting one (postgresql://user:pass@host:port/db).", str),
    "postgres_port": Setting("NOTIFY_POSTGRES_PORT", "55432", "Local PostgreSQL port (127.0.0.1).", _port),
    "prometheus_port": Setting("NOTIFY_PROMETHEUS_PORT", "59090", "Local Prometheus port (127.0.0.1).", _port),
    "redis_url": Setting("REDIS_URL", None, "Use this Redis instead of starting one (redis://host:port/db).", str),
    "redis_port": Setting("NOTIFY_REDIS_PORT", "56379", "Local Redis port (127.0.0.1).", _port),
    "schema_registry_url": Setting(
        "SCHEMA_REGISTRY_URL", None,
        "Confluent-compatible schema registry: when set, records use Confluent framing (magic byte + schema id); "
        "otherwise Avro single-object encoding.", str),
    "topic_prefix": Setting(
        "NOTIFY_TOPIC_PREFIX", "",
        "Prefix put before every topic name of topics/ (isolates test runs and tenants on a shared cluster).",
        _topic_prefix),
    "db_pool_size": Setting("NOTIFY_DB_POOL_SIZE", "10", "Largest PostgreSQL connection pool per process.",
                            _positive_int),
    "dedup_window_s": Setting(
        "NOTIFY_DEDUP_WINDOW_S", "604800",
        "How long intake remembers a (user, type, idempotency key) in its table (default 7 days); PostgreSQL's "
        "unique key guards beyond it.", _positive_int),
    "metrics_port": Setting(
        "NOTIFY_METRICS_PORT", "59400",
        "Base /metrics port: the API uses it, each worker process the next ones (127.0.0.1).", _port),
    "api_port": Setting("NOTIFY_API_PORT", "58080", "Port of the ingest and settings API (127.0.0.1).", _port),
    "log_level": Setting("NOTIFY_LOG_LEVEL", "WARNING", "Log level of workers and the API.", str),
    "ready_timeout_s": Setting(
        "NOTIFY_READY_TIMEOUT_S", "120", "How long `stack up` waits for each service to become ready.",
        _positive_int),
}

LOCAL_DB_USER = "notify"
LOCAL_DB_PASSWORD = "notify"  # loopback-only development cluster; production sets DATABASE_URL
LOCAL_DB_NAME = "notify"


@dataclass(frozen=True)
class Settings:
    stack_dir: Path
    cache_dir: Path
    kafka_bootstrap_servers: str | None
    kafka_port: int
    kafka_controller_port: int
    kafka_heap: str
    database_url: str | None
    postgres_port: int
    prometheus_port: int
    redis_url: str | None
    redis_port: int
    schema_registry_url: str | None
    topic_prefix: str
    db_pool_size: int
    dedup_window_s: int
    metrics_port: int
    api_port: int
    log_level: str
    ready_timeout_s: int
    raw: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    # Which services are someone else's (given through the environment) and which the stack starts.
    @property
    def kafka_external(self) -> bool:
        return self.kafka_bootstrap_servers is not None

    @property
    def postgres_external(self) -> bool:
        return self.database_url is not None

    @property
    def redis_external(self) -> bool:
        return self.redis_url is not None

    @property
    def bootstrap_servers(self) -> str:
        return self.kafka_bootstrap_servers or f"127.0.0.1:{self.kafka_port}"

    @property
    def dsn(self) -> str:
        return self.database_url or (
            f"postgresql://{LOCAL_DB_USER}:{LOCAL_DB_PASSWORD}@127.0.0.1:{self.postgres_port}/{LOCAL_DB_NAME}"
        )

    @property
    def redis_dsn(self) -> str:
        return self.redis_url or f"redis://127.0.0.1:{self.redis_port}/0"

    def topic(self, name: str) -> str:
        """The physical name of a topic declared in topics/."""
        return f"{self.topic_prefix}{name}"


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Read settings from `environ` (default: the process environment); raise ConfigError on bad input."""
    env = os.environ if environ is None else environ
    known = {s.env for s in SETTINGS.values()}
    unknown = sorted(k for k in env if k.startswith("NOTIFY_") and k not in known)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    for name, setting in SETTINGS.items():
        raw = env.get(setting.env)
        if raw is None or raw == "":
            values[name] = None if setting.default is None else setting.parse(setting.default)
            continue
        try:
            values[name] = setting.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{setting.env}={raw!r} is malformed: {exc}") from None
    return Settings(**values, raw={s.env: env[s.env] for s in SETTINGS.values() if s.env in env})


@cache
def settings() -> Settings:
    """The process-wide settings, read once."""
    return load()
