"""The handlers of `notify`'s sub-commands (parser.py sets one per sub-command): each takes the parsed arguments
and returns the exit status.

Each handler imports what it needs when it runs, so `notify --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

from pipeline import config
from pipeline.domain import PROVIDERS
from pipeline.domain import STAGES as _STAGES
from pipeline.process import aio


def cmd_stack(args: argparse.Namespace) -> int:
    from pipeline import stack

    settings = config.settings()
    if args.action == "up":
        return stack.up(settings)
    if args.action == "down":
        return stack.down(settings)
    return stack.status(settings)


def cmd_run(args: argparse.Namespace) -> int:
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
    simulated = [p for p in PROVIDERS if getattr(settings, f"{p}_base_url") is None]
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


def cmd_api(args: argparse.Namespace) -> int:

    from pipeline.api.app import run_api

    aio.run(run_api(config.settings(), port=args.port))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
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


def cmd_events(args: argparse.Namespace) -> int:
    from pipeline.ops import events

    events.tail(config.settings(), user=args.user, notification=args.notification,
                from_beginning=args.from_beginning, as_json=args.json, limit=args.limit)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from pipeline.state import migrate

    applied = migrate.migrate(config.settings())
    print(f"applied {len(applied)} migration(s): {', '.join(applied)}" if applied else "migrations: nothing to do")
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from pipeline.kafka import topics

    settings = config.settings()
    plan = topics.plan(settings) if args.action == "plan" else topics.apply(settings)
    print(plan.render())
    return 1 if plan.errors else 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from pipeline.kafka import schemas

    if args.action == "freeze":
        written = schemas.freeze()
        print("\n".join(f"recorded {path}" for path in written) or "schemas: nothing to record")
        return 0
    problems = schemas.check_history()
    print("\n".join(f"! {problem}" for problem in problems) or "schemas: every schema is recorded and compatible")
    return 1 if problems else 0


def cmd_templates(args: argparse.Namespace) -> int:
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


def cmd_kafka(args: argparse.Namespace) -> int:
    from pipeline.stack import kafka_tool_argv

    argv = kafka_tool_argv(config.settings(), args.tool, args.args)
    os.execvp(argv[0], argv)
    return 127  # not reached


def cmd_worker(args: argparse.Namespace) -> int:
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


def cmd_exporter(_args: argparse.Namespace) -> int:
    from pipeline.stages import worker

    return worker.run_exporter(config.settings())


def cmd_replay(args: argparse.Namespace) -> int:
    from pipeline.ops import replay

    try:
        replay.replay(config.settings(), args.group, args.topic, to_datetime=args.to_datetime,
                      to_offset=args.to_offset, shift_by=args.shift_by, dry_run=args.dry_run)
    except replay.ReplayError as exc:
        print(f"notify replay: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_invalid(args: argparse.Namespace) -> int:
    from pipeline.ops import quarantine

    return quarantine.run_invalid_cli(config.settings(), args.action, args.filter, args.position, args.since,
                                      args.until, args.dry_run, args.json)


def cmd_dlq(args: argparse.Namespace) -> int:
    from pipeline.ops import dlq

    return dlq.run_dlq_cli(config.settings(), args.action, args.filter, args.position, args.dry_run, args.json)


def cmd_prune(args: argparse.Namespace) -> int:
    import asyncio

    from pipeline.ops import prune
    from pipeline.state import db

    async def once() -> prune.Outcome:
        try:
            return await prune.prune_once(config.settings(), dry_run=args.dry_run)
        finally:
            await db.close_async_pools()

    print(asyncio.run(once()).render(dry_run=args.dry_run))
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
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


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.bench.run import Plan, run_bench

    return run_bench(config.settings(), Plan(
        requests=args.requests, api_share=args.api_share, idle_otps=args.idle_otps, backlog=args.backlog,
        otps=args.otps, skip_backlog=args.skip_backlog, baseline=args.baseline,
        provider_latency_ms=args.provider_latency_ms, report_dir=Path(args.report) if args.report else None))


def cmd_config(args: argparse.Namespace) -> int:
    settings = config.settings()
    for name, setting in config.SETTINGS.items():
        value = getattr(settings, name)
        shown = "(unset)" if value is None else ("****" + str(value)[-4:] if setting.secret else value)
        print(f"{setting.env:32} = {shown}\n{'':35}{setting.help}")
    return 0


def cmd_shadow(args: argparse.Namespace) -> int:
    from pipeline.ops import shadow_report

    return shadow_report.run_report_cli(config.settings(), args.since, args.channel, args.json)


def cmd_simulator(args: argparse.Namespace) -> int:
    from connectors.simulator import run_simulator_cli
    from connectors.simulator.admin import run_admin_cli

    settings = config.settings()
    if args.action == "serve":
        return run_simulator_cli(settings, host=args.host, port=args.port)
    return run_admin_cli(args.port or settings.simulator_port, args.action, args.args, provider=args.provider)

