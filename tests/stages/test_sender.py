"""The sender stage on the real stack against the provider simulator; the simulator's ledger is the ground truth.

One simulator and one `notify worker --all --stages sender` (both lanes) serve the module, on topics of its own.
Each test resets the simulator's faults and the breakers, seeds its own rows and waits for its own ids.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from psycopg.types.json import Jsonb
from support.harness import start_pipeline
from support.loop_rig import SenderRig

from pipeline.bench.rig import Workers, free_port_block
from pipeline.bench.sender_rig import SimulatorProcess, make_task, produce
from pipeline.config import Settings
from pipeline.kafka import clients, topics
from pipeline.policy.providers import BreakerPolicy
from pipeline.state import db
from pipeline.state.breaker import BreakerBoard

PROVIDERS = ("twilio", "termii", "sendgrid", "mailgun")
BREAKER = {"NOTIFY_BREAKER_MIN_CALLS": "10", "NOTIFY_BREAKER_WINDOW_S": "10", "NOTIFY_BREAKER_OPEN_S": "2",
           "NOTIFY_BREAKER_FAILURE_RATE": "0.5"}


class Rig(SenderRig):
    def attempts(self, ids: list[str]) -> list[tuple[str, int, str, str]]:
        with db.connect(self.settings) as conn:
            rows = conn.execute(
                "SELECT notification_id::text, attempt_no, provider, outcome FROM notification_attempts "
                "WHERE notification_id = ANY(%s) ORDER BY attempt_id", (ids,)).fetchall()
        return [(str(a), int(b), str(c), str(d)) for a, b, c, d in rows]

    def rows(self, ids: list[str]) -> dict[str, tuple[Any, ...]]:
        with db.connect(self.settings) as conn:
            rows = conn.execute(
                "SELECT notification_id::text, state, provider, provider_message_id, attempt_count, "
                "last_error_code FROM deliveries WHERE notification_id = ANY(%s)", (ids,)).fetchall()
        return {r[0]: r[1:] for r in rows}

    def ledger_of(self, ids: list[str]) -> list[dict[str, Any]]:
        mine = set(ids)
        return [e for e in self.sim.ledger() if e["notification_id"] in mine]

    def breaker(self, provider: str) -> str:
        """The stored breaker state, read without taking the half-open probe from the workers."""
        async def read() -> str:
            board = self.board()
            try:
                return await board.stored(provider)
            finally:
                await board.aclose()
        return asyncio.run(read())

    def board(self) -> BreakerBoard:
        return BreakerBoard.from_url(self.settings.redis_dsn, BreakerPolicy(
            failure_rate=0.5, min_calls=10, window_s=10, open_s=2.0), prefix=self.settings.topic_prefix)

    def reset(self) -> None:
        self.sim.reset()

        async def close_breakers() -> None:
            board = self.board()
            try:
                await board.reset([*PROVIDERS, "fcm", "apns"])
            finally:
                await board.aclose()
        asyncio.run(close_breakers())


@pytest.fixture(scope="module")
def rig(settings: Settings) -> Iterator[Rig]:
    prefix = f"tsend{uuid.uuid4().hex[:8]}."
    mine = dataclasses.replace(settings, topic_prefix=prefix, metrics_port=free_port_block())
    topics.apply(mine)
    sim = SimulatorProcess.start(mine, mine.stack_dir / f"test-sender-sim-{prefix.strip('.')}.log",
                                 {"NOTIFY_SIMULATOR_DELIVERY_DELAY_MS": "100"})
    workers = Workers.start(mine, stages=("sender",), env={
        **sim.env, **BREAKER, "NOTIFY_PROVIDER_TIMEOUT_S": "1.5", "NOTIFY_PROVIDER_MAX_CONCURRENCY": "128",
        "NOTIFY_SHADOW": "email=mailgun:1", "NOTIFY_LOG_LEVEL": "INFO"})
    made = Rig(mine, sim, workers)
    try:
        # both lanes' groups joined and their connectors warm
        warm = made.run([make_task() for _ in range(3)] + [make_task(notification_type="marketing", ttl=None)])
        made.wait(warm, timeout_s=120)
        yield made
    finally:
        workers.stop()
        sim.stop()
        clients.delete_prefixed(mine, groups=True)


@pytest.fixture
def fresh(rig: Rig) -> Rig:
    rig.reset()
    return rig


def test_ten_thousand_sms_with_a_tenth_of_twilio_failing_are_each_delivered_exactly_once(fresh: Rig) -> None:
    fresh.sim.configure("twilio", error_rates={"5xx": 0.1})
    ids = fresh.run([make_task(notification_type="transaction") for _ in range(10_000)])
    rows = fresh.wait(ids, timeout_s=300)
    assert collections.Counter(rows.values()) == {"accepted": 10_000}

    ledger = fresh.ledger_of(ids)
    per_id = collections.Counter(e["notification_id"] for e in ledger)
    assert len(per_id) == 10_000 and set(per_id.values()) == {1}  # everyone got exactly one SMS
    attempts = fresh.attempts(ids)
    failed_on_twilio = {nid for nid, _, provider, outcome in attempts if (provider, outcome) == ("twilio", "transient")}
    by_termii = {e["notification_id"] for e in ledger if e["provider"] == "termii"}
    assert by_termii == failed_on_twilio  # each Twilio failure fell over to Termii within the same attempt
    assert 600 <= len(failed_on_twilio) <= 1400  # ~10%, and the breaker (50%) stayed closed
    assert {no for _, no, _, _ in attempts} == {1}  # no retries were needed
    assert fresh.sim.stats()["twilio"].get("500", 0) == len(failed_on_twilio)

    # A replay of every task sends nothing more: every row is claimed already.
    produce(fresh.settings, [make_task(notification_type="transaction", notification_id=nid) for nid in ids])
    time.sleep(5)
    assert wait_committed(fresh.settings, "critical")
    assert len(fresh.ledger_of(ids)) == 10_000


def wait_committed(settings: Settings, lane: str, timeout_s: float = 60) -> bool:
    """The lane's sender group has committed everything on its sms topic."""
    topic = settings.topic(topics.send_topic("sms", lane))
    consumer = clients.consumer(settings, f"{settings.topic_prefix}notify-sender-{lane}")
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p) for p in partitions]
        ends = {tp.partition: clients.end_offset(consumer, tp) for tp in tps}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            committed = {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=10)}
            if all(committed[p] >= end for p, end in ends.items()):
                return True
            time.sleep(0.5)
        return False
    finally:
        consumer.close()


