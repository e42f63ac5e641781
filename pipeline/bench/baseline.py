"""The raw baseline of `notify bench --baseline`: the same hops as the pipeline, written as plainly as possible.

Per lane, one process per hop, each a bare confluent-kafka loop (take what has arrived up to 500 records, do the
hop's work for the batch, produce, flush, commit), with nothing of the stage runtime: no staged output, no
quarantine, no metrics, no policies beyond what the hop must do. The work per batch is the pipeline's:

- intake: decode; one INSERT ... SELECT FROM unnest ... ON CONFLICT DO NOTHING RETURNING; forward, a dedup-table
  record and an event per request;
- preferences: decode; build and encode the delivery task; forward;
- routing: decode; the rate-limit script for every task in one Redis pipeline; one upsert of the delivery rows;
  forward and an event;
- sender: decode; one claim UPDATE; every HTTP call of the batch at once to the same simulator, in the providers'
  wire format (Twilio's form with basic auth, SendGrid's v3 JSON); one outcome UPDATE and one attempts INSERT; two
  events;
- receiver (the API's port): the simulator's callbacks, signature checked, each receipt produced and acknowledged
  before the answer;
- receipts: decode; one UPDATE to delivered; an event.

The ratio pipeline / baseline is the share of the machine's best the pipeline reaches on the same box.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from pipeline.bench import load
from pipeline.bench.baseline_hops import BODIES, HOPS, run_hop
from pipeline.bench.baseline_receiver import run_receiver
from pipeline.bench.load import KafkaLoad, Timeline, TopicClock
from pipeline.bench.rig import BenchDatabase, BenchError, stop_group
from pipeline.config import REPO_ROOT, Settings
from pipeline.domain import LANES
from pipeline.kafka import clients, topics
from pipeline.process import aio

if TYPE_CHECKING:
    from pipeline.bench.pipeline_rig import Rig
    from pipeline.bench.procs import Box


def run(made: Rig, requests: int, timeout_s: float, box: Box) -> Any:
    """The baseline's burst of `requests` on topics and a fresh database of its own (as the pipeline's was), against
    the same simulator, given `timeout_s` to drain: the same measures as the pipeline's burst."""
    token = uuid.uuid4().hex[:8]
    with BenchDatabase(made.settings, token, drop_stale=False) as base_db:
        mine = dataclasses.replace(base_db, topic_prefix=f"base{made.token}.")
        topics.apply(mine)
        try:
            return _run(made, requests, timeout_s, box, mine, token)
        finally:
            from pipeline.bench.pipeline_rig import remove_redis_keys

            clients.delete_prefixed(mine, groups=True)
            remove_redis_keys(mine, token)


def _run(made: Rig, requests: int, timeout_s: float, box: Box, mine: Settings, token: str) -> Any:
    from pipeline.bench.measure import drain, pg_delta, pg_stats, pg_tables, pg_tables_delta
    from pipeline.bench.pipeline_rig import say
    from pipeline.bench.procs import usage
    from pipeline.bench.results import PhaseResult

    env = {**made.env, "NOTIFY_TOPIC_PREFIX": mine.topic_prefix, "DATABASE_URL": mine.dsn}
    log = (made.settings.stack_dir / "bench" / f"baseline-{made.token}.log").open("wb")
    argv = [[sys.executable, "-m", "pipeline.bench.baseline", "--hop", hop, "--lane", lane]
            for lane in LANES for hop in HOPS]
    argv += [[sys.executable, "-m", "pipeline.bench.baseline", "--hop", "receipts", "--lane", "critical"],
             [sys.executable, "-m", "pipeline.bench.baseline", "--hop", "receiver", "--port",
              str(made.settings.api_port)]]
    processes = [subprocess.Popen(a, env={**os.environ, **env}, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True) for a in argv]

    def alive() -> bool:
        return all(p.poll() is None for p in processes)

    timeline = Timeline(requests)
    clock = TopicClock(mine, {"t": timeline})
    clock.start()
    try:
        producer = KafkaLoad(mine, made.codec)
        probe = load.request("p", 2, token, "otp")
        producer.send(probe)
        producer.flush()
        deadline = time.monotonic() + 120
        while made.accepted() < 1:
            if time.monotonic() > deadline or not alive():
                raise BenchError(f"the baseline chain did not pass its probe; see {log.name}")
            time.sleep(0.2)
        time.sleep(1.0)  # the probe's receipt
        accepted_before = made.accepted()
        pg_before, tables_before = pg_stats(mine), pg_tables(mine)
        before = box.sample()
        started = time.monotonic()
        first_ms = load.now_ms()
        for i in range(requests):
            req = load.request("t", i, token, "transaction" if i % 2 == 0 else "portfolio")
            timeline.set("created", i, req["created_at"].timestamp() * 1000)
            producer.send(req)
        producer.flush()
        produce_s = time.monotonic() - started
        say(f"  produced {requests} requests to Kafka in {produce_s:.1f} s")
        result = PhaseResult("baseline", requests, produce_s, timeline, first_ms)
        result.complete, result.peak_rss_kib, after = drain(made, box, requests, accepted_before,
                                                            [f"t%.{token}"], timeout_s, alive,
                                                            database=mine)
        if not alive():
            raise BenchError(f"a process of the baseline chain died mid-run; see {log.name}")
        result.usage = usage(before, after)
        time.sleep(1.0)
        result.extra["postgres"] = pg_delta(pg_before, pg_stats(mine))
        result.extra["postgres_tables"] = pg_tables_delta(tables_before, pg_tables(mine))
        with psycopg.connect(mine.dsn) as conn:
            result.states = load.stamp_from_db(conn, {"t": timeline}, token).get("t", {})
        return result
    finally:
        clock.stop()
        for process in processes:
            stop_group(process)
        log.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hop", required=True, choices=[*BODIES, "receiver"])
    parser.add_argument("--lane", default="critical")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    if args.hop == "receiver":
        aio.run(run_receiver(args.port))
    else:
        aio.run(run_hop(args.hop, args.lane))
    return 0


if __name__ == "__main__":
    sys.exit(main())

