"""The one configuration module: environment variables with documented defaults.

Every setting is read once into a frozen `Settings`. A malformed value, or a `NOTIFY_*` variable this module does
not know (usually a typo), fails at start-up with a message that names it. The table in `SETTINGS` is the
documentation: `notify config` prints it with the values in force.

Three variables switch a service from "started locally by `notify stack up`" to "use what is given":
`KAFKA_BOOTSTRAP_SERVERS`, `DATABASE_URL` and `REDIS_URL`.
"""

from __future__ import annotations

import itertools
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
    secret: bool = False  # a credential: show it masked (`notify config`)


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


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(f"{value} is negative")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError(f"{value} is not a positive number")
    return value


def _broker_count(raw: str) -> int:
    value = int(raw)
    if not 1 <= value <= 9:
        raise ValueError(f"{value}: the local stack runs 1 to 9 Kafka nodes")
    return value


def _url(raw: str) -> str:
    if not raw.startswith(("http://", "https://")):
        raise ValueError(f"{raw!r} is not an http(s) URL")
    return raw.rstrip("/")


def _heap(raw: str) -> str:
    if not raw[:-1].isdigit() or raw[-1].lower() not in "mg":
        raise ValueError(f"{raw!r} is not a JVM heap size such as 512m or 1g")
    return raw


def _topic_prefix(raw: str) -> str:
    if raw and not all(c.isalnum() or c in "._-" for c in raw):
        raise ValueError(f"{raw!r} may only hold letters, digits, '.', '_' and '-'")
    return raw


CHANNELS = ("sms", "email", "push")


def _providers(raw: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in raw.split(",") if p.strip())
    unknown = [p for p in names if p not in PROVIDERS]
    if not names or unknown:
        raise ValueError(f"{raw!r}: expected provider names from {list(PROVIDERS)}")
    return names


def _routing(raw: str) -> tuple[tuple[tuple[str, str], tuple[str, ...]], ...]:
    """`sms.bulk=termii,twilio;sms.+234=termii` -> ((("sms", "+234"), (...)), (("sms", "bulk"), (...))).

    Pairs rather than a dict: Settings stays hashable (cached per settings elsewhere)."""
    table: dict[tuple[str, str], tuple[str, ...]] = {}
    for part in filter(None, (p.strip() for p in raw.split(";"))):
        key, sep, value = part.partition("=")
        channel, dot, scope = key.strip().partition(".")
        if not sep or not dot or channel not in CHANNELS or not (
                scope in ("critical", "bulk") or (scope.startswith("+") and scope[1:].isdigit())):
            raise ValueError(f"{part!r}: expected <channel>.<lane>=p1,p2 or <channel>.+<calling code>=p1,p2")
        table[(channel, scope)] = _providers(value)
    return tuple(sorted(table.items()))


def _shadow(raw: str) -> tuple[tuple[str, tuple[str, float]], ...]:
    """`sms=twilio:0.05` -> (("sms", ("twilio", 0.05)),) (pairs: Settings stays hashable)."""
    out: dict[str, tuple[str, float]] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        channel, sep, value = part.partition("=")
        provider, colon, share = value.partition(":")
        if not sep or not colon or channel.strip() not in CHANNELS:
            raise ValueError(f"{part!r}: expected <channel>=<provider>:<share>")
        fraction = float(share)
        if not 0 < fraction <= 1:
            raise ValueError(f"{part!r}: the share must be in (0, 1]")
        out[channel.strip()] = (_providers(provider)[0], fraction)
    return tuple(sorted(out.items()))


def _delays(raw: str) -> tuple[float, ...]:
    """`5,15,45` -> (5.0, 15.0, 45.0): one delay per retry tier, each longer than the one before."""
    delays = tuple(_positive_float(part.strip()) for part in raw.split(",") if part.strip())
    if not delays or any(b <= a for a, b in itertools.pairwise(delays)):
        raise ValueError("expected positive delays in seconds, each longer than the one before, e.g. 30,120,600")
    return delays


def _switch(raw: str) -> bool:
    if raw.lower() not in ("on", "off"):
        raise ValueError(f"{raw!r}: expected on or off")
    return raw.lower() == "on"