def test_with_twilio_down_sms_go_through_termii_and_the_breaker_opens_then_closes(fresh: Rig) -> None:
    fresh.sim.configure("twilio", outage_s=600)
    first = fresh.run([make_task() for _ in range(30)])
    fresh.wait(first)
    calls_while_closed = fresh.sim.stats()["twilio"].get("503", 0)
    assert 10 <= calls_while_closed <= 30  # the breaker opens after at least min_calls failures

    second = fresh.run([make_task() for _ in range(200)])
    fresh.wait(second)
    assert fresh.breaker("twilio") == "open"
    ledger = fresh.ledger_of(first + second)
    assert collections.Counter(e["provider"] for e in ledger) == {"termii": 230}
    # While open, Twilio got at most the half-open probes (one per 2 s), not the 200 sends.
    assert fresh.sim.stats()["twilio"].get("503", 0) - calls_while_closed <= 5

    fresh.sim.configure("twilio", outage_s=0)  # Twilio is back: after the open time, a probe closes the breaker
    deadline = time.monotonic() + 30
    third: list[str] = []
    while time.monotonic() < deadline and fresh.breaker("twilio") != "closed":
        third += fresh.run([make_task()])
        time.sleep(0.5)
    assert fresh.breaker("twilio") == "closed"
    fourth = fresh.run([make_task() for _ in range(20)])
    fresh.wait(third + fourth)
    assert {e["provider"] for e in fresh.ledger_of(fourth)} == {"twilio"}
    assert len(fresh.ledger_of(first + second + third + fourth)) == 250 + len(third)


