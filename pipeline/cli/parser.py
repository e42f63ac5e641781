"""The command line of `notify`: every sub-command with its options and help, each bound to its handler in
commands.py."""

from __future__ import annotations

import argparse

from pipeline.cli.commands import (
    cmd_api,
    cmd_bench,
    cmd_config,
    cmd_dlq,
    cmd_events,
    cmd_exporter,
    cmd_invalid,
    cmd_kafka,
    cmd_keys,
    cmd_migrate,
    cmd_prune,
    cmd_reconcile,
    cmd_replay,
    cmd_run,
    cmd_schemas,
    cmd_shadow,
    cmd_simulator,
    cmd_stack,
    cmd_templates,
    cmd_topics,
    cmd_worker,
)
from pipeline.domain import STAGES as _STAGES

# The description `notify --help` shows.
DESCRIPTION = """The one CLI of the project: `notify ...` (console script) or `python -m pipeline ...`.

Each sub-command imports what it needs when it runs, so `notify --help` stays fast.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="notify", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="start, stop or inspect the local stack (Kafka, PostgreSQL, Redis)")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("run", help="the main job: the stack (with migrations and topics), then the workers and "
                       "the API in the foreground")
    p.add_argument("--stack-only", action="store_true", help="bring the stack up and return")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("simulator", help="the provider simulator (Twilio, Termii, SendGrid, Mailgun, FCM, APNs wire "
                       "APIs) on 127.0.0.1:NOTIFY_SIMULATOR_PORT (APNs: NOTIFY_SIMULATOR_APNS_PORT); programmable at "
                       "/_admin: `set PROVIDER key=value ...` (latency_ms, jitter_ms, error_rates, outage_s, "
                       "rate_limit_per_s, accept_then_hang, ...), `show ledger|providers|stats|test-sends`, `reset`")
    p.add_argument("action", nargs="?", default="serve", choices=["serve", "set", "show", "reset"])
    p.add_argument("args", nargs="*", help="set: PROVIDER key=value ...; show: what to show")
    p.add_argument("--provider", default=None, help="show ledger|test-sends: only this provider's messages")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=cmd_simulator)

    p = sub.add_parser("api", help="run the ingest API (127.0.0.1, NOTIFY_API_PORT)")
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("keys", help="API keys of upstream services: create SERVICE | revoke KEY_ID | list")
    p.add_argument("action", choices=["create", "revoke", "list"])
    p.add_argument("name", nargs="?", default="", help="service (create) or key id (revoke)")
    p.add_argument("--scope", action="append", choices=["ingest", "read", "admin"],
                   help="create: what the key may do, repeatable (default ingest): ingest (submit notifications, "
                   "settings), read (the read API, own service only), admin (everything, the ops console)")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("events", help="delivery events: `notify events tail [--user U] [--notification N]`")
    p.add_argument("action", choices=["tail"])
    p.add_argument("--user")
    p.add_argument("--notification")
    p.add_argument("--from-beginning", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--limit", type=int, default=None, help="stop after this many events")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("migrate", help="apply database migrations (in order, recorded, idempotent)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("topics", help="show or apply the difference between topics/ and the cluster")
    p.add_argument("action", choices=["plan", "apply"])
    p.set_defaults(func=cmd_topics)

    p = sub.add_parser("schemas", help="check that schemas/ is recorded and compatible, or record a change")
    p.add_argument("action", choices=["check", "freeze"])
    p.set_defaults(func=cmd_schemas)

    p = sub.add_parser("templates", help="the message templates of NOTIFY_TEMPLATES_DIR: `check` lists every "
                       "problem; `render ID [--locale L] [--channel C] [--param k=v ...]` shows what is sent")
    p.add_argument("action", choices=["check", "render"])
    p.add_argument("template_id", nargs="?", help="render: the template, e.g. otp.login")
    p.add_argument("--locale", default="en", help="render: the recipient's locale (default en)")
    p.add_argument("--channel", choices=["sms", "email", "push"], default=None,
                   help="render: only this channel (default: each)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="render: a template "
                   "parameter; repeatable")
    p.set_defaults(func=cmd_templates)

    p = sub.add_parser(
        "kafka",
        help="run a Kafka CLI tool from the stack's jars (topics, consumer-groups, console-consumer, ...)",
        description="Runs a Kafka CLI tool against the configured cluster; --bootstrap-server is added "
        "when not given. Example: notify kafka consumer-groups --list",
    )
    p.add_argument("tool", help="topics | consumer-groups | console-consumer | console-producer | get-offsets")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_kafka)

    p = sub.add_parser("worker", help="run stage workers: one (--stage S --lane L) or all of them (--all)")
    p.add_argument("--stage", choices=list(_STAGES))
    p.add_argument("--lane", choices=["critical", "bulk"])
    p.add_argument("--all", action="store_true", help="every stage of both lanes, one process each")
    p.add_argument("--stages", default=None,
                   help=f"with --all: only these stages, comma-separated (default: {','.join(_STAGES)})")
    p.add_argument("--exporter", action=argparse.BooleanOptionalAction, default=None,
                   help="with --all: also run the lag exporter (default: yes, unless --stages narrows the stages)")
    p.add_argument("--replicas", default=None, metavar="N|STAGE=N,...",
                   help="with --all: processes per stage and lane in its consumer group, for every stage (N) or the "
                        "named ones (sender=3,intake=2); default 1")
    p.add_argument("--replica", type=int, default=0, metavar="R",
                   help="with --stage: this process's number among the stage's replicas (picks its metrics port)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("exporter", help="the consumer-lag exporter: committed offsets and high watermarks of every "
                       "notify-* group, as Prometheus metrics (port after the workers'; `notify config`)")
    p.set_defaults(func=cmd_exporter)

    p = sub.add_parser("replay", help="reset a consumer group's offsets on a topic (its workers stopped) so the "
                       "stage re-reads it; every stage is idempotent, so nothing is sent twice")
    p.add_argument("--group", required=True, help="consumer group, e.g. notify-sender-critical")
    p.add_argument("--topic", required=True, help="topic as named on the cluster, e.g. send.sms.critical")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--to-datetime", help="the first offset at or after this ISO 8601 time (no zone: UTC)")
    where.add_argument("--to-offset", type=int, help="this offset in every partition (clamped to what is kept)")
    where.add_argument("--shift-by", type=int, help="the committed offset plus N (negative: back)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("dlq", help="the dead-letter queue: `list`, `show` one entry, `redrive` entries back to "
                       "their send topic (once: a redriven delivery is queued again, a second redrive skips it)")
    p.add_argument("action", choices=["list", "show", "redrive"])
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="only entries whose KEY is VALUE (reason, channel, lane, type, notification_id, provider, "
                   "user_id); repeatable, all must match")
    p.add_argument("--position", help="one entry, as PARTITION:OFFSET (from `list`)")
    p.add_argument("--dry-run", action="store_true", help="redrive: say what would be redriven, change nothing")
    p.add_argument("--json", action="store_true", help="list: one JSON object per line")
    p.set_defaults(func=cmd_dlq)

    p = sub.add_parser("invalid", help="the quarantine topic: `list`, `show` entries (headers and decoded payload), "
                       "`redrive` their original bytes back to the topic they came from (once)")
    p.add_argument("action", choices=["list", "show", "redrive"])
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="only entries whose KEY is VALUE (reason, stage, source_topic, key); repeatable, all must "
                   "match")
    p.add_argument("--since", help="quarantined at or after this ISO 8601 time (no zone: UTC)")
    p.add_argument("--until", help="quarantined before this ISO 8601 time (no zone: UTC)")
    p.add_argument("--position", help="one entry, as PARTITION:OFFSET (from `list`)")
    p.add_argument("--dry-run", action="store_true", help="redrive: say what would be redriven, change nothing")
    p.add_argument("--json", action="store_true", help="list: one JSON object per line")
    p.set_defaults(func=cmd_invalid)

    p = sub.add_parser("reconcile", help="resolve deliveries stuck after their send (sending past the lease, "
                       "unknown, accepted without a receipt, overdue retries) by asking the providers; `--once` runs "
                       "one round and prints what it did, otherwise a round every NOTIFY_RECONCILE_INTERVAL_S "
                       "(`notify worker --all` runs this loop too; an advisory lock elects one sweeper)")
    p.add_argument("--once", action="store_true")
    p.add_argument("--notification", action="append", default=[], metavar="ID",
                   help="with --once: only these notifications (repeatable), e.g. one a user asked about")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("prune", help="the retention sweep, once: delete finished notifications older than "
                       "NOTIFY_RETENTION_DAYS (never inside the topics' replay window) with their deliveries, "
                       "attempts and transitions, and old shadow results, published settings and redrive marks "
                       "(the reconciler's worker runs it every NOTIFY_PRUNE_INTERVAL_S)")
    p.add_argument("--dry-run", action="store_true", help="count what is due, delete nothing")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("bench", help="benchmark the whole pipeline (requests -> every stage -> the simulator's "
                       "ledger -> receipts) on topics, a database and Redis keys of its own, removed afterwards: "
                       "throughput, latency per stage and lane, CPU per notification of every process on the box; "
                       "writes a report with charts")
    p.add_argument("--requests", type=int, default=100_000, help="requests of the burst phase")
    p.add_argument("--api-share", type=float, default=0.1, help="share of the burst posted to the ingest API")
    p.add_argument("--idle-otps", type=int, default=50, help="OTPs sent one at a time through the API first")
    p.add_argument("--backlog", type=int, default=100_000, help="bulk requests queued before the OTPs of phase 2")
    p.add_argument("--otps", type=int, default=200, help="OTPs sent (one every 50 ms) while the backlog drains")
    p.add_argument("--skip-backlog", action="store_true", help="no phase 2")
    p.add_argument("--baseline", action="store_true", help="also run the raw Kafka chain doing the same hops and "
                   "print the ratio")
    p.add_argument("--provider-latency-ms", type=float, default=20.0, help="the simulated providers' latency")
    p.add_argument("--report", metavar="DIR", help="report folder (default .stack/bench-reports/<time>-<run>)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("config", help="print every setting, its environment variable and its value")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("shadow", help="shadow mode (NOTIFY_SHADOW): `report` compares, for the mirrored share, the "
                       "candidate with the live provider per channel: acceptance, latency percentiles, SMS encoding "
                       "and segments, the candidate's top errors")
    p.add_argument("action", choices=["report"])
    p.add_argument("--since", default="24h", help="the window, back from now: 30m, 24h, 7d (default 24h)")
    p.add_argument("--channel", choices=["sms", "email", "push"], default=None, help="only this channel")
    p.add_argument("--json", action="store_true", help="the report as one JSON document")
    p.set_defaults(func=cmd_shadow)
    return parser
