"""The one CLI of the project: `notify ...` (console script) or `python -m pipeline ...`.

Each sub-command imports what it needs when it runs, so `notify --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence

from pipeline import config
from pipeline.domain import STAGES as _STAGES
from pipeline.errors import NotifyError
from pipeline.process import aio


def _cmd_stack(args: argparse.Namespace) -> int:
    from pipeline import stack

    settings = config.settings()
    if args.action == "up":
        return stack.up(settings)
    if args.action == "down":
        return stack.down(settings)
    return stack.status(settings)


def _cmd_run(args: argparse.Namespace) -> int:
    """The main job: the stack, then every worker and the API in the foreground until Ctrl-C."""
    import signal
    import subprocess

    from pipeline import stack

    settings = config.settings()
    rc = stack.up(settings)
    if rc != 0 or args.stack_only:
        return rc
    children = []
    env = dict(os.environ)
    if settings.webhook_base_url is None:
        # Receipts come back to our own API, so deliveries reach `delivered` locally as they would in production.
        env["NOTIFY_WEBHOOK_BASE_URL"] = f"http://127.0.0.1:{settings.api_port}/webhooks"
    simulated = [p for p in config.PROVIDERS if getattr(settings, f"{p}_base_url") is None]
    if simulated:
        # Providers without a configured base URL are served by the simulator, so the local job sends end to end.
        children.append(subprocess.Popen([sys.executable, "-m", "pipeline", "simulator"], env=env))
        print(f"provider simulator on http://127.0.0.1:{settings.simulator_port} for {', '.join(simulated)}",
              flush=True)
    workers = subprocess.Popen([sys.executable, "-m", "pipeline", "worker", "--all"], env=env)
    api = subprocess.Popen([sys.executable, "-m", "pipeline", "api"], env=env)
    children += [api, workers]
    try:
        _wait_for_pipeline(settings, lambda: workers.poll() is None and api.poll() is None)
        print(f"\npipeline running: API on http://127.0.0.1:{settings.api_port} (OpenAPI at /openapi.json); "
              f"/metrics, /health/live and /health/ready on the API, every worker (:{settings.metrics_port + 1}..) "
              f"and the lag exporter; Prometheus on http://127.0.0.1:{settings.prometheus_port} scrapes them all."
              "\nCtrl-C stops the workers and the API (the stack keeps running: `notify stack down`).", flush=True)
        while workers.poll() is None and api.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=40)
        except subprocess.TimeoutExpired:
            child.kill()
    return 0


def _wait_for_pipeline(settings: config.Settings, alive: Callable[[], bool], timeout_s: float = 120.0) -> None:
    """Until the API, every worker and the exporter answer /health/ready (or `timeout_s`); then show them."""
    from pipeline import stack

    deadline = time.monotonic() + timeout_s
    while True:
        groups = stack.pipeline_health(settings)
        if all(group.all_ready for group in groups) or time.monotonic() > deadline or not alive():
            break
        time.sleep(1.0)
    for group in groups:
        print(f"{group.name:10} {group.address:40} {group.shown()}", flush=True)


def _cmd_api(args: argparse.Namespace) -> int:

    from pipeline.api.app import run_api

    aio.run(run_api(config.settings(), port=args.port))
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from pipeline.api import keys

    settings = config.settings()
    if args.action == "create":
        scopes = keys.normalise_scopes(args.scope or keys.DEFAULT_SCOPES)
        key_id, api_key = keys.create_key(settings, args.name, scopes)
        print(f"key id {key_id} for {args.name}, scopes {', '.join(scopes)}; the key (shown once, store it now):"
              f"\n{api_key}")
        return 0
    if args.action == "revoke":
        revoked = keys.revoke_key(settings, args.name)
        print(f"revoked {args.name}" if revoked else f"no active key {args.name}")
        return 0 if revoked else 1
    for info in keys.list_keys(settings):
        print(f"{info.key_id}  {info.service:24} {','.join(info.scopes):18} created {info.created_at:%Y-%m-%d %H:%M}"
              f"  {'revoked ' + format(info.revoked_at, '%Y-%m-%d %H:%M') if info.revoked_at else 'active'}")
    return 0


def _cmd_events(args: argparse.Namespace) -> int:
    from pipeline.ops import events

    events.tail(config.settings(), user=args.user, notification=args.notification,
                from_beginning=args.from_beginning, as_json=args.json, limit=args.limit)
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from pipeline.state import migrate

    applied = migrate.migrate(config.settings())
    print(f"applied {len(applied)} migration(s): {', '.join(applied)}" if applied else "migrations: nothing to do")
    return 0


def _cmd_topics(args: argparse.Namespace) -> int:
    from pipeline.kafka import topics

    settings = config.settings()
    plan = topics.plan(settings) if args.action == "plan" else topics.apply(settings)
    print(plan.render())
    return 1 if plan.errors else 0


def _cmd_schemas(args: argparse.Namespace) -> int:
    from pipeline.kafka import serde

    if args.action == "freeze":
        written = serde.freeze()
        print("\n".join(f"recorded {path}" for path in written) or "schemas: nothing to record")
        return 0
    problems = serde.check_history()
    print("\n".join(f"! {problem}" for problem in problems) or "schemas: every schema is recorded and compatible")
    return 1 if problems else 0


def _cmd_templates(args: argparse.Namespace) -> int:
    from pipeline.domain import CHANNELS
    from pipeline.policy import sms, templates

    if args.action == "check":
        found = templates.load(config.settings().templates_dir)
        print("\n".join(f"! {problem}" for problem in found.problems)
              or f"templates: {len(found.ids)} templates in {found.directory}, every one valid")
        return 1 if found.problems else 0
    if not args.template_id:
        raise SystemExit("notify templates render: give the template id, e.g. otp.login")
    if malformed := [kv for kv in args.param if "=" not in kv]:
        raise SystemExit(f"notify templates render: --param takes key=value, not {', '.join(malformed)}")
    params = {key: value for key, _, value in (kv.partition("=") for kv in args.param)}
    try:
        print(f"{args.template_id}: locale {args.locale} renders from "
              f"{templates.resolve_locale(args.template_id, args.locale)}/")
        for channel in [args.channel] if args.channel else CHANNELS:
            rendered = templates.render({"content": None, "template_id": args.template_id, "locale": args.locale,
                                         "channel": channel, "template_params": params})
            print(f"\n[{channel}]")
            if channel != "sms":
                print(f"{'title' if channel == 'push' else 'subject'}: {rendered.subject}")
            print(f"body:\n{rendered.body}")
            if rendered.html is not None:
                print(f"html:\n{rendered.html}")
            if channel == "sms":
                print(f"sms: {sms.encoding(rendered.body)}, {sms.utf16_length(rendered.body)} "
                      f"characters, {sms.segments(rendered.body)} segment(s)")
    except templates.TemplateError as exc:
        print(f"notify templates render: {exc.code}: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_kafka(args: argparse.Namespace) -> int:
    from pipeline.stack import kafka_tool_argv

    argv = kafka_tool_argv(config.settings(), args.tool, args.args)
    os.execvp(argv[0], argv)
    return 127  # not reached


def _cmd_worker(args: argparse.Namespace) -> int:
    from pipeline.stages import worker

    settings = config.settings()
    if args.all:
        stages = _STAGES if args.stages is None else tuple(s.strip() for s in args.stages.split(","))
        unknown = sorted(set(stages) - set(_STAGES))
        if unknown:
            raise SystemExit(f"notify worker: unknown stage(s) {unknown}; known: {', '.join(_STAGES)}")
        with_exporter = args.stages is None if args.exporter is None else args.exporter
        try:
            replicas = worker.parse_replicas(args.replicas, _STAGES)
        except ValueError as exc:
            raise SystemExit(f"notify worker: {exc}") from None
        return worker.run_all(settings, stages=stages, with_exporter=with_exporter, replicas=replicas)
    if not (args.stage and args.lane):
        raise SystemExit("notify worker: give --stage and --lane, or --all")
    return worker.run_stage(settings, args.stage, args.lane, args.replica)


def _cmd_exporter(_args: argparse.Namespace) -> int:
    from pipeline.stages import worker

    return worker.run_exporter(config.settings())


def _cmd_replay(args: argparse.Namespace) -> int:
    from pipeline.ops import replay

    try:
        replay.replay(config.settings(), args.group, args.topic, to_datetime=args.to_datetime,
                      to_offset=args.to_offset, shift_by=args.shift_by, dry_run=args.dry_run)
    except replay.ReplayError as exc:
        print(f"notify replay: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_invalid(args: argparse.Namespace) -> int:
    from pipeline.ops import quarantine

    return quarantine.run_invalid_cli(config.settings(), args.action, args.filter, args.position, args.since,
                                      args.until, args.dry_run, args.json)


def _cmd_dlq(args: argparse.Namespace) -> int:
    from pipeline.ops import dlq

    return dlq.run_dlq_cli(config.settings(), args.action, args.filter, args.position, args.dry_run, args.json)


def _cmd_reconcile(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from pipeline.ops import reconcile

    settings = config.settings()
    if args.once:
        summary = asyncio.run(reconcile.reconcile_once(settings, args.notification or None))
        print(json.dumps(summary.as_dict()))
        return 0
    from pipeline.stages import worker

    return worker.run_stage(settings, "reconcile", "critical")


def _cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.bench.run import Plan, run_bench

    return run_bench(config.settings(), Plan(
        requests=args.requests, api_share=args.api_share, idle_otps=args.idle_otps, backlog=args.backlog,
        otps=args.otps, skip_backlog=args.skip_backlog, baseline=args.baseline,
        provider_latency_ms=args.provider_latency_ms, report_dir=Path(args.report) if args.report else None))


def _cmd_config(args: argparse.Namespace) -> int:
    settings = config.settings()
    for name, setting in config.SETTINGS.items():
        value = getattr(settings, name)
        shown = "(unset)" if value is None else ("****" + str(value)[-4:] if setting.secret else value)
        print(f"{setting.env:32} = {shown}\n{'':35}{setting.help}")
    return 0


def _cmd_shadow(args: argparse.Namespace) -> int:
    from pipeline.ops import shadow_report

    return shadow_report.run_report_cli(config.settings(), args.since, args.channel, args.json)


def _cmd_simulator(args: argparse.Namespace) -> int:
    from connectors.simulator import run_simulator_cli
    from connectors.simulator.admin import run_admin_cli

    settings = config.settings()
    if args.action == "serve":
        return run_simulator_cli(settings, host=args.host, port=args.port)
    return run_admin_cli(args.port or settings.simulator_port, args.action, args.args, provider=args.provider)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="notify", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="start, stop or inspect the local stack (Kafka, PostgreSQL, Redis)")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=_cmd_stack)

    p = sub.add_parser("run", help="the main job: the stack (with migrations and topics), then the workers and "
                       "the API in the foreground")
    p.add_argument("--stack-only", action="store_true", help="bring the stack up and return")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("simulator", help="the provider simulator (Twilio, Termii, SendGrid, Mailgun, FCM, APNs wire "
                       "APIs) on 127.0.0.1:NOTIFY_SIMULATOR_PORT (APNs: NOTIFY_SIMULATOR_APNS_PORT); programmable at "
                       "/_admin: `set PROVIDER key=value ...` (latency_ms, jitter_ms, error_rates, outage_s, "
                       "rate_limit_per_s, accept_then_hang, ...), `show ledger|providers|stats|test-sends`, `reset`")
    p.add_argument("action", nargs="?", default="serve", choices=["serve", "set", "show", "reset"])
    p.add_argument("args", nargs="*", help="set: PROVIDER key=value ...; show: what to show")
    p.add_argument("--provider", default=None, help="show ledger|test-sends: only this provider's messages")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=_cmd_simulator)

    p = sub.add_parser("api", help="run the ingest API (127.0.0.1, NOTIFY_API_PORT)")
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=_cmd_api)

    p = sub.add_parser("keys", help="API keys of upstream services: create SERVICE | revoke KEY_ID | list")
    p.add_argument("action", choices=["create", "revoke", "list"])
    p.add_argument("name", nargs="?", default="", help="service (create) or key id (revoke)")
    p.add_argument("--scope", action="append", choices=["ingest", "read", "admin"],
                   help="create: what the key may do, repeatable (default ingest): ingest (submit notifications, "
                   "settings), read (the read API, own service only), admin (everything, the ops console)")
    p.set_defaults(func=_cmd_keys)

    p = sub.add_parser("events", help="delivery events: `notify events tail [--user U] [--notification N]`")
    p.add_argument("action", choices=["tail"])
    p.add_argument("--user")
    p.add_argument("--notification")
    p.add_argument("--from-beginning", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--limit", type=int, default=None, help="stop after this many events")
    p.set_defaults(func=_cmd_events)

    p = sub.add_parser("migrate", help="apply database migrations (in order, recorded, idempotent)")
    p.set_defaults(func=_cmd_migrate)

    p = sub.add_parser("topics", help="show or apply the difference between topics/ and the cluster")
    p.add_argument("action", choices=["plan", "apply"])
    p.set_defaults(func=_cmd_topics)

    p = sub.add_parser("schemas", help="check that schemas/ is recorded and compatible, or record a change")
    p.add_argument("action", choices=["check", "freeze"])
    p.set_defaults(func=_cmd_schemas)

    p = sub.add_parser("templates", help="the message templates of NOTIFY_TEMPLATES_DIR: `check` lists every "
                       "problem; `render ID [--locale L] [--channel C] [--param k=v ...]` shows what is sent")
    p.add_argument("action", choices=["check", "render"])
    p.add_argument("template_id", nargs="?", help="render: the template, e.g. otp.login")
    p.add_argument("--locale", default="en", help="render: the recipient's locale (default en)")
    p.add_argument("--channel", choices=["sms", "email", "push"], default=None,
                   help="render: only this channel (default: each)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="render: a template "
                   "parameter; repeatable")
    p.set_defaults(func=_cmd_templates)

    p = sub.add_parser(
        "kafka",
        help="run a Kafka CLI tool from the stack's jars (topics, consumer-groups, console-consumer, ...)",
        description="Runs a Kafka CLI tool against the configured cluster; --bootstrap-server is added "
        "when not given. Example: notify kafka consumer-groups --list",
    )
    p.add_argument("tool", help="topics | consumer-groups | console-consumer | console-producer | get-offsets")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_kafka)

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
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("exporter", help="the consumer-lag exporter: committed offsets and high watermarks of every "
                       "notify-* group, as Prometheus metrics (port after the workers'; `notify config`)")
    p.set_defaults(func=_cmd_exporter)

    p = sub.add_parser("replay", help="reset a consumer group's offsets on a topic (its workers stopped) so the "
                       "stage re-reads it; every stage is idempotent, so nothing is sent twice")
    p.add_argument("--group", required=True, help="consumer group, e.g. notify-sender-critical")
    p.add_argument("--topic", required=True, help="topic as named on the cluster, e.g. send.sms.critical")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--to-datetime", help="the first offset at or after this ISO 8601 time (no zone: UTC)")
    where.add_argument("--to-offset", type=int, help="this offset in every partition (clamped to what is kept)")
    where.add_argument("--shift-by", type=int, help="the committed offset plus N (negative: back)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.set_defaults(func=_cmd_replay)

    p = sub.add_parser("dlq", help="the dead-letter queue: `list`, `show` one entry, `redrive` entries back to "
                       "their send topic (once: a redriven delivery is queued again, a second redrive skips it)")
    p.add_argument("action", choices=["list", "show", "redrive"])
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="only entries whose KEY is VALUE (reason, channel, lane, type, notification_id, provider, "
                   "user_id); repeatable, all must match")
    p.add_argument("--position", help="one entry, as PARTITION:OFFSET (from `list`)")
    p.add_argument("--dry-run", action="store_true", help="redrive: say what would be redriven, change nothing")
    p.add_argument("--json", action="store_true", help="list: one JSON object per line")
    p.set_defaults(func=_cmd_dlq)

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
    p.set_defaults(func=_cmd_invalid)

    p = sub.add_parser("reconcile", help="resolve deliveries stuck after their send (sending past the lease, "
                       "unknown, accepted without a receipt, overdue retries) by asking the providers; `--once` runs "
                       "one round and prints what it did, otherwise a round every NOTIFY_RECONCILE_INTERVAL_S "
                       "(`notify worker --all` runs this loop too; an advisory lock elects one sweeper)")
    p.add_argument("--once", action="store_true")
    p.add_argument("--notification", action="append", default=[], metavar="ID",
                   help="with --once: only these notifications (repeatable), e.g. one a user asked about")
    p.set_defaults(func=_cmd_reconcile)

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
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("config", help="print every setting, its environment variable and its value")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("shadow", help="shadow mode (NOTIFY_SHADOW): `report` compares, for the mirrored share, the "
                       "candidate with the live provider per channel: acceptance, latency percentiles, SMS encoding "
                       "and segments, the candidate's top errors")
    p.add_argument("action", choices=["report"])
    p.add_argument("--since", default="24h", help="the window, back from now: 30m, 24h, 7d (default 24h)")
    p.add_argument("--channel", choices=["sms", "email", "push"], default=None, help="only this channel")
    p.add_argument("--json", action="store_true", help="the report as one JSON document")
    p.set_defaults(func=_cmd_shadow)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except NotifyError as exc:
        print(f"notify {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