def test_accept_then_hang_leaves_the_row_unknown_with_exactly_one_message_sent(fresh: Rig) -> None:
    fresh.sim.configure("twilio", accept_then_hang=1.0)
    [nid] = fresh.run([make_task()])
    rows = fresh.wait([nid], done=("unknown",), timeout_s=30)
    assert rows == {nid: "unknown"}
    [entry] = fresh.ledger_of([nid])  # Twilio took it; nothing fell over to Termii, nothing was re-sent
    assert entry["provider"] == "twilio" and entry["hung"] is True
    assert fresh.attempts([nid]) == [(nid, 1, "twilio", "ambiguous")]
    time.sleep(2)
    assert len(fresh.ledger_of([nid])) == 1


def test_a_permanent_error_is_one_attempt_and_no_retry(fresh: Rig) -> None:
    [nid] = fresh.run([make_task(to="+15005550001")])  # Twilio's magic invalid number: 21211
    assert fresh.wait([nid], done=("failed",)) == {nid: "failed"}
    assert fresh.attempts([nid]) == [(nid, 1, "twilio", "permanent")]
    state, provider, _, attempt_count, code = fresh.rows([nid])[nid]
    assert (state, provider, attempt_count, code) == ("failed", "twilio", 1, "21211")
    assert fresh.ledger_of([nid]) == []


def test_transient_everywhere_schedules_a_retry_and_keeps_the_row(fresh: Rig) -> None:
    fresh.sim.configure("twilio", error_rates={"5xx": 1.0})
    fresh.sim.configure("termii", error_rates={"429": 1.0}, retry_after_s=90)
    [nid] = fresh.run([make_task()])
    assert fresh.wait([nid], done=("retry_scheduled",)) == {nid: "retry_scheduled"}
    assert [(p, o) for _, _, p, o in fresh.attempts([nid])] == [("twilio", "transient"), ("termii", "transient")]
    with db.connect(fresh.settings) as conn:
        row = conn.execute("SELECT next_attempt_at - now() FROM deliveries WHERE notification_id = %s",
                           (nid,)).fetchone()
    assert row is not None and 80 <= row[0].total_seconds() <= 90  # Termii's Retry-After beats the 30 s default


def test_email_goes_through_sendgrid_and_is_shadowed_to_mailgun_in_test_mode(fresh: Rig) -> None:
    ids = fresh.run([make_task(notification_type="portfolio", channel="email", ttl=None) for _ in range(5)])
    fresh.wait(ids)
    assert collections.Counter(e["provider"] for e in fresh.ledger_of(ids)) == {"sendgrid": 5}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        shadowed = {e["notification_id"] for e in fresh.sim.call("GET", "/_admin/test-sends?provider=mailgun")
                    ["entries"]}
        if set(ids) <= shadowed:
            break
        time.sleep(0.2)
    assert set(ids) <= shadowed  # the candidate saw the same traffic, and no user got a second email


