"""The pipeline core end to end on the real stack: requests in, delivery rows, send topics and events out."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterator

import pytest
from support.harness import Pipeline, bearer, read_topic, serving, start_pipeline, topic_records

from pipeline.config import Settings
from pipeline.kafka import serde, topics
from pipeline.ops import quarantine
from pipeline.stages.records import HEADER_REASON
from pipeline.state import db


@pytest.fixture(scope="module")
def pipeline(settings: Settings) -> Iterator[Pipeline]:
    yield from start_pipeline(settings, f"e2e{uuid.uuid4().hex[:8]}.")


def user() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


def test_three_identical_requests_give_one_delivery_row_and_two_duplicate_events(pipeline: Pipeline) -> None:
    who = user()
    first = pipeline.request(who, "transaction", idempotency_key="debit-42")
    resends = [dict(first, notification_id=str(uuid.uuid4())) for _ in range(2)]
    pipeline.produce(first, *resends)
    pipeline.wait_for(lambda: all(pipeline.statuses(r["notification_id"]) == ["duplicate"] for r in resends),
                      what="two duplicate events")
    pipeline.wait_for(lambda: pipeline.statuses(first["notification_id"]) == ["received", "queued"],
                      what="the first to be queued")
    assert pipeline.deliveries(first["notification_id"]) == [("sms", "queued", None)]
    assert all(pipeline.deliveries(r["notification_id"]) == [] for r in resends)


def test_the_same_record_resent_by_upstream_is_a_duplicate_too(pipeline: Pipeline) -> None:
    request = pipeline.request(user(), "otp")
    pipeline.produce(request)
    pipeline.wait_for(lambda: "queued" in pipeline.statuses(request["notification_id"]), what="queued")
    pipeline.produce(request)  # the very same notification id, again
    pipeline.wait_for(lambda: len(pipeline.statuses(request["notification_id"])) >= 3, what="the resend's verdict")
    assert pipeline.statuses(request["notification_id"]) == ["received", "queued", "duplicate"]
    assert pipeline.deliveries(request["notification_id"]) == [("sms", "queued", None)]


def test_an_opted_out_marketing_sms_is_suppressed_while_an_otp_to_the_same_user_goes_through(
        pipeline: Pipeline) -> None:
    who = user()
    before = pipeline.metric("preferences", "bulk", "notify_stage_messages_total", outcome="settings_updated")
    pipeline.put_settings({
        "user_id": who, "version": 1, "updated_at": datetime.datetime.now(datetime.UTC),
        "categories": {"marketing": {"opted_in_channels": [], "opted_out_channels": ["sms"]}},
    })
    pipeline.wait_for(lambda: pipeline.metric("preferences", "bulk", "notify_stage_messages_total",
                                              outcome="settings_updated") > before, what="the settings to arrive")
    marketing = pipeline.request(who, "marketing", template_id="promo.nov")
    otp = pipeline.request(who, "otp")
    pipeline.produce(marketing, otp)
    pipeline.wait_for(lambda: "suppressed" in pipeline.statuses(marketing["notification_id"]), what="suppressed")
    pipeline.wait_for(lambda: "queued" in pipeline.statuses(otp["notification_id"]), what="the OTP queued")
    assert pipeline.deliveries(marketing["notification_id"]) == [("sms", "suppressed", "opted_out")]
    assert pipeline.deliveries(otp["notification_id"]) == [("sms", "queued", None)]


def test_marketing_goes_only_where_the_user_consented_and_nowhere_without_consent(pipeline: Pipeline) -> None:
    consents, stranger = user(), user()
    before = pipeline.metric("preferences", "bulk", "notify_stage_messages_total", outcome="settings_updated")
    pipeline.put_settings({
        "user_id": consents, "version": 1, "updated_at": datetime.datetime.now(datetime.UTC),
        "categories": {"marketing": {"opted_in_channels": ["email"], "opted_out_channels": []}},
    })
    pipeline.wait_for(lambda: pipeline.metric("preferences", "bulk", "notify_stage_messages_total",
                                              outcome="settings_updated") > before, what="the settings to arrive")
    welcome = pipeline.request(consents, "marketing", channels=["sms", "email"], template_id="marketing.default")
    cold = pipeline.request(stranger, "marketing", channels=["sms", "email"], template_id="marketing.default")
    pipeline.produce(welcome, cold)
    pipeline.wait_for(lambda: "queued" in pipeline.statuses(welcome["notification_id"]), what="the consented one")
    pipeline.wait_for(lambda: pipeline.statuses(cold["notification_id"]).count("suppressed") == 2,
                      what="the unconsented one suppressed on both channels")
    assert pipeline.deliveries(welcome["notification_id"]) == [("email", "queued", None),
                                                               ("sms", "suppressed", "no_consent")]
    assert pipeline.deliveries(cold["notification_id"]) == [("email", "suppressed", "no_consent"),
                                                            ("sms", "suppressed", "no_consent")]


def test_a_collapse_key_is_stored_with_the_notification_and_carried_on_its_task_to_the_sender(
        pipeline: Pipeline) -> None:
    alert = pipeline.request(user(), "price_alert", channels=["email"], collapse_key="BTC")
    pipeline.produce(alert)
    nid = alert["notification_id"]
    pipeline.wait_for(lambda: "queued" in pipeline.statuses(nid), what="the alert queued")
    with db.connect(pipeline.settings) as conn:
        stored = conn.execute("SELECT collapse_key FROM notifications WHERE notification_id = %s", (nid,)).fetchone()
    assert stored == ("BTC",)
    codec = serde.AvroSerde()
    tasks = [codec.decode(r.value(), expected=serde.DELIVERY_TASK).value
             for r in topic_records(pipeline.settings, topics.send_topic("email", "bulk"))]
    assert [t["collapse_key"] for t in tasks if str(t["notification_id"]) == nid] == ["BTC"]


def test_the_fourth_non_critical_sms_within_the_hour_is_rate_limited(pipeline: Pipeline) -> None:
    who = user()
    alerts = [pipeline.request(who, "price_alert") for _ in range(4)]
    for alert in alerts:  # one at a time: which one is fourth must be certain
        pipeline.produce(alert)
        alert_id = alert["notification_id"]
        pipeline.wait_for(lambda: len(pipeline.statuses(alert_id)) >= 2, what="a decision")  # noqa: B023
    assert [pipeline.statuses(a["notification_id"])[-1] for a in alerts] == ["queued"] * 3 + ["rate_limited"]
    assert pipeline.deliveries(alerts[3]["notification_id"]) == [("sms", "suppressed", "rate_limited")]
    limited = pipeline.events_for(alerts[3]["notification_id"])[-1]
    assert limited["error_code"] == "bulk_sms_per_hour"


def test_an_expired_otp_never_reaches_a_send_topic(pipeline: Pipeline) -> None:
    now = datetime.datetime.now(datetime.UTC)
    stale = pipeline.request(user(), "otp", created_at=now - datetime.timedelta(minutes=10),
                             expires_at=now - datetime.timedelta(minutes=5))
    pipeline.produce(stale)
    pipeline.wait_for(lambda: pipeline.statuses(stale["notification_id"]) == ["expired"], what="expired")
    assert pipeline.deliveries(stale["notification_id"]) == []
    sent = [pipeline.codec.decode(m.value(), expected=serde.DELIVERY_TASK).value
            for m in read_topic(pipeline.settings, topics.send_topic("sms", "critical"), 3)]
    assert sent, "other OTPs were sent, so the topic is readable"
    assert all(str(task["notification_id"]) != stale["notification_id"] for task in sent)


def test_garbage_lands_in_quarantine_and_the_next_message_is_processed(pipeline: Pipeline) -> None:
    garbage = b"\xc3\x01" + uuid.uuid4().bytes[:8] + b"not a record"
    after = pipeline.request(user(), "security", channels=["email"])
    pipeline.produce(raw=garbage)
    pipeline.produce(after)
    pipeline.wait_for(lambda: "queued" in pipeline.statuses(after["notification_id"]), what="the next message")
    quarantined = [m for m in read_topic(pipeline.settings, topics.INVALID, 3) if m.value() == garbage]
    assert len(quarantined) == 1
    assert dict(quarantined[0].headers())[HEADER_REASON] == b"unknown_fingerprint"
    assert pipeline.deliveries(after["notification_id"]) == [("email", "queued", None)]


def test_a_batch_with_a_nul_and_a_reused_notification_id_among_good_requests_refuses_only_those_two(
        pipeline: Pipeline) -> None:
    good = [pipeline.request(user(), "otp") for _ in range(6)]
    nul = pipeline.request(user(), "otp", source_service="core\x00banking")
    reused = pipeline.request(user(), "otp", notification_id=good[0]["notification_id"])  # the id, another key
    pipeline.produce(good[0])
    pipeline.wait_for(lambda: "queued" in pipeline.statuses(good[0]["notification_id"]), what="the first")
    pipeline.produce(*good[1:3], nul, reused, *good[3:])  # one producer flush: they reach intake as one batch
    pipeline.wait_for(lambda: all("queued" in pipeline.statuses(r["notification_id"]) for r in good),
                      what="every good request queued")
    pipeline.wait_for(lambda: "invalid" in pipeline.statuses(nul["notification_id"]), what="the NUL refused")
    (event,) = [e for e in pipeline.events_for(nul["notification_id"]) if e["status"] == "invalid"]
    assert event["error_message"] == "source_service contains a NUL character"
    pipeline.wait_for(lambda: any(e["status"] == "invalid" and e["user_id"] == reused["user_id"]
                                  for e in pipeline.events_for(good[0]["notification_id"])), what="the reuse refused")
    reused_events = [e for e in pipeline.events_for(good[0]["notification_id"]) if e["user_id"] == reused["user_id"]]
    assert [e["status"] for e in reused_events] == ["invalid"]
    assert "notification_id_reused" in (reused_events[0]["error_message"] or "")
    quarantined = {m.value(): dict(m.headers()) for m in read_topic(pipeline.settings, topics.INVALID, 3)}
    mine = [headers for value, headers in quarantined.items()
            if value is not None and (nul["user_id"].encode() in value or reused["user_id"].encode() in value)]
    assert len(mine) == 2 and all(h[HEADER_REASON] == b"invalid" for h in mine)
    assert [pipeline.deliveries(r["notification_id"]) for r in good] == [[("sms", "queued", None)]] * 6
    assert pipeline.deliveries(nul["notification_id"]) == []


def test_quiet_hours_defer_a_price_alert_until_the_window_ends_while_an_otp_goes_through(
        pipeline: Pipeline) -> None:
    who = user()
    now = datetime.datetime.now(datetime.UTC)
    end = (now + datetime.timedelta(seconds=75 if now.second > 45 else 60)).replace(second=0, microsecond=0)
    start = now - datetime.timedelta(minutes=5)
    before = pipeline.metric("preferences", "bulk", "notify_stage_messages_total", outcome="settings_updated")
    pipeline.put_settings({
        "user_id": who, "version": 1, "updated_at": now, "timezone": "UTC",
        "quiet_hours": {"start": start.strftime("%H:%M"), "end": end.strftime("%H:%M")},
    })
    pipeline.wait_for(lambda: pipeline.metric("preferences", "bulk", "notify_stage_messages_total",
                                              outcome="settings_updated") > before, what="the settings to arrive")
    alert = pipeline.request(who, "price_alert")
    otp = pipeline.request(who, "otp")
    pipeline.produce(alert, otp)
    pipeline.wait_for(lambda: "deferred" in pipeline.statuses(alert["notification_id"]), what="deferred")
    pipeline.wait_for(lambda: "queued" in pipeline.statuses(otp["notification_id"]), what="the OTP queued")
    assert pipeline.deliveries(alert["notification_id"]) == []
    pipeline.wait_for(lambda: "queued" in pipeline.statuses(alert["notification_id"]), timeout_s=100,
                      what="the release at the end of the window")
    queued_at = pipeline.events_for(alert["notification_id"])[-1]["occurred_at"]
    assert queued_at >= end, "never released before the window ends"
    assert queued_at - end < datetime.timedelta(seconds=5), "released on time"
    assert pipeline.deliveries(alert["notification_id"]) == [("sms", "queued", None)]


# --- through the ingest and settings APIs ----------------------------------------------------------------------


async def test_through_the_apis_an_opt_out_suppresses_marketing_and_identical_posts_give_one_row(
        pipeline: Pipeline, api_key: str) -> None:
    who = user()
    before = pipeline.metric("preferences", "bulk", "notify_stage_messages_total", outcome="settings_updated")
    async with serving(pipeline.settings) as client:
        put = await client.put(f"/v1/users/{who}/settings", headers=bearer(api_key), json={
            "categories": {"marketing": {"opted_out_channels": ["sms"]}},
            "contacts": {"phone": "+2348012345678", "email": "ada@example.com"}})
        assert put.status == 200, await put.text()
        pipeline.wait_for(lambda: pipeline.metric("preferences", "bulk", "notify_stage_messages_total",
                                                  outcome="settings_updated") > before, what="the settings")
        marketing = {"idempotency_key": "promo-1", "user_id": who, "type": "marketing", "channels": ["sms"],
                     "template_id": "marketing.default"}
        debit = {"idempotency_key": "debit-9", "user_id": who, "type": "transaction", "channels": ["sms", "email"],
                 "template_id": "transaction.debit", "template_params": {
                     "amount": "5,000", "currency": "NGN", "account": "**** 1234", "merchant": "Shoprite"}}
        ids = []
        for body in (marketing, debit, debit, debit):
            response = await client.post("/v1/notifications", json=body, headers=bearer(api_key))
            assert response.status == 202, await response.text()
            ids.append((await response.json())["notification_id"])
    marketing_id, debit_id, *resend_ids = ids
    pipeline.wait_for(lambda: "suppressed" in pipeline.statuses(marketing_id), what="the marketing suppressed")
    pipeline.wait_for(lambda: pipeline.statuses(debit_id).count("queued") == 2, what="the debit alert queued")
    pipeline.wait_for(lambda: all(pipeline.statuses(i) == ["duplicate"] for i in resend_ids), what="duplicates")
    assert pipeline.deliveries(marketing_id) == [("sms", "suppressed", "opted_out")]
    assert pipeline.deliveries(debit_id) == [("email", "queued", None), ("sms", "queued", None)]


@pytest.fixture(scope="module")
def redisless(settings: Settings) -> Iterator[Pipeline]:
    """A pipeline whose Redis is down (nothing listens where it points)."""
    yield from start_pipeline(settings, f"noredis{uuid.uuid4().hex[:8]}.", env={"REDIS_URL": "redis://127.0.0.1:1/0"})


def test_when_redis_is_down_otps_keep_flowing_and_bulk_is_held_durably(redisless: Pipeline) -> None:
    who = user()
    otp = redisless.request(who, "otp")
    alert = redisless.request(who, "price_alert")
    redisless.produce(otp, alert)
    redisless.wait_for(lambda: "queued" in redisless.statuses(otp["notification_id"]), what="the OTP queued")
    redisless.wait_for(lambda: "deferred" in redisless.statuses(alert["notification_id"]), what="the alert held")
    assert redisless.deliveries(otp["notification_id"]) == [("sms", "queued", None)]
    assert redisless.deliveries(alert["notification_id"]) == []
    assert redisless.events_for(alert["notification_id"])[-1]["error_code"] == "rate_limiter_unavailable"
    assert redisless.metric("routing", "critical", "notify_ratelimit_degraded_total") >= 1
    with db.connect(redisless.settings) as conn:
        held = conn.execute("SELECT reason, due_at > now() FROM held_messages WHERE notification_id = %s",
                            (alert["notification_id"],)).fetchall()
    assert held == [("rate_limiter_unavailable", True)]


def test_a_quarantined_request_redriven_after_the_fix_is_queued_once_and_a_second_redrive_puts_back_nothing(
        pipeline: Pipeline) -> None:
    holder = pipeline.request(user(), "otp")
    pipeline.produce(holder)
    pipeline.wait_for(lambda: "queued" in pipeline.statuses(holder["notification_id"]), what="the holder queued")
    reused = pipeline.request(user(), "otp", notification_id=holder["notification_id"])  # the id, another request
    since = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
    trace = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    upstream: dict[str, str | bytes | None] = {"traceparent": trace}  # upstream's own headers
    pipeline.produce(reused, headers=upstream)
    key = {"key": reused["user_id"]}

    def mine() -> list[quarantine.Entry]:
        return quarantine.select(quarantine.read(pipeline.settings), key, since=since)

    pipeline.wait_for(lambda: len(mine()) == 1, what="the reused id quarantined")
    (entry,) = mine()
    assert entry.fields == {"reason": "invalid", "stage": "intake", "key": reused["user_id"],
                            "source_topic": pipeline.settings.topic("requests.critical")}
    shown = entry.details(serde.serde(pipeline.settings))
    assert shown["payload"]["record"] == "NotificationRequest"
    assert shown["payload"]["value"]["user_id"] == reused["user_id"]
    assert quarantine.select([entry], {"reason": "stage_error"}) == []
    assert quarantine.select([entry], {}, until=since) == []
    # Redriving before the fix would only quarantine it again; the fix: the holder was a mistake and is removed.
    with db.connect(pipeline.settings) as conn, conn.transaction():
        conn.execute("DELETE FROM notifications WHERE notification_id = %s", (holder["notification_id"],))
    assert quarantine.redrive(pipeline.settings, [entry], dry_run=True).redriven == [entry.position]
    first = quarantine.redrive(pipeline.settings, [entry])
    again = quarantine.redrive(pipeline.settings, [entry])
    assert (first.redriven, first.skipped) == ([entry.position], [])
    assert (again.redriven, again.skipped) == ([], [(entry.position, "redriven already")])
    pipeline.wait_for(lambda: pipeline.deliveries(reused["notification_id"]) == [("sms", "queued", None)],
                      what="the redriven request queued")
    with db.connect(pipeline.settings) as conn:
        row = conn.execute("SELECT user_id FROM notifications WHERE notification_id = %s",
                           (reused["notification_id"],)).fetchone()
    assert row == (reused["user_id"],)
    redriven = [m for m in read_topic(pipeline.settings, "requests.critical", 3)
                if m.key() == reused["user_id"].encode()]
    assert len(redriven) == 2  # the original and the one redrive
    back = dict(redriven[1].headers() or [])
    assert back[quarantine.HEADER_REDRIVEN].endswith(entry.identity.encode())
    # upstream's headers went through quarantine and back; the quarantine's own did not go back
    assert entry.record.headers["traceparent"] == upstream["traceparent"]
    assert set(back) == {"traceparent", quarantine.HEADER_REDRIVEN} and back["traceparent"] == upstream["traceparent"]
    assert len(mine()) == 1  # not quarantined again