def _prices(raw: str) -> tuple[tuple[str, float], ...]:
    """`twilio=0.0079,sendgrid=0.00095` -> (("sendgrid", 0.00095), ("twilio", 0.0079)); every provider needs one."""
    prices: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        provider, sep, value = part.partition("=")
        if not sep or provider.strip() not in PROVIDERS or float(value) < 0:
            raise ValueError(f"{part!r}: expected <provider>=<price in USD, 0 or more>")
        prices[provider.strip()] = float(value)
    missing = [p for p in PROVIDERS if p not in prices]
    if missing:
        raise ValueError(f"no price for {', '.join(missing)}")
    return tuple(sorted(prices.items()))


# name -> Setting. Names are the Settings attributes.
SETTINGS: dict[str, Setting] = {
    "stack_dir": Setting(
        "NOTIFY_STACK_DIR", str(REPO_ROOT / ".stack"),
        "Folder of the local stack: data, logs and pid files of the services `notify stack up` starts.", Path),
    "cache_dir": Setting(
        "NOTIFY_CACHE_DIR", str(REPO_ROOT / ".cache"),
        "Folder for downloaded artefacts (the Kafka jars).", Path),
    "templates_dir": Setting(
        "NOTIFY_TEMPLATES_DIR", str(REPO_ROOT / "templates"),
        "Folder of the message templates (<template_id>/<locale>/<part>); checked at start-up of the API and "
        "workers (`notify templates check`).", Path),
    "kafka_bootstrap_servers": Setting(
        "KAFKA_BOOTSTRAP_SERVERS", None,
        "Use this Kafka cluster instead of starting one (host:port[,host:port...]).", str),
    "kafka_port": Setting("NOTIFY_KAFKA_PORT", "9092", "Local Kafka broker port (127.0.0.1).", _port),
    "kafka_controller_port": Setting(
        "NOTIFY_KAFKA_CONTROLLER_PORT", "9093", "Local KRaft controller port (127.0.0.1).", _port),
    "kafka_heap": Setting("NOTIFY_KAFKA_HEAP", "512m", "Heap of the local Kafka broker JVM.", _heap),
    "kafka_brokers": Setting(
        "NOTIFY_KAFKA_BROKERS", "1",
        "How many KRaft nodes `notify stack up` runs (1..9; each broker + controller, a static quorum of them all): "
        "node n listens on NOTIFY_KAFKA_PORT + 2(n-1) and NOTIFY_KAFKA_CONTROLLER_PORT + 2(n-1).", _broker_count),
    "database_url": Setting(
        "DATABASE_URL", None,
        "Use this PostgreSQL database instead of starting one (postgresql://user:pass@host:port/db).", str),
    "postgres_port": Setting("NOTIFY_POSTGRES_PORT", "55432", "Local PostgreSQL port (127.0.0.1).", _port),
    "prometheus_port": Setting("NOTIFY_PROMETHEUS_PORT", "59090", "Local Prometheus port (127.0.0.1).", _port),
    "prometheus_url": Setting(
        "PROMETHEUS_URL", None,
        "Use this Prometheus instead of starting one (http://host:port); it must load infra/prometheus/ itself.",
        _url),
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
    "metrics_enabled": Setting(
        "NOTIFY_METRICS", "on",
        "on: record every metric; off: every metric is a no-op (only to measure what metrics cost: "
        "`notify bench send` with and without). /metrics still answers.", _switch),
    "exporter_interval_s": Setting(
        "NOTIFY_EXPORTER_INTERVAL_S", "5",
        "How often the lag exporter (`notify exporter`, part of `notify worker --all`) reads committed offsets and "
        "high watermarks.", _positive_float),
    "provider_prices_usd": Setting(
        "NOTIFY_PROVIDER_PRICES_USD",
        "twilio=0.0079,termii=0.0035,sendgrid=0.00095,mailgun=0.0008,fcm=0,apns=0",
        "Price of one message per provider in USD, for notify_provider_cost_usd_total: per SMS segment (160 GSM-7 "
        "or 70 UCS-2 characters, 153/67 when split), per email, per push.", _prices),
    "api_port": Setting("NOTIFY_API_PORT", "58080", "Port of the ingest and settings API (127.0.0.1).", _port),
    "console_secret": Setting(
        "NOTIFY_CONSOLE_SECRET", None,
        "Key that signs the ops console's session cookies and CSRF tokens (/console); give every API process the "
        "same one. Unset: a random one per process (sessions end when it restarts).", str, secret=True),
    "log_level": Setting("NOTIFY_LOG_LEVEL", "WARNING", "Log level of workers and the API.", str),
    "ready_timeout_s": Setting(
        "NOTIFY_READY_TIMEOUT_S", "120", "How long `stack up` waits for each service to become ready.",
        _positive_int),
    # Sender stage.
    "sender_max_in_flight": Setting(
        "NOTIFY_SENDER_MAX_IN_FLIGHT", "500",
        "Sends in flight per sender worker (it consumes up to this many tasks at once; each provider is further "
        "capped by NOTIFY_PROVIDER_MAX_CONCURRENCY).", _positive_int),
    "sender_lease_s": Setting(
        "NOTIFY_SENDER_LEASE_S", "60",
        "Lease of a claimed delivery (queued -> sending). A row still `sending` past it had its worker die "
        "mid-send: reconciliation resolves it, nothing re-sends it blindly.", _positive_int),
    # Retry tiers (topics retry.<lane>.<n>) and the dead-letter queue.
    "retry_delays_critical": Setting(
        "NOTIFY_RETRY_DELAYS_CRITICAL", "5,15,45",
        "Delay of each critical-lane retry tier in seconds, one per retry.critical.<n> topic; short, because an OTP "
        "expires in minutes (a retry that would come due after the notification expires is not scheduled: the "
        "delivery is `expired`). After the last tier a transient failure goes to the DLQ.", _delays),
    "retry_delays_bulk": Setting(
        "NOTIFY_RETRY_DELAYS_BULK", "30,120,600",
        "Delay of each bulk-lane retry tier in seconds, one per retry.bulk.<n> topic.", _delays),
    # Reconciliation (`notify reconcile`, and a loop in `notify worker --all` on one elected worker).
    "reconcile_interval_s": Setting(
        "NOTIFY_RECONCILE_INTERVAL_S", "120", "How often the reconciler sweeps for stuck deliveries.",
        _positive_float),
    "reconcile_lease_grace_s": Setting(
        "NOTIFY_RECONCILE_LEASE_GRACE_S", "30",
        "A `sending` row is stuck once its lease expired this long ago (its worker died mid-send).",
        _positive_float),
    "reconcile_unknown_after_s": Setting(
        "NOTIFY_RECONCILE_UNKNOWN_AFTER_S", "30",
        "An `unknown` row (ambiguous provider answer) is looked up once it is this old: late provider records have "
        "landed by then.", _positive_float),
    "reconcile_receipt_timeout_s": Setting(
        "NOTIFY_RECONCILE_RECEIPT_TIMEOUT_S", "900",
        "An `accepted` row without a receipt for this long is looked up by its provider id.", _positive_float),
    "reconcile_retry_overdue_s": Setting(
        "NOTIFY_RECONCILE_RETRY_OVERDUE_S", "300",
        "A `retry_scheduled` row this long past its due time lost its retry-tier record: it is re-injected.",
        _positive_float),
    "routing_overrides": Setting(
        "NOTIFY_ROUTING", "",
        "Provider order overrides, ';'-separated: `<channel>.<lane>=p1,p2` or `<channel>.+<calling code>=p1,p2`, "
        "e.g. `sms.bulk=termii,twilio;sms.+234=termii,twilio`. Defaults: sms twilio,termii; email "
        "sendgrid,mailgun; push fcm,apns.", lambda raw: _routing(raw)),
    "breaker_failure_rate": Setting(
        "NOTIFY_BREAKER_FAILURE_RATE", "0.5",
        "A provider's circuit breaker opens when this share of its calls fail within the window ...",
        _positive_float),
    "breaker_min_calls": Setting(
        "NOTIFY_BREAKER_MIN_CALLS", "20", "... over at least this many calls ...", _positive_int),
    "breaker_window_s": Setting("NOTIFY_BREAKER_WINDOW_S", "30", "... in this rolling window (seconds).",
                                _positive_int),
    "breaker_open_s": Setting(
        "NOTIFY_BREAKER_OPEN_S", "15", "How long an open breaker waits before one half-open probe.",
        _positive_float),
    "shadow": Setting(
        "NOTIFY_SHADOW", "",
        "Shadow mode, ','-separated `<channel>=<provider>:<share>`, e.g. `sms=twilio:0.05`: that share of the "
        "channel's sends is mirrored to the provider in its test mode (never delivered) and its latency and "
        "acceptance recorded as metrics and in shadow_results (`notify shadow report`). Providers with a test mode: "
        "twilio (test credentials), sendgrid (sandbox), mailgun (o:testmode), fcm (validate_only).",
        lambda raw: _shadow(raw)),
    # Providers. Every base URL defaults to the provider simulator (`notify simulator`); credentials default to
    # fake test credentials that only the simulator accepts.
    "simulator_port": Setting(
        "NOTIFY_SIMULATOR_PORT", "58090",
        "Port of the provider simulator (127.0.0.1); provider base URLs that are not set point at it.", _port),
    "simulator_delivery_delay_ms": Setting(
        "NOTIFY_SIMULATOR_DELIVERY_DELAY_MS", "500",
        "How long after accepting a message the simulator reports it delivered (status API and callback).",
        _non_negative_int),
    "webhook_base_url": Setting(
        "NOTIFY_WEBHOOK_BASE_URL", None,
        "Public base URL of our provider webhook receiver; each provider's receipts go to <base>/<provider> "
        "(twilio, termii, sendgrid, mailgun). Unset: no status callback is requested and the simulator sends "
        "none.", _url),
    "webhook_max_age_s": Setting(
        "NOTIFY_WEBHOOK_MAX_AGE_S", "600",
        "A SendGrid or Mailgun webhook signed longer ago than this (or as far ahead) is refused with 403; accepted "
        "signatures are remembered in Redis for twice this (Twilio and Termii sign no time: for a day), so a "
        "replayed request changes nothing.", _positive_float),
    "provider_timeout_s": Setting(
        "NOTIFY_PROVIDER_TIMEOUT_S", "10",
        "Whole-request timeout of a provider call; a timeout after the request left is an ambiguous outcome.",
        _positive_float),
    "provider_connect_timeout_s": Setting(
        "NOTIFY_PROVIDER_CONNECT_TIMEOUT_S", "3",
        "Connect timeout of a provider call (nothing was sent yet: a transient outcome).", _positive_float),
    "provider_max_concurrency": Setting(
        "NOTIFY_PROVIDER_MAX_CONCURRENCY", "64", "Most requests in flight to one provider per process.",
        _positive_int),
    "twilio_base_url": Setting(
        "NOTIFY_TWILIO_BASE_URL", None,
        "Twilio REST API base URL (https://api.twilio.com); default: the simulator's /twilio.", _url),
    "twilio_account_sid": Setting(
        "NOTIFY_TWILIO_ACCOUNT_SID", "AC00000000000000000000000000000001", "Twilio account SID.", str),
    "twilio_auth_token": Setting(
        "NOTIFY_TWILIO_AUTH_TOKEN", "simulator-twilio-auth-token",
        "Twilio auth token (API auth and status-callback signatures).", str, secret=True),
    "twilio_from": Setting("NOTIFY_TWILIO_FROM", "+15005550006", "Sender number of Twilio SMS (E.164).", str),
    "twilio_test_account_sid": Setting(
        "NOTIFY_TWILIO_TEST_ACCOUNT_SID", "AC00000000000000000000000000000002",
        "Account SID of Twilio's test credentials, for shadow sends (Twilio checks and answers, sends nothing).", str),
    "twilio_test_auth_token": Setting(
        "NOTIFY_TWILIO_TEST_AUTH_TOKEN", "simulator-twilio-test-auth-token",
        "Auth token of Twilio's test credentials (shadow sends).", str, secret=True),
    "termii_base_url": Setting(
        "NOTIFY_TERMII_BASE_URL", None,
        "Termii API base URL (https://api.ng.termii.com); default: the simulator's /termii.", _url),
    "termii_api_key": Setting("NOTIFY_TERMII_API_KEY", "TLsimulatortermiiapikey", "Termii API key.", str, secret=True),
    "termii_secret_key": Setting(
        "NOTIFY_TERMII_SECRET_KEY", "simulator-termii-secret",
        "Termii secret key (HMAC-SHA512 X-Termii-Signature of delivery reports).", str, secret=True),
    "termii_sender_id": Setting("NOTIFY_TERMII_SENDER_ID", "Notify", "Termii sender ID (3 to 11 characters).", str),
    "sendgrid_base_url": Setting(
        "NOTIFY_SENDGRID_BASE_URL", None,
        "SendGrid API base URL (https://api.sendgrid.com); default: the simulator's /sendgrid.", _url),
    "sendgrid_api_key": Setting(
        "NOTIFY_SENDGRID_API_KEY", "SG.simulator.sendgrid-api-key", "SendGrid API key.", str, secret=True),
    "sendgrid_webhook_public_key": Setting(
        "NOTIFY_SENDGRID_WEBHOOK_PUBLIC_KEY",
        "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEVIT1977aq62V9SJUOOhKHnZipXbjJyhAjiBwirJbQjZ/32i4Nx8TdZNvfd3WYsZ5wur6gZVYyEHSLvUt/EbC9w==",
        "Verification key of SendGrid's signed event webhook (base64 DER, as SendGrid shows it); default: the "
        "simulator's.", str),
    "mailgun_base_url": Setting(
        "NOTIFY_MAILGUN_BASE_URL", None,
        "Mailgun API base URL (https://api.mailgun.net); default: the simulator's /mailgun.", _url),
    "mailgun_api_key": Setting(
        "NOTIFY_MAILGUN_API_KEY", "simulator-mailgun-api-key", "Mailgun API key.", str, secret=True),
    "mailgun_domain": Setting("NOTIFY_MAILGUN_DOMAIN", "mg.notify.example", "Mailgun sending domain.", str),
    "mailgun_webhook_signing_key": Setting(
        "NOTIFY_MAILGUN_WEBHOOK_SIGNING_KEY", "simulator-mailgun-signing-key",
        "Mailgun HTTP webhook signing key (HMAC-SHA256 of timestamp + token).", str, secret=True),
    # Push: FCM through the firebase-admin SDK (HTTP v1), APNs directly over HTTP/2 with token (JWT) auth. The
    # simulator's push credentials are test keys in connectors/simulator/keys/ that only the simulator accepts.
    "fcm_base_url": Setting(
        "NOTIFY_FCM_BASE_URL", None,
        "FCM HTTP v1 API base URL (https://fcm.googleapis.com); default: the simulator's /fcm.", _url),
    "fcm_project_id": Setting(
        "NOTIFY_FCM_PROJECT_ID", "notify-simulator",
        "Firebase project ID (the {project} of projects/{project}/messages:send).", str),
    "fcm_credentials": Setting(
        "NOTIFY_FCM_CREDENTIALS", None,
        "Path of the Firebase service-account JSON; its key signs the OAuth2 token requests sent to its token_uri. "
        "Unset: the simulator's test account (connectors/simulator/keys/fcm-service-account.json), its token "
        "requests sent to <FCM base URL>/token (the simulator's /fcm/token).", Path),
    "apns_base_url": Setting(
        "NOTIFY_APNS_BASE_URL", None,
        "APNs provider API base URL (https://api.push.apple.com; https://api.sandbox.push.apple.com for "
        "development builds); default: the simulator's HTTP/2 port, NOTIFY_SIMULATOR_APNS_PORT.", _url),
    "apns_key_id": Setting("NOTIFY_APNS_KEY_ID", "SIMKEY0001", "Key ID of the APNs auth key (the JWT's kid).", str),
    "apns_team_id": Setting("NOTIFY_APNS_TEAM_ID", "SIMTEAM001", "Apple developer team ID (the JWT's iss).", str),
    "apns_private_key": Setting(
        "NOTIFY_APNS_PRIVATE_KEY", str(REPO_ROOT / "connectors" / "simulator" / "keys" / "AuthKey_SIMKEY0001.p8"),
        "Path of the APNs auth key (.p8, ES256) that signs the provider tokens; default: the simulator's test key.",
        Path),
    "apns_topic": Setting("NOTIFY_APNS_TOPIC", "io.notify.app", "APNs topic: the iOS app's bundle ID.", str),
    "simulator_apns_port": Setting(
        "NOTIFY_SIMULATOR_APNS_PORT", "58091",
        "Port of the simulator's APNs endpoint (127.0.0.1); APNs speaks only HTTP/2, so it has a port of its own.",
        _port),
    "email_from": Setting(
        "NOTIFY_EMAIL_FROM", "Notify <alerts@notify.example>", "Sender of every email (SendGrid and Mailgun).", str),
}

PROVIDERS = ("twilio", "termii", "sendgrid", "mailgun", "fcm", "apns")

LOCAL_DB_USER = "notify"
LOCAL_DB_PASSWORD = "notify"  # loopback-only development cluster; production sets DATABASE_URL
LOCAL_DB_NAME = "notify"


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
            f"postgresql://{LOCAL_DB_USER}:{LOCAL_DB_PASSWORD}@127.0.0.1:{self.postgres_port}/{LOCAL_DB_NAME}"
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