def test_a_templated_email_carries_its_html_part_escaped_and_its_text_part_as_written(fresh: Rig) -> None:
    params = {"amount": "5,000.00", "currency": "NGN", "account": "****1234", "merchant": "<b>Tom & Jerry</b>"}
    [nid] = fresh.run([make_task(notification_type="transaction", channel="email", content=None,
                                 template_id="transaction.debit", template_params=params)])
    fresh.wait([nid])
    [sent] = fresh.ledger_of([nid])
    assert sent["provider"] == "sendgrid" and sent["subject"] == "Debit alert"
    assert sent["body"] == "Debit of 5,000.00 NGN on account ****1234 at <b>Tom & Jerry</b>."
    assert sent["html"] == ("<p>Debit of <strong>5,000.00 NGN</strong> on account ****1234 at "
                            "&lt;b&gt;Tom &amp; Jerry&lt;/b&gt;.</p>")
    deadline = time.monotonic() + 10  # the shadow copy went to Mailgun as a form with the same two parts
    shadow: list[dict[str, Any]] = []
    while not shadow and time.monotonic() < deadline:
        shadow = [e for e in fresh.sim.call("GET", "/_admin/test-sends?provider=mailgun")["entries"]
                  if e["notification_id"] == nid]
        time.sleep(0.2)
    assert [(e["body"], e["html"]) for e in shadow] == [(sent["body"], sent["html"])]


def test_expired_and_unrenderable_tasks_reach_a_final_state_without_a_send(fresh: Rig) -> None:
    stale = make_task(ttl=-datetime.timedelta(seconds=1))
    broken = make_task(content=None, template_id="no.such.template")
    ids = fresh.run([stale, broken])
    rows = fresh.wait(ids, done=("expired", "failed"))
    assert rows == {stale["notification_id"]: "expired", broken["notification_id"]: "failed"}
    assert fresh.rows([broken["notification_id"]])[broken["notification_id"]][4] == "unknown_template"
    assert fresh.ledger_of(ids) == [] and fresh.attempts(ids) == []


