"""The one CLI of the project: `notify ...` (console script) or `python -m pipeline ...`.

`main` parses the command line (parser.py: every sub-command and its options) and runs the sub-command's handler
(commands.py). Each sub-command imports what it needs when it runs, so `notify --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from pipeline.cli.parser import build_parser
from pipeline.errors import NotifyError


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
