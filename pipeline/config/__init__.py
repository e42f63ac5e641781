"""The one configuration module: environment variables with documented defaults.

Every setting is read once into a frozen `Settings`. A malformed value, or a `NOTIFY_*` variable this module does
not know (usually a typo), fails at start-up with a message that names it. The table in `SETTINGS` is the
documentation: `notify config` prints it with the values in force.

Three variables switch a service from "started locally by `notify stack up`" to "use what is given":
`KAFKA_BOOTSTRAP_SERVERS`, `DATABASE_URL` and `REDIS_URL`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from pipeline.config.catalogue import REPO_ROOT, SETTINGS, Setting
from pipeline.domain import PROVIDERS
from pipeline.errors import ConfigError

# The package's face: what the rest of the code imports from `pipeline.config`.
__all__ = ["LOCAL_DB_NAME", "LOCAL_DB_PASSWORD", "LOCAL_DB_USER", "REPO_ROOT", "SETTINGS", "Setting", "Settings",
           "load", "settings", "value"]

LOCAL_DB_USER = "notify"
LOCAL_DB_PASSWORD = "notify"  # loopback-only development cluster; production sets DATABASE_URL
LOCAL_DB_NAME = str(SETTINGS["postgres_db"].default)  # what `notify run` uses; the tests set NOTIFY_POSTGRES_DB


@dataclass(frozen=True)
class Settings:
    stack_dir: Path
    cache_dir: Path
    templates_dir: Path
    kafka_bootstrap_servers: str | None
    kafka_port: int
    kafka_controller_port: int
    kafka_heap: str
    kafka_brokers: int
    database_url: str | None
    postgres_port: int
    postgres_db: str
    prometheus_port: int
    prometheus_url: str | None
    redis_url: str | None
    redis_port: int
    schema_registry_url: str | None
    topic_prefix: str
    db_pool_size: int
    dedup_window_s: int
    metrics_port: int
    metrics_enabled: bool
    exporter_interval_s: float
    provider_prices_usd: tuple[tuple[str, float], ...]
    api_port: int
    console_secret: str | None
    log_level: str
    ready_timeout_s: int
    sender_max_in_flight: int
    sender_lease_s: int
    retry_delays_critical: tuple[float, ...]
    retry_delays_bulk: tuple[float, ...]
    retention_days: int
    shadow_retention_days: int
    prune_interval_s: float
    reconcile_interval_s: float
    reconcile_lease_grace_s: float
    reconcile_unknown_after_s: float
    reconcile_receipt_timeout_s: float
    reconcile_retry_overdue_s: float
    routing_overrides: tuple[tuple[tuple[str, str], tuple[str, ...]], ...]
    breaker_failure_rate: float
    breaker_min_calls: int
    breaker_window_s: int
    breaker_open_s: float
    shadow: tuple[tuple[str, tuple[str, float]], ...]
    simulator_port: int
    simulator_delivery_delay_ms: int
    webhook_base_url: str | None
    webhook_max_age_s: float
    provider_timeout_s: float
    provider_connect_timeout_s: float
    provider_max_concurrency: int
    twilio_base_url: str | None
    twilio_account_sid: str
    twilio_auth_token: str
    twilio_from: str
    twilio_test_account_sid: str
    twilio_test_auth_token: str
    termii_base_url: str | None
    termii_api_key: str
    termii_secret_key: str
    termii_sender_id: str
    sendgrid_base_url: str | None
    sendgrid_api_key: str
    sendgrid_webhook_public_key: str
    mailgun_base_url: str | None
    mailgun_api_key: str
    mailgun_domain: str
    mailgun_webhook_signing_key: str
    fcm_base_url: str | None
    fcm_project_id: str
    fcm_credentials: Path | None
    apns_base_url: str | None
    apns_key_id: str
    apns_team_id: str
    apns_private_key: Path
    apns_topic: str
    simulator_apns_port: int
    email_from: str
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
        if self.kafka_bootstrap_servers:
            return self.kafka_bootstrap_servers
        return ",".join(f"127.0.0.1:{self.kafka_port + 2 * n}" for n in range(self.kafka_brokers))

    @property
    def dsn(self) -> str:
        return self.database_url or (
            f"postgresql://{LOCAL_DB_USER}:{LOCAL_DB_PASSWORD}@127.0.0.1:{self.postgres_port}/{self.postgres_db}"
        )

    @property
    def redis_dsn(self) -> str:
        return self.redis_url or f"redis://127.0.0.1:{self.redis_port}/0"

    def provider_base_url(self, provider: str) -> str:
        """Base URL of a provider's API: NOTIFY_<PROVIDER>_BASE_URL, else the simulator's /<provider> (APNs: the
        simulator's HTTP/2 port)."""
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}")
        given: str | None = getattr(self, f"{provider}_base_url")
        if given:
            return given
        if provider == "apns":  # HTTP/2 only: the simulator serves it on a port of its own, at the root
            return f"http://127.0.0.1:{self.simulator_apns_port}"
        return f"http://127.0.0.1:{self.simulator_port}/{provider}"

    def webhook_url(self, provider: str) -> str | None:
        """Where `provider` posts its delivery receipts (None: no callbacks)."""
        return f"{self.webhook_base_url}/{provider}" if self.webhook_base_url else None

    def retry_delays(self, lane: str) -> tuple[float, ...]:
        """The delay of each retry tier of `lane`, first tier first."""
        return self.retry_delays_critical if lane == "critical" else self.retry_delays_bulk

    def topic(self, name: str) -> str:
        """The physical name of a topic declared in topics/."""
        return f"{self.topic_prefix}{name}"


def value(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """One setting on its own (for what is decided at import time, before the whole Settings is loaded)."""
    setting = SETTINGS[name]
    raw = (os.environ if environ is None else environ).get(setting.env) or setting.default
    return None if raw is None else setting.parse(raw)


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