def test_a_sender_killed_mid_batch_sends_nothing_twice_and_loses_nothing(fresh: Rig) -> None:
    # Slow enough that a batch is still out when the kill lands: at 150 ms a whole batch could be answered and
    # recorded between two looks at the ledger, and the kill then found nothing claimed (seen once in CI).
    fresh.sim.configure("twilio", latency_ms=600, jitter_ms=200)
    ids = fresh.run([make_task() for _ in range(2000)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(fresh.ledger_of(ids)) < 300:
        time.sleep(0.1)
    victims = [pid for pid in fresh.workers.pids() if b"critical" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert victims, "no critical sender process found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)  # mid-batch: sends in flight, offsets uncommitted; the supervisor restarts it
    # Done when the restarted worker has committed the whole topic (rows it is still sending count as not done).
    assert wait_committed(fresh.settings, "critical", timeout_s=180)
    rows = fresh.wait(ids, done=("accepted", "sending"), timeout_s=10)
    ledger = collections.Counter(e["notification_id"] for e in fresh.ledger_of(ids))
    assert set(ledger.values()) == {1}  # nobody got a message twice, though the batch was redelivered
    accepted = {nid for nid, state in rows.items() if state == "accepted"}
    stuck = {nid for nid, state in rows.items() if state == "sending"}
    assert accepted <= set(ledger)  # every accepted row is a message the provider has
    # The rows the dead worker had claimed stay `sending` under its lease (reconciliation resolves them against the
    # provider); all others went through. None is lost: each is accepted or visibly claimed.
    assert len(accepted) + len(stuck) == 2000 and 0 < len(stuck) <= 500
    assert set(ledger) - accepted <= stuck


def test_a_request_goes_through_every_stage_to_the_providers_once(rig: Rig, settings: Settings) -> None:
    """The whole pipeline (intake, preferences, routing, sender), with the module's simulator as the providers."""
    rig.reset()
    pipeline = start_pipeline(settings, f"tfull{uuid.uuid4().hex[:8]}.", env={**rig.sim.env, **BREAKER},
                              stages=("intake", "preferences", "routing", "sender"))
    with contextlib.closing(pipeline):  # start_pipeline is a generator; closing it stops and deletes everything
        p = next(pipeline)
        request = p.request(f"u-{uuid.uuid4().hex[:8]}", "transaction", channels=["sms", "email"])
        p.produce(request, request)  # the upstream resent it: still one message per channel
        nid = request["notification_id"]
        p.wait_for(lambda: p.statuses(nid).count("accepted") == 2, 90, "both channels accepted")
        assert sorted(state for _, state, _ in p.deliveries(nid)) == ["accepted", "accepted"]
        assert sorted(e["provider"] for e in rig.ledger_of([nid])) == ["sendgrid", "twilio"]
        statuses = p.statuses(nid)
        assert statuses.count("sending") == 2 and statuses.count("duplicate") == 1


def test_push_goes_to_each_device_through_the_provider_its_token_names_with_the_collapse_id(fresh: Rig) -> None:
    android, iphone = "dXk3:APA91bH-device-one", "ab" * 32
    both = make_task(notification_type="security", channel="push", to=None,
                     device_tokens=[{"platform": "android", "token": android}, {"platform": "ios", "token": iphone}])
    gone = make_task(notification_type="security", channel="push", to=None,
                     device_tokens=[{"platform": "android", "token": "unregistered-device"}])
    ids = fresh.run([both, gone])
    rows = fresh.wait(ids, done=("accepted", "failed"))
    assert rows == {both["notification_id"]: "accepted", gone["notification_id"]: "failed"}
    sent = fresh.ledger_of(ids)
    assert sorted((e["provider"], e["to"]) for e in sent) == [("apns", iphone), ("fcm", android)]
    assert {e["collapse_id"] for e in sent} == {both["notification_id"]}
    assert [(p, o) for _, _, p, o in fresh.attempts([gone["notification_id"]])] == [("fcm", "permanent")]


def test_the_cli_programs_the_simulator(fresh: Rig) -> None:
    def notify(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "pipeline", "simulator", *args, "--port", str(fresh.sim.port)],
                              capture_output=True, text=True, timeout=60, env={**os.environ, **fresh.sim.env})
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    notify("set", "termii", "latency_ms=5", 'error_rates={"5xx": 0.25}', "outage_s=0")
    shown = json.loads(notify("show", "providers"))
    assert shown["termii"]["latency_ms"] == 5 and shown["termii"]["error_rates"] == {"5xx": 0.25}
    bad = subprocess.run([sys.executable, "-m", "pipeline", "simulator", "set", "termii", "latency_ms=-1",
                          "--port", str(fresh.sim.port)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "latency_ms must be a number >= 0" in bad.stdout
    notify("reset")
    assert json.loads(notify("show", "providers"))["termii"]["error_rates"] == {}


def test_a_marketing_send_whose_consent_was_withdrawn_while_it_waited_is_suppressed_and_never_sent(
        fresh: Rig) -> None:
    withdrew, lapsed, consents, unstored = (f"mk-{uuid.uuid4().hex[:10]}" for _ in range(4))
    stored = {withdrew: {"marketing": {"opted_in_channels": ["email"], "opted_out_channels": ["email"]}},
              lapsed: {"price_alert": {"opted_in_channels": ["sms"], "opted_out_channels": []}},
              consents: {"marketing": {"opted_in_channels": ["email"], "opted_out_channels": []}}}
    with db.connect(fresh.settings) as conn, conn.transaction():
        for user, categories in stored.items():  # what the settings API wrote after preferences routed the sends
            conn.execute("INSERT INTO user_notification_settings (user_id, category_settings) VALUES (%s, %s)",
                         (user, Jsonb(categories)))
    try:
        marketing = {user: make_task(notification_type="marketing", channel="email", user_id=user, ttl=None)
                     for user in (withdrew, lapsed, consents, unstored)}
        portfolio = make_task(notification_type="portfolio", channel="email", user_id=lapsed, ttl=None)
        ids = fresh.run([*marketing.values(), portfolio])
        seen = fresh.wait(ids, done=("accepted", "suppressed"))
        rows = fresh.rows(ids)
        assert {user: (rows[t["notification_id"]][0], rows[t["notification_id"]][4])
                for user, t in marketing.items()} == {
            withdrew: ("suppressed", "opted_out"), lapsed: ("suppressed", "no_consent"),
            consents: ("accepted", None), unstored: ("accepted", None)}  # no stored row: preferences' decision
        assert seen[portfolio["notification_id"]] == "accepted"  # a type that needs no consent
        sent = collections.Counter(e["notification_id"] for e in fresh.ledger_of(ids))
        assert sent == {marketing[consents]["notification_id"]: 1, marketing[unstored]["notification_id"]: 1,
                        portfolio["notification_id"]: 1}
    finally:
        with db.connect(fresh.settings) as conn, conn.transaction():
            conn.execute("DELETE FROM user_notification_settings WHERE user_id = ANY(%s)", (list(stored),))


def test_an_otp_skips_a_provider_other_workers_found_too_slow_for_its_deadline(fresh: Rig) -> None:
    async def shared_latency(samples: list[float] | None) -> None:
        board = fresh.board()
        try:
            if samples is None:
                await board.client.delete(f"{fresh.settings.topic_prefix}notify:latency:twilio")
            else:  # what other workers' calls to Twilio recorded: 4 s each
                await board.record({}, {"twilio": samples})
        finally:
            await board.aclose()

    asyncio.run(shared_latency([4.0] * 50))
    try:
        # 3 s to live: Twilio's shared p95 (4 s) cannot make it, Termii (no figure: fast enough) can
        [hurried] = fresh.run([make_task(ttl=datetime.timedelta(seconds=3))])
        [patient] = fresh.run([make_task(ttl=datetime.timedelta(minutes=10))])
        assert fresh.wait([hurried, patient]) == {hurried: "accepted", patient: "accepted"}
        assert [e["provider"] for e in fresh.ledger_of([hurried])] == ["termii"]
        assert [e["provider"] for e in fresh.ledger_of([patient])] == ["twilio"]  # 10 min: Twilio is fine
    finally:
        asyncio.run(shared_latency(None))


def test_a_newer_price_alert_of_the_same_asset_supersedes_an_unsent_older_one_and_never_recalls_a_sent_one(
        fresh: Rig) -> None:
    user_id, now = f"pa-{uuid.uuid4().hex[:10]}", datetime.datetime.now(datetime.UTC)

    def alert(key: str | None, age_s: float, kind: str = "price_alert") -> dict[str, Any]:
        task = make_task(notification_type=kind, channel="sms", user_id=user_id, collapse_key=key)
        task["created_at"] = (now - datetime.timedelta(seconds=age_s)).replace(microsecond=0)
        return task

    sent_first = alert("ETH", 60)
    [eth_old] = fresh.run([sent_first])
    assert fresh.wait([eth_old]) == {eth_old: "accepted"}
    # in one batch: two BTC alerts (the older is stale), a newer ETH (the older one is already out), an unkeyed
    # alert, and a security notice that carries a key anyway (a producer writing to Kafka directly)
    btc_old, btc_new, eth_new, plain, security = (alert("BTC", 30), alert("BTC", 10), alert("ETH", 5),
                                                   alert(None, 20), alert("BTC", 40, kind="security"))
    ids = fresh.run([btc_old, btc_new, eth_new, plain, security])
    seen = fresh.wait(ids, done=("accepted", "suppressed"))
    assert [seen[t["notification_id"]] for t in (btc_old, btc_new, eth_new, plain, security)] == [
        "suppressed", "accepted", "accepted", "accepted", "accepted"]
    assert fresh.rows([btc_old["notification_id"]])[btc_old["notification_id"]][4] == "superseded"
    assert fresh.rows([eth_old])[eth_old][0] == "accepted"  # sent before the newer one came: not recalled
    sent = collections.Counter(e["notification_id"] for e in fresh.ledger_of([eth_old, *ids]))
    assert sent == {nid: 1 for nid in [eth_old, *ids] if nid != btc_old["notification_id"]}
