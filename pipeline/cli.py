"""The one CLI of the project: `notify ...` (console script) or `python -m pipeline ...`.

Each sub-command imports what it needs when it runs, so `notify --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from pipeline import config
from pipeline.errors import NotifyError


def _cmd_stack(args: argparse.Namespace) -> int:
    from pipeline import stack

    settings = config.settings()
    if args.action == "up":
        return stack.up(settings)
    if args.action == "down":
        return stack.down(settings)
    return stack.status(settings)


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline import stack

    settings = config.settings()
    rc = stack.up(settings)
    if rc == 0:
        print("\nThe local stack is up. Stop it with `notify stack down` (or `make stack-down`).")
    return rc


def _cmd_migrate(args: argparse.Namespace) -> int:
    from pipeline import migrate

    applied = migrate.migrate(config.settings())
    print(f"applied {len(applied)} migration(s): {', '.join(applied)}" if applied else "migrations: nothing to do")
    return 0


def _cmd_topics(args: argparse.Namespace) -> int:
    from pipeline import topics

    settings = config.settings()
    plan = topics.plan(settings) if args.action == "plan" else topics.apply(settings)
    print(plan.render())
    return 1 if plan.errors else 0


def _cmd_schemas(args: argparse.Namespace) -> int:
    from pipeline import serde

    if args.action == "freeze":
        written = serde.freeze()
        print("\n".join(f"recorded {path}" for path in written) or "schemas: nothing to record")
        return 0
    problems = serde.check_history()
    print("\n".join(f"! {problem}" for problem in problems) or "schemas: every schema is recorded and compatible")
    return 1 if problems else 0


def _cmd_kafka(args: argparse.Namespace) -> int:
    from pipeline.stack import kafka_tool_argv

    argv = kafka_tool_argv(config.settings(), args.tool, args.args)
    os.execvp(argv[0], argv)
    return 127  # not reached


def _cmd_config(args: argparse.Namespace) -> int:
    settings = config.settings()
    for name, setting in config.SETTINGS.items():
        value = getattr(settings, name)
        shown = "(unset)" if value is None else value
        print(f"{setting.env:32} = {shown}\n{'':35}{setting.help}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="notify", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="start, stop or inspect the local stack (Kafka, PostgreSQL, Redis)")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=_cmd_stack)

    p = sub.add_parser("run", help="the main job: bring the stack up and apply migrations and topics")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("migrate", help="apply database migrations (in order, recorded, idempotent)")
    p.set_defaults(func=_cmd_migrate)

    p = sub.add_parser("topics", help="show or apply the difference between topics/ and the cluster")
    p.add_argument("action", choices=["plan", "apply"])
    p.set_defaults(func=_cmd_topics)

    p = sub.add_parser("schemas", help="check that schemas/ is recorded and compatible, or record a change")
    p.add_argument("action", choices=["check", "freeze"])
    p.set_defaults(func=_cmd_schemas)

    p = sub.add_parser(
        "kafka",
        help="run a Kafka CLI tool from the stack's jars (topics, consumer-groups, console-consumer, ...)",
        description="Runs a Kafka CLI tool against the configured cluster; --bootstrap-server is added "
        "when not given. Example: notify kafka consumer-groups --list",
    )
    p.add_argument("tool", help="topics | consumer-groups | console-consumer | console-producer | get-offsets")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_kafka)

    p = sub.add_parser("config", help="print every setting, its environment variable and its value")
    p.set_defaults(func=_cmd_config)
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
