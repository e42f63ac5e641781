"""Shadow mode you can read, on the real stack: a sender mirrors half of the SMS it sends through Termii to Twilio's
test credentials, writes one shadow_results row per mirrored message, and `notify shadow report` compares them.

The module runs its own simulator and `notify worker --all --stages sender` on topics of their own and on a database
of their own (migrated here), so the report's figures are exactly this module's messages.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from connectors.simulator.common import MAGIC_INVALID
from pipeline.bench.rig import Workers, free_port_block
from pipeline.bench.sender_rig import SimulatorProcess, make_task, produce, seed, wait_states
from pipeline.config import REPO_ROOT, Settings
from pipeline.kafka import topics
from pipeline.policy.shadow import is_mirrored
from pipeline.state import db, migrate

SHARE = 0.5
# body -> (encoding, segments) as a carrier bills it, counted by hand: 160/153 GSM-7 septets, 70/67 UTF-16 units
BODIES: dict[str, tuple[str, int]] = {
    "Your code is 123456": ("GSM-7", 1),
    "Debit of 5,000.00 NGN on account ****1234 at SHOPRITE LEKKI. " * 3: ("GSM-7", 2),  # 183 septets
    "Ваш код 123456. Никому его не сообщайте.": ("UCS-2", 1),  # noqa: RUF001  # Cyrillic on purpose: 40 units
    "Code 😀 " * 10: ("UCS-2", 2),  # 8 units each: 80
    "Price alert [BTC] crossed {62,000} \u20ac": ("GSM-7", 1),  # 36 characters, 5 in the extension table: 41 septets
}


@dataclasses.dataclass
class Shadowed:
    settings: Settings
    sim: SimulatorProcess
    env: dict[str, str]


def ids_for(count: int, mirrored: bool) -> list[str]:
    """Notification ids that the share does (or does not) mirror."""
    out: list[str] = []
    while len(out) < count:
        candidate = str(uuid.uuid4())
        if is_mirrored(candidate, SHARE) == mirrored:
            out.append(candidate)
    return out


@pytest.fixture(scope="module")
def shadowed(settings: Settings) -> Iterator[Shadowed]:
    prefix = f"tshadow{uuid.uuid4().hex[:8]}."
    name = f"notify_test_shadow_{uuid.uuid4().hex[:8]}"
    with db.connect(settings, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = make_conninfo(settings.dsn, dbname=name)
    mine = dataclasses.replace(settings, topic_prefix=prefix, metrics_port=free_port_block(), database_url=dsn)
    sim = workers = None
    try:
        migrate.migrate(mine)
        topics.apply(mine)
        sim = SimulatorProcess.start(mine, mine.stack_dir / f"test-shadow-sim-{prefix.strip('.')}.log")
        # Termii is the only live SMS provider; Twilio, through its test credentials, is the candidate.
        env = {**sim.env, "DATABASE_URL": dsn, "NOTIFY_ROUTING": "sms.critical=termii;sms.bulk=termii",
               "NOTIFY_SHADOW": f"sms=twilio:{SHARE}", "NOTIFY_LOG_LEVEL": "INFO"}
        workers = Workers.start(mine, stages=("sender",), env=env)
        warm = [make_task(notification_id=nid) for nid in ids_for(2, False)]  # not mirrored: the report is the test's
        seed(mine, warm)
        produce(mine, warm)
        wait_states(mine, [t["notification_id"] for t in warm], ("accepted",), 120)
        yield Shadowed(mine, sim, env)
    finally:
        if workers is not None:
            workers.stop()
        if sim is not None:
            sim.stop()
        with db.connect(settings, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def shadow_rows(settings: Settings, ids: list[str]) -> list[tuple[Any, ...]]:
    with db.connect(settings) as conn:
        return conn.execute(
            "SELECT notification_id::text, primary_provider, primary_outcome, primary_code, primary_encoding, "
            "primary_segments, candidate_provider, candidate_outcome, candidate_code, candidate_encoding, "
            "candidate_segments, primary_latency_ms, candidate_latency_ms FROM shadow_results "
            "WHERE notification_id = ANY(%s)", (ids,)).fetchall()


def report(shadowed: Shadowed, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", "shadow", "report", *args], cwd=REPO_ROOT,
                          env={**os.environ, "DATABASE_URL": shadowed.env["DATABASE_URL"]}, capture_output=True,
                          text=True, timeout=60, check=True)


def test_the_mirrored_share_is_compared_recorded_and_reported_without_touching_real_deliveries(
        shadowed: Shadowed) -> None:
    settings, sim = shadowed.settings, shadowed.sim
    bodies = list(BODIES)
    mirrored_ids, plain_ids = ids_for(20, True), ids_for(20, False)
    tasks = [make_task(notification_id=nid, content={"subject": None, "body": bodies[i % len(bodies)]})
             for i, nid in enumerate(mirrored_ids + plain_ids)]
    # two mirrored and one plain message to a number both providers refuse
    refused = {mirrored_ids[0], mirrored_ids[1], plain_ids[0]}
    for task in tasks:
        if task["notification_id"] in refused:
            task["address"] = MAGIC_INVALID
    ids = [t["notification_id"] for t in tasks]
    seed(settings, tasks)
    produce(settings, tasks)
    states = wait_states(settings, ids, ("accepted", "failed"), 90)
    assert states == {nid: "failed" if nid in refused else "accepted" for nid in ids}

    deadline = time.monotonic() + 30  # the senders flush once a second
    while time.monotonic() < deadline and len(shadow_rows(settings, ids)) < len(mirrored_ids):
        time.sleep(0.3)
    time.sleep(2)  # a second flush must add nothing
    rows = shadow_rows(settings, ids)
    assert sorted(r[0] for r in rows) == sorted(mirrored_ids)  # exactly the mirrored share, once each

    body_of = {t["notification_id"]: t["content"]["body"] for t in tasks}
    for nid, p_provider, p_outcome, p_code, p_enc, p_seg, c_provider, c_outcome, c_code, c_enc, c_seg, p_ms, c_ms \
            in rows:
        expected_encoding, expected_segments = BODIES[body_of[nid]]
        assert (p_provider, c_provider) == ("termii", "twilio")
        assert (p_enc, p_seg) == (c_enc, c_seg) == (expected_encoding, expected_segments)  # neither rewrites text
        if nid in refused:
            assert (p_outcome, p_code, c_outcome, c_code) == ("permanent", "400", "permanent", "21211")
        else:
            assert (p_outcome, p_code, c_outcome, c_code) == ("accepted", None, "accepted", None)
        assert p_ms > 0 and c_ms > 0

    # Real deliveries: each accepted notification reached its user once, through the primary; the candidate's
    # sends are test-mode only, and exactly the mirrored ones.
    mine = set(ids)
    ledger = collections.Counter((e["notification_id"], e["provider"]) for e in sim.ledger()
                                 if e["notification_id"] in mine)
    assert ledger == {(nid, "termii"): 1 for nid in ids if nid not in refused}
    test_sends = collections.Counter(e["notification_id"] for e in
                                     sim.call("GET", "/_admin/test-sends?provider=twilio")["entries"]
                                     if e["notification_id"] in mine)
    assert test_sends == {nid: 1 for nid in mirrored_ids if nid not in refused}
    assert sim.call("GET", "/_admin/test-sends?provider=termii")["count"] == 0

    answer = json.loads(report(shadowed, "--channel", "sms", "--json").stdout)
    [pair] = answer["pairs"]
    mirrored = len(mirrored_ids)
    assert (pair["channel"], pair["primary"]["provider"], pair["candidate"]["provider"], pair["mirrored"]) == (
        "sms", "termii", "twilio", mirrored)
    accepted = mirrored - 2
    assert pair["primary"]["accepted"] == pair["candidate"]["accepted"] == accepted
    assert pair["primary"]["acceptance_rate"] == pair["candidate"]["acceptance_rate"] == round(accepted / mirrored, 4)
    assert pair["candidate"]["top_errors"] == [["21211", 2]] and pair["primary"]["top_errors"] == [["400", 2]]
    segments = sum(BODIES[body_of[nid]][1] for nid in mirrored_ids)
    assert pair["primary"]["segments"] == pair["candidate"]["segments"] == segments
    assert pair["formatting"] == {"encoding_differs": 0, "segments_differ": 0, "transliterates": []}
    ucs2 = sum(BODIES[body_of[nid]][0] == "UCS-2" for nid in mirrored_ids)
    assert pair["candidate"]["encodings"] == {"GSM-7": mirrored - ucs2, "UCS-2": ucs2}
    for name in ("p50", "p95", "p99"):
        p, c = pair["primary"]["latency_ms"][name], pair["candidate"]["latency_ms"][name]
        assert p > 0 and c > 0 and pair["latency_difference_ms"][name] == pytest.approx(c - p, abs=0.02)

    table = report(shadowed).stdout
    assert f"sms: termii (primary) vs twilio (candidate), {mirrored} mirrored" in table
    assert "candidate's top errors: 21211 x2" in table
    assert "formatting differs: 0 in encoding, 0 in segment count (no provider rewrites the text)" in table
    assert json.loads(report(shadowed, "--channel", "email", "--json").stdout)["pairs"] == []

