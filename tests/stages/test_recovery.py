"""After the send, on the real stack: receipts, the one fallback, retry tiers, the DLQ and its redrive, expiry,
reconciliation. Simulator + API (webhooks) + `notify worker --all --stages sender,retry,receipts`, tiers of 1, 2
and 3 s. Each test resets the simulator and counts its own ids in the simulator's ledger.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from support.loop_rig import LoopRig, start_loop

from pipeline.bench.sender_rig import make_task, seed
from pipeline.config import Settings
from pipeline.ops import dlq, reconcile
from pipeline.stages import retry
from pipeline.state import db

FAILING = {"error_rates": {"5xx": 1.0}}
HEALTHY = {"error_rates": {}, "outage_s": 0, "undelivered_rate": 0.0, "accept_then_hang": 0.0,
           "lost_receipts": 0.0, "delivery_delay_ms": 200}


def unique_sms() -> dict[str, Any]:
    """An SMS no other test sends (a lookup by reference matches recipient and content)."""
    code = uuid.uuid4().hex[:8]
    return make_task(to=f"+1415{int(code, 16) % 10_000_000:07d}",
                     content={"subject": None, "body": f"Your code is {code}"})


@pytest.fixture(scope="module")
def loop(settings: Settings) -> Iterator[LoopRig]:
    yield from start_loop(settings, "trec")


@pytest.fixture
def rig(loop: LoopRig) -> LoopRig:
    loop.sim.reset()
    for provider in ("twilio", "termii", "sendgrid", "mailgun"):
        loop.sim.configure(provider, **HEALTHY)
    return loop


def test_a_receipt_moves_an_accepted_delivery_to_delivered(rig: LoopRig) -> None:
    sms = rig.run([make_task() for _ in range(5)])
    email = rig.run([make_task(notification_type="portfolio", channel="email", ttl=None) for _ in range(5)])
    rows = rig.wait(sms + email, timeout_s=90)
    assert collections.Counter(rows.values()) == {"delivered": 10}
    assert collections.Counter(e["provider"] for e in rig.ledger_of(sms + email)) == {"twilio": 5, "sendgrid": 5}
    assert rig.statuses(sms[0])[-2:] == ["accepted", "delivered"]


def test_a_failure_receipt_falls_back_to_the_next_provider_once(rig: LoopRig) -> None:
    rig.sim.configure("twilio", undelivered_rate=1.0)
    [saved] = rig.run([make_task(notification_type="transaction")])
    assert rig.wait([saved]) == {saved: "delivered"}
    assert [e["provider"] for e in rig.ledger_of([saved])] == ["twilio", "termii"]
    row = rig.rows([saved])[saved]
    assert (row["provider"], row["fallback_from"]) == ("termii", "twilio")

    rig.sim.configure("termii", undelivered_rate=1.0)  # the fallback fails too: that is final, no third send
    [lost] = rig.run([make_task(notification_type="transaction")])
    assert rig.wait([lost], done=("failed",)) == {lost: "failed"}
    time.sleep(2)
    assert [e["provider"] for e in rig.ledger_of([lost])] == ["twilio", "termii"]
    assert rig.statuses(lost).count("queued") == 1  # one fallback


def test_a_transient_failure_is_retried_from_a_tier_after_its_delay_and_sent_once(rig: LoopRig) -> None:
    rig.sim.configure("twilio", **FAILING)
    rig.sim.configure("termii", **FAILING)
    [nid] = rig.run([make_task()])
    rig.wait([nid], done=("retry_scheduled",))
    rig.sim.configure("twilio", **HEALTHY)
    rig.sim.configure("termii", **HEALTHY)
    assert rig.wait([nid]) == {nid: "delivered"}
    assert [(n, p, o) for _, n, p, o in rig.attempts([nid])] == [
        (1, "twilio", "transient"), (1, "termii", "transient"), (2, "twilio", "accepted")]
    assert len(rig.ledger_of([nid])) == 1
    assert "retry_scheduled" in rig.statuses(nid)


def test_after_the_last_tier_the_delivery_is_dead_lettered_and_a_redrive_delivers_it_once(rig: LoopRig) -> None:
    rig.sim.configure("twilio", **FAILING)
    rig.sim.configure("termii", **FAILING)
    [nid] = rig.run([make_task()])
    assert rig.wait([nid], done=("dead_lettered",), timeout_s=60) == {nid: "dead_lettered"}
    assert [n for _, n, _, _ in rig.attempts([nid])] == [1, 1, 2, 2, 3, 3, 4, 4]  # three tiers, then the DLQ
    assert rig.statuses(nid).count("retry_scheduled") == 3 and rig.statuses(nid)[-1] == "dead_lettered"
    assert rig.worker_metric("sender", "critical", 'notify_dlq_total{channel="sms",lane="critical",'
                                                   'reason="retries_exhausted"}') >= 1

    [entry] = dlq.select(dlq.read(rig.settings), {"notification_id": nid})
    assert entry.header("notify-reason") == "retries_exhausted"
    assert [(a["attempt"], a["provider"]) for a in entry.attempts] == [
        (n, p) for n in (1, 2, 3, 4) for p in ("twilio", "termii")]
    assert entry.header("notify-source").startswith(rig.settings.topic("send.sms.critical") + "/")
    assert entry.header(retry.HEADER_SEND_TOPIC) == "send.sms.critical"

    rig.sim.configure("twilio", **HEALTHY)
    rig.sim.configure("termii", **HEALTHY)
    dry = asyncio.run(dlq.redrive(rig.settings, [entry], dry_run=True))
    assert dry.redriven == [entry.position] and rig.rows([nid])[nid]["state"] == "dead_lettered"

    done = asyncio.run(dlq.redrive(rig.settings, [entry]))
    assert done.redriven == [entry.position]
    assert rig.wait([nid]) == {nid: "delivered"}
    again = asyncio.run(dlq.redrive(rig.settings, [entry]))  # redriving twice sends nothing more
    assert again.redriven == [] and again.skipped == [(entry.position, "delivery is delivered")]
    time.sleep(2)
    assert len(rig.ledger_of([nid])) == 1


def test_a_critical_retry_that_would_come_after_expiry_expires_instead(rig: LoopRig) -> None:
    rig.sim.configure("twilio", **FAILING)
    rig.sim.configure("termii", **FAILING)
    # tier 1 (1 s) still fits in 2.5 s; tier 2 (2 s more) would not
    [nid] = rig.run([make_task(ttl=datetime.timedelta(seconds=2.5))])
    assert rig.wait([nid], done=("expired",), timeout_s=30) == {nid: "expired"}
    assert [n for _, n, _, _ in rig.attempts([nid])] == [1, 1, 2, 2]
    assert rig.statuses(nid)[-1] == "expired"
    assert dlq.select(dlq.read(rig.settings), {"notification_id": nid}) == []
    assert rig.ledger_of([nid]) == []


def test_reconciliation_finds_an_accept_then_hang_delivered_and_never_sends_it_again(rig: LoopRig) -> None:
    rig.sim.configure("twilio", accept_then_hang=1.0, lost_receipts=1.0)
    [nid] = rig.run([unique_sms()])
    assert rig.wait([nid], done=("unknown",)) == {nid: "unknown"}
    rig.sim.configure("twilio", **HEALTHY)
    time.sleep(1)  # past the simulated delivery
    summary = rig.reconcile([nid])
    assert summary["resolved"] == {"unknown:delivered": 1}
    row = rig.rows([nid])[nid]
    assert (row["state"], row["provider"]) == ("delivered", "twilio")
    assert row["provider_message_id"] == rig.ledger_of([nid])[0]["provider_message_id"]
    time.sleep(2)
    assert len(rig.ledger_of([nid])) == 1 and rig.statuses(nid)[-1] == "delivered"


def test_reconciliation_resolves_each_stuck_state_against_the_providers(rig: LoopRig) -> None:
    # accepted, receipt lost: the status API says delivered
    rig.sim.configure("sendgrid", lost_receipts=1.0)
    [accepted] = rig.run([make_task(notification_type="portfolio", channel="email", ttl=None)])
    rig.wait([accepted], done=("accepted",))
    # a worker died after its claim, before the send left: `sending` under a dead lease, at no provider
    never_sent = unique_sms()
    seed(rig.settings, [never_sent])
    with db.connect(rig.settings) as conn, conn.transaction():
        conn.execute("UPDATE deliveries SET state = 'sending', attempt_count = 1, lease_owner = 'dead:1', "
                     "claimed_at = now() - interval '1 minute', lease_expires_at = now() - interval '1 second' "
                     "WHERE notification_id = %s", (never_sent["notification_id"],))
    time.sleep(1)
    summary = rig.reconcile([accepted, never_sent["notification_id"]])
    assert summary["resolved"] == {"accepted:delivered": 1, "sending:resend": 1}
    assert rig.rows([accepted])[accepted]["state"] == "delivered"
    # "never arrived" is re-sent through the send topic, where the claim holds: exactly one message
    assert rig.wait([never_sent["notification_id"]]) == {never_sent["notification_id"]: "delivered"}
    assert len(rig.ledger_of([never_sent["notification_id"], accepted])) == 2


def test_a_round_pages_through_more_stuck_rows_than_one_page_holds(
        rig: LoopRig, monkeypatch: pytest.MonkeyPatch) -> None:
    rig.sim.configure("sendgrid", lost_receipts=1.0)
    ids = rig.run([make_task(notification_type="portfolio", channel="email", ttl=None) for _ in range(12)])
    assert set(rig.wait(ids, done=("accepted",)).values()) == {"accepted"}
    time.sleep(0.5)  # past the simulated delivery
    monkeypatch.setattr(reconcile, "SWEEP_PAGE", 5)  # 12 rows: pages of 5, 5 and 2 in one round
    assert rig.reconcile(ids)["resolved"] == {"accepted:delivered": 12}
    assert set(rig.rows(ids)[nid]["state"] for nid in ids) == {"delivered"}
    assert len(rig.ledger_of(ids)) == 12  # asked, never sent again


def test_an_accepted_delivery_its_provider_no_longer_knows_goes_to_the_dlq_and_is_not_re_sent(rig: LoopRig) -> None:
    task = unique_sms()
    seed(rig.settings, [task])
    nid = task["notification_id"]
    with db.connect(rig.settings) as conn, conn.transaction():  # accepted an hour ago under an id Twilio forgot
        conn.execute("UPDATE deliveries SET state = 'accepted', attempt_count = 1, provider = 'twilio', "
                     "provider_message_id = %s, accepted_at = now() - interval '1 hour' WHERE notification_id = %s",
                     (f"SM{uuid.uuid4().hex}", nid))
    summary = rig.reconcile([nid])
    assert summary["resolved"] == {"accepted:dead_letter": 1}
    assert rig.rows([nid])[nid]["state"] == "dead_lettered"
    [entry] = dlq.select(dlq.read(rig.settings), {"notification_id": nid})
    assert entry.header("notify-reason") == "lost_at_provider" and entry.header("notify-source") == "reconcile"
    time.sleep(1)
    assert rig.ledger_of([nid]) == []  # nothing went out on its own
    assert asyncio.run(dlq.redrive(rig.settings, [entry])).redriven == [entry.position]  # an operator's choice
    assert rig.wait([nid]) == {nid: "delivered"}
    assert len(rig.ledger_of([nid])) == 1
