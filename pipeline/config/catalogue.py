"""Every setting the pipeline reads: its environment variable, documented default, help text and parser.

`notify config` prints this table with the values in force; `pipeline.config.load` reads it into `Settings`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import parse

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Setting:
    env: str
    default: str | None
    help: str
    parse: Callable[[str], Any] = str
    secret: bool = False  # a credential: show it masked (`notify config`)


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
    "kafka_port": Setting("NOTIFY_KAFKA_PORT", "9092", "Local Kafka broker port (127.0.0.1).", parse.port),
    "kafka_controller_port": Setting(
        "NOTIFY_KAFKA_CONTROLLER_PORT", "9093", "Local KRaft controller port (127.0.0.1).", parse.port),
    "kafka_heap": Setting("NOTIFY_KAFKA_HEAP", "512m", "Heap of the local Kafka broker JVM.", parse.heap),
    "kafka_brokers": Setting(
        "NOTIFY_KAFKA_BROKERS", "1",
        "How many KRaft nodes `notify stack up` runs (1..9; each broker + controller, a static quorum of them all): "
        "node n listens on NOTIFY_KAFKA_PORT + 2(n-1) and NOTIFY_KAFKA_CONTROLLER_PORT + 2(n-1).", parse.broker_count),
    "database_url": Setting(
        "DATABASE_URL", None,
        "Use this PostgreSQL database instead of starting one (postgresql://user:pass@host:port/db).", str),
    "postgres_port": Setting("NOTIFY_POSTGRES_PORT", "55432", "Local PostgreSQL port (127.0.0.1).", parse.port),
    "postgres_db": Setting(
        "NOTIFY_POSTGRES_DB", "notify",
        "Database of the local PostgreSQL cluster (`notify stack up` creates and migrates it). The test suite uses "
        "notify_test, so that `notify run` never sees (nor re-drives) what tests left behind.", parse.database_name),
    "prometheus_port": Setting("NOTIFY_PROMETHEUS_PORT", "59090", "Local Prometheus port (127.0.0.1).", parse.port),
    "prometheus_url": Setting(
        "PROMETHEUS_URL", None,
        "Use this Prometheus instead of starting one (http://host:port); it must load infra/prometheus/ itself.",
        parse.url),
    "redis_url": Setting("REDIS_URL", None, "Use this Redis instead of starting one (redis://host:port/db).", str),
    "redis_port": Setting("NOTIFY_REDIS_PORT", "56379", "Local Redis port (127.0.0.1).", parse.port),
    "schema_registry_url": Setting(
        "SCHEMA_REGISTRY_URL", None,
        "Confluent-compatible schema registry: when set, records use Confluent framing (magic byte + schema id); "
        "otherwise Avro single-object encoding.", str),
    "topic_prefix": Setting(
        "NOTIFY_TOPIC_PREFIX", "",
        "Prefix put before every topic name of topics/ (isolates test runs and tenants on a shared cluster).",
        parse.topic_prefix),
    "db_pool_size": Setting("NOTIFY_DB_POOL_SIZE", "10", "Largest PostgreSQL connection pool per process.",
                            parse.positive_int),
    "dedup_window_s": Setting(
        "NOTIFY_DEDUP_WINDOW_S", "604800",
        "How long intake remembers a (user, type, idempotency key) in its table (default 7 days); PostgreSQL's "
        "unique key guards beyond it.", parse.positive_int),
    "metrics_port": Setting(
        "NOTIFY_METRICS_PORT", "59400",
        "Base /metrics port: the API uses it, each worker process the next ones (127.0.0.1).", parse.port),
    "metrics_enabled": Setting(
        "NOTIFY_METRICS", "on",
        "on: record every metric; off: every metric is a no-op (only to measure what metrics cost: "
        "`notify bench send` with and without). /metrics still answers.", parse.switch),
    "exporter_interval_s": Setting(
        "NOTIFY_EXPORTER_INTERVAL_S", "5",
        "How often the lag exporter (`notify exporter`, part of `notify worker --all`) reads committed offsets and "
        "high watermarks.", parse.positive_float),
    "provider_prices_usd": Setting(
        "NOTIFY_PROVIDER_PRICES_USD",
        "twilio=0.0079,termii=0.0035,sendgrid=0.00095,mailgun=0.0008,fcm=0,apns=0",
        "Price of one message per provider in USD, for notify_provider_cost_usd_total: per SMS segment (160 GSM-7 "
        "or 70 UCS-2 characters, 153/67 when split), per email, per push.", parse.prices),
    "api_port": Setting("NOTIFY_API_PORT", "58080", "Port of the ingest and settings API (127.0.0.1).", parse.port),
    "console_secret": Setting(
        "NOTIFY_CONSOLE_SECRET", None,
        "Key that signs the ops console's session cookies and CSRF tokens (/console); give every API process the "
        "same one. Unset: a random one per process (sessions end when it restarts).", str, secret=True),
    "log_level": Setting("NOTIFY_LOG_LEVEL", "WARNING", "Log level of workers and the API.", str),
    "ready_timeout_s": Setting(
        "NOTIFY_READY_TIMEOUT_S", "120", "How long `stack up` waits for each service to become ready.",
        parse.positive_int),
    # Sender stage.
    "sender_max_in_flight": Setting(
        "NOTIFY_SENDER_MAX_IN_FLIGHT", "500",
        "Sends in flight per sender worker (it consumes up to this many tasks at once; each provider is further "
        "capped by NOTIFY_PROVIDER_MAX_CONCURRENCY).", parse.positive_int),
    "sender_lease_s": Setting(
        "NOTIFY_SENDER_LEASE_S", "60",
        "Lease of a claimed delivery (queued -> sending). A row still `sending` past it had its worker die "
        "mid-send: reconciliation resolves it, nothing re-sends it blindly.", parse.positive_int),
    # Retry tiers (topics retry.<lane>.<n>) and the dead-letter queue.
    "retry_delays_critical": Setting(
        "NOTIFY_RETRY_DELAYS_CRITICAL", "5,15,45",
        "Delay of each critical-lane retry tier in seconds, one per retry.critical.<n> topic; short, because an OTP "
        "expires in minutes (a retry that would come due after the notification expires is not scheduled: the "
        "delivery is `expired`). After the last tier a transient failure goes to the DLQ.", parse.delays),
    "retry_delays_bulk": Setting(
        "NOTIFY_RETRY_DELAYS_BULK", "30,120,600",
        "Delay of each bulk-lane retry tier in seconds, one per retry.bulk.<n> topic.", parse.delays),
    # Retention (`notify prune`, and a sweep run by the reconciler's worker every NOTIFY_PRUNE_INTERVAL_S).
    "retention_days": Setting(
        "NOTIFY_RETENTION_DAYS", "365",
        "How long a finished notification (its deliveries, attempts and state transitions) is kept after intake "
        "received it. Never less than the longest topic retention plus a day: its unique key must outlive any "
        "record a replay or redrive could bring back (a shorter value is raised to that).", parse.positive_int),
    "shadow_retention_days": Setting(
        "NOTIFY_SHADOW_RETENTION_DAYS", "30", "How long shadow-mode comparisons (shadow_results) are kept.",
        parse.positive_int),
    "prune_interval_s": Setting(
        "NOTIFY_PRUNE_INTERVAL_S", "3600",
        "How often the reconciler's worker runs the retention sweep (one elected sweeper per database).",
        parse.positive_float),
    # Reconciliation (`notify reconcile`, and a loop in `notify worker --all` on one elected worker).
    "reconcile_interval_s": Setting(
        "NOTIFY_RECONCILE_INTERVAL_S", "120", "How often the reconciler sweeps for stuck deliveries.",
        parse.positive_float),
    "reconcile_lease_grace_s": Setting(
        "NOTIFY_RECONCILE_LEASE_GRACE_S", "30",
        "A `sending` row is stuck once its lease expired this long ago (its worker died mid-send).",
        parse.positive_float),
    "reconcile_unknown_after_s": Setting(
        "NOTIFY_RECONCILE_UNKNOWN_AFTER_S", "30",
        "An `unknown` row (ambiguous provider answer) is looked up once it is this old: late provider records have "
        "landed by then.", parse.positive_float),
    "reconcile_receipt_timeout_s": Setting(
        "NOTIFY_RECONCILE_RECEIPT_TIMEOUT_S", "900",
        "An `accepted` row without a receipt for this long is looked up by its provider id.", parse.positive_float),
    "reconcile_retry_overdue_s": Setting(
        "NOTIFY_RECONCILE_RETRY_OVERDUE_S", "300",
        "A `retry_scheduled` row this long past its due time lost its retry-tier record: it is re-injected.",
        parse.positive_float),
    "routing_overrides": Setting(
        "NOTIFY_ROUTING", "",
        "Provider order overrides, ';'-separated: `<channel>.<lane>=p1,p2` or `<channel>.+<calling code>=p1,p2`, "
        "e.g. `sms.bulk=termii,twilio;sms.+234=termii,twilio`. Defaults: sms twilio,termii; email "
        "sendgrid,mailgun; push fcm,apns.", lambda raw: parse.routing(raw)),
    "breaker_failure_rate": Setting(
        "NOTIFY_BREAKER_FAILURE_RATE", "0.5",
        "A provider's circuit breaker opens when this share of its calls fail within the window ...",
        parse.positive_float),
    "breaker_min_calls": Setting(
        "NOTIFY_BREAKER_MIN_CALLS", "20", "... over at least this many calls ...", parse.positive_int),
    "breaker_window_s": Setting("NOTIFY_BREAKER_WINDOW_S", "30", "... in this rolling window (seconds).",
                                parse.positive_int),
    "breaker_open_s": Setting(
        "NOTIFY_BREAKER_OPEN_S", "15", "How long an open breaker waits before one half-open probe.",
        parse.positive_float),
    "shadow": Setting(
        "NOTIFY_SHADOW", "",
        "Shadow mode, ','-separated `<channel>=<provider>:<share>`, e.g. `sms=twilio:0.05`: that share of the "
        "channel's sends is mirrored to the provider in its test mode (never delivered) and its latency and "
        "acceptance recorded as metrics and in shadow_results (`notify shadow report`). Providers with a test mode: "
        "twilio (test credentials), sendgrid (sandbox), mailgun (o:testmode), fcm (validate_only).",
        lambda raw: parse.shadow(raw)),
    # Providers. Every base URL defaults to the provider simulator (`notify simulator`); credentials default to
    # fake test credentials that only the simulator accepts.
    "simulator_port": Setting(
        "NOTIFY_SIMULATOR_PORT", "58090",
        "Port of the provider simulator (127.0.0.1); provider base URLs that are not set point at it.", parse.port),
    "simulator_delivery_delay_ms": Setting(
        "NOTIFY_SIMULATOR_DELIVERY_DELAY_MS", "500",
        "How long after accepting a message the simulator reports it delivered (status API and callback).",
        parse.non_negative_int),
    "webhook_base_url": Setting(
        "NOTIFY_WEBHOOK_BASE_URL", None,
        "Public base URL of our provider webhook receiver; each provider's receipts go to <base>/<provider> "
        "(twilio, termii, sendgrid, mailgun). Unset: no status callback is requested and the simulator sends "
        "none.", parse.url),
    "webhook_max_age_s": Setting(
        "NOTIFY_WEBHOOK_MAX_AGE_S", "600",
        "A SendGrid or Mailgun webhook signed longer ago than this (or as far ahead) is refused with 403; accepted "
        "signatures are remembered in Redis for twice this (Twilio and Termii sign no time: for a day), so a "
        "replayed request changes nothing.", parse.positive_float),
    "provider_timeout_s": Setting(
        "NOTIFY_PROVIDER_TIMEOUT_S", "10",
        "Whole-request timeout of a provider call; a timeout after the request left is an ambiguous outcome.",
        parse.positive_float),
    "provider_connect_timeout_s": Setting(
        "NOTIFY_PROVIDER_CONNECT_TIMEOUT_S", "3",
        "Connect timeout of a provider call (nothing was sent yet: a transient outcome).", parse.positive_float),
    "provider_max_concurrency": Setting(
        "NOTIFY_PROVIDER_MAX_CONCURRENCY", "64", "Most requests in flight to one provider per process.",
        parse.positive_int),
    "twilio_base_url": Setting(
        "NOTIFY_TWILIO_BASE_URL", None,
        "Twilio REST API base URL (https://api.twilio.com); default: the simulator's /twilio.", parse.url),
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
        "Termii API base URL (https://api.ng.termii.com); default: the simulator's /termii.", parse.url),
    "termii_api_key": Setting("NOTIFY_TERMII_API_KEY", "TLsimulatortermiiapikey", "Termii API key.", str, secret=True),
    "termii_secret_key": Setting(
        "NOTIFY_TERMII_SECRET_KEY", "simulator-termii-secret",
        "Termii secret key (HMAC-SHA512 X-Termii-Signature of delivery reports).", str, secret=True),
    "termii_sender_id": Setting("NOTIFY_TERMII_SENDER_ID", "Notify", "Termii sender ID (3 to 11 characters).", str),
    "sendgrid_base_url": Setting(
        "NOTIFY_SENDGRID_BASE_URL", None,
        "SendGrid API base URL (https://api.sendgrid.com); default: the simulator's /sendgrid.", parse.url),
    "sendgrid_api_key": Setting(
        "NOTIFY_SENDGRID_API_KEY", "SG.simulator.sendgrid-api-key", "SendGrid API key.", str, secret=True),
    "sendgrid_webhook_public_key": Setting(
        "NOTIFY_SENDGRID_WEBHOOK_PUBLIC_KEY",
        "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEVIT1977aq62V9SJUOOhKHnZipXbjJyhAjiBwirJbQjZ/32i4Nx8TdZNvfd3WYsZ5wur6gZVYyEHSLvUt/EbC9w==",
        "Verification key of SendGrid's signed event webhook (base64 DER, as SendGrid shows it); default: the "
        "simulator's.", str),
    "mailgun_base_url": Setting(
        "NOTIFY_MAILGUN_BASE_URL", None,
        "Mailgun API base URL (https://api.mailgun.net); default: the simulator's /mailgun.", parse.url),
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
        "FCM HTTP v1 API base URL (https://fcm.googleapis.com); default: the simulator's /fcm.", parse.url),
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
        "development builds); default: the simulator's HTTP/2 port, NOTIFY_SIMULATOR_APNS_PORT.", parse.url),
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
        parse.port),
    "email_from": Setting(
        "NOTIFY_EMAIL_FROM", "Notify <alerts@notify.example>", "Sender of every email (SendGrid and Mailgun).", str),
}
