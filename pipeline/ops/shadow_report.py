"""`notify shadow report [--since 24h] [--channel sms] [--json]`: the shadow comparisons of a window, for people.

Reads the window's rows of `shadow_results` (written by the senders, see pipeline/stages/sender.py) and summarises
them with pipeline/policy/shadow.py: per channel and (primary, candidate) pair, how many messages were mirrored,
each side's acceptance rate and latency percentiles, formatting differences and the candidate's top error codes.
"""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Iterator

from pipeline.config import Settings
from pipeline.policy.shadow import ShadowResult, Side, parse_since, render_table, summarise
from pipeline.state import db

SELECT = """
SELECT notification_id::text, channel, lane,
       primary_provider, primary_outcome, primary_code, primary_latency_ms, primary_encoding, primary_segments,
       primary_length, candidate_provider, candidate_outcome, candidate_code, candidate_latency_ms,
       candidate_encoding, candidate_segments, candidate_length
FROM shadow_results
WHERE created_at >= %(since)s AND (%(channel)s::text IS NULL OR channel = %(channel)s)
"""
FETCH = 5000  # rows per round trip of the server-side cursor


def read(settings: Settings, since: datetime.datetime, channel: str | None = None) -> Iterator[ShadowResult]:
    """The comparisons recorded at or after `since` (of one channel when given), streamed."""
    with db.connect(settings) as conn, conn.transaction(), conn.cursor(name="shadow_report") as cursor:
        cursor.itersize = FETCH
        cursor.execute(SELECT, {"since": since, "channel": channel})
        for row in cursor:
            yield ShadowResult(row[0], row[1], row[2], Side(*row[3:10]), Side(*row[10:17]))


def report(settings: Settings, since: str = "24h", channel: str | None = None) -> list[dict[str, object]]:
    start = datetime.datetime.now(datetime.UTC) - parse_since(since)
    return summarise(read(settings, start, channel))


def run_report_cli(settings: Settings, since: str, channel: str | None, as_json: bool) -> int:
    try:
        parse_since(since)
    except ValueError as exc:
        print(f"notify shadow report: --since {exc}", file=sys.stderr)
        return 2
    summary = report(settings, since, channel)
    if as_json:
        print(json.dumps({"since": since, "channel": channel, "pairs": summary}, indent=2))
    else:
        print(render_table(summary, since=since))
    return 0
