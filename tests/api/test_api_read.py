"""The read API and key scopes on the real database: notifications seeded as routing leaves them, state changes made
with the statements the stages use (recorded by 0011's triggers), read back through the API with keys of each
scope."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from psycopg.types.json import Jsonb
from support.harness import bearer, serving

from pipeline.api.keys import create_key
from pipeline.bench.sender_rig import make_task, seed
from pipeline.config import Settings
from pipeline.state import db


@pytest.fixture
def world(settings: Settings, unique: str) -> Iterator[dict[str, Any]]:
    """Two services' notifications for one user (3 of `billing-<u>`, 1 of `auth-<u>`), keys of every kind."""
    billing, auth_service = f"billing-{unique}", f"auth-{unique}"
    user = f"reader-{unique}"
    base = datetime.datetime(2026, 12, 3, 9, 0, tzinfo=datetime.UTC)
    tasks = [make_task(user_id=user, notification_type="transaction", created_at=base + datetime.timedelta(minutes=i),
                       ttl=None) for i in range(3)]
    otp = make_task(user_id=user, created_at=base + datetime.timedelta(minutes=5), ttl=None,
                    template_id="otp.default", template_params={"code": "987654"})
    seed(settings, [*tasks, otp])
    with db.connect(settings) as conn, conn.transaction():
        conn.execute("UPDATE notifications SET source_service = %s WHERE user_id = %s", (billing, user))
        conn.execute("UPDATE notifications SET source_service = %s WHERE notification_id = %s",
                     (auth_service, otp["notification_id"]))
        first = tasks[0]["notification_id"]
        conn.execute("UPDATE deliveries SET state = 'sending', lease_owner = 'w', lease_expires_at = now(), "
                     "claimed_at = now(), attempt_count = 1 WHERE notification_id = %s", (first,))
        conn.execute("""INSERT INTO notification_attempts (notification_id, channel, attempt_no, provider, outcome,
                        response_status, error_code, error_payload, started_at, finished_at, latency_ms)
                        VALUES (%s, 'sms', 1, 'twilio', 'transient', 503, '20503', %s, now(), now(), 35),
                               (%s, 'sms', 1, 'termii', 'accepted', 200, NULL, NULL, now(), now(), 41)""",
                     (first, Jsonb({"code": 20503, "message": "unavailable"}), first))
        conn.execute("UPDATE deliveries SET state = 'accepted', provider = 'termii', provider_message_id = %s, "
                     "accepted_at = now(), lease_owner = NULL, lease_expires_at = NULL WHERE notification_id = %s",
                     (f"tm-{unique}", first))
        conn.execute("UPDATE deliveries SET state = 'delivered', final_at = now() WHERE notification_id = %s",
                     (first,))
    keys = {name: create_key(settings, service, scopes)[1] for name, service, scopes in [
        ("reader", billing, ["read"]), ("ingest", billing, ["ingest"]), ("admin", f"ops-{unique}", ["admin"]),
        ("other", auth_service, ["ingest", "read"])]}
    yield {"user": user, "tasks": tasks, "otp": otp, "keys": keys, "billing": billing}
    with db.connect(settings) as conn, conn.transaction():
        ids = [t["notification_id"] for t in [*tasks, otp]]
        conn.execute("DELETE FROM notifications WHERE user_id = %s", (user,))
        conn.execute("DELETE FROM delivery_transitions WHERE notification_id = ANY(%s::uuid[])", (ids,))
        conn.execute("DELETE FROM api_keys WHERE service LIKE %s", (f"%-{unique}",))


async def test_a_notification_reads_whole_with_its_attempts_and_recorded_timeline(
        settings: Settings, world: dict[str, Any]) -> None:
    nid = world["tasks"][0]["notification_id"]
    async with serving(settings) as client:
        response = await client.get(f"/v1/notifications/{nid}", headers=bearer(world["keys"]["reader"]))
        assert response.status == 200, await response.text()
        body = await response.json()
    assert (body["notification_id"], body["type"], body["source_service"]) == (nid, "transaction", world["billing"])
    [delivery] = body["deliveries"]
    assert (delivery["state"], delivery["provider"], delivery["attempt_count"]) == ("delivered", "termii", 1)
    assert [(a["provider"], a["outcome"], a["response_status"], a["error_code"], a["error_payload"], a["latency_ms"])
            for a in body["attempts"]] == [
        ("twilio", "transient", 503, "20503", {"code": 20503, "message": "unavailable"}, 35),
        ("termii", "accepted", 200, None, None, 41)]
    states = [(e["from_state"], e["to_state"]) for e in body["timeline"] if e["kind"] == "state"]
    assert states == [(None, "queued"), ("queued", "sending"), ("sending", "accepted"), ("accepted", "delivered")]
    assert body["timeline"][0]["kind"] == "received" and not any(e["derived"] for e in body["timeline"])
    assert body["request"]["recipients"] == {"sms": "+2348031234567"}
    assert body["request"]["content"]["body"] == "Your code is 123456"  # a transaction is not redacted


async def test_an_otps_code_is_redacted_and_another_services_notification_is_404_unless_admin(
        settings: Settings, world: dict[str, Any]) -> None:
    nid = world["otp"]["notification_id"]
    async with serving(settings) as client:
        mine = await client.get(f"/v1/notifications/{nid}", headers=bearer(world["keys"]["other"]))
        theirs = await client.get(f"/v1/notifications/{nid}", headers=bearer(world["keys"]["reader"]))
        admin = await client.get(f"/v1/notifications/{nid}", headers=bearer(world["keys"]["admin"]))
        unknown = await client.get(f"/v1/notifications/{uuid.uuid4()}", headers=bearer(world["keys"]["admin"]))
        bad = await client.get("/v1/notifications/not-a-uuid", headers=bearer(world["keys"]["admin"]))
        body = await mine.json()
        assert (theirs.status, admin.status, unknown.status, bad.status) == (404, 200, 404, 422)
        assert "error" in await theirs.json() and (await bad.json())["details"][0]["field"] == "notification_id"
    assert body["request"]["template_params"] == {"code": "[redacted: an OTP's code is a credential]"}
    assert body["request"]["content"]["body"] == "[redacted: an OTP's code is a credential]"


async def test_a_key_without_the_read_scope_gets_403_naming_it_and_ingest_keys_still_ingest(
        settings: Settings, world: dict[str, Any]) -> None:
    async with serving(settings) as client:
        refused = await client.get("/v1/notifications", headers=bearer(world["keys"]["ingest"]))
        assert refused.status == 403
        assert (await refused.json())["required_scope"] == "read"
        posted = await client.post("/v1/notifications", json={}, headers=bearer(world["keys"]["ingest"]))
        assert posted.status == 422  # past authentication and scopes: the empty body is what is refused
        reader_posts = await client.post("/v1/notifications", json={}, headers=bearer(world["keys"]["reader"]))
        assert reader_posts.status == 403


async def test_pages_are_newest_first_keyset_paged_and_scoped_to_the_keys_service(
        settings: Settings, world: dict[str, Any]) -> None:
    user = world["user"]
    async with serving(settings) as client:
        seen: list[str] = []
        cursor = None
        for _ in range(4):
            query = f"/v1/notifications?user_id={user}&limit=2" + (f"&cursor={cursor}" if cursor else "")
            page = await (await client.get(query, headers=bearer(world["keys"]["reader"]))).json()
            seen += [n["notification_id"] for n in page["notifications"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        everything = await (await client.get(f"/v1/notifications?user_id={user}",
                                              headers=bearer(world["keys"]["admin"]))).json()
        delivered = await (await client.get(f"/v1/notifications?user_id={user}&state=delivered&channel=sms",
                                            headers=bearer(world["keys"]["admin"]))).json()
        typed = await (await client.get(f"/v1/notifications?user_id={user}&type=otp&since=2026-12-03T09:04:00Z"
                                        "&until=2026-12-03T09:06:00Z", headers=bearer(world["keys"]["admin"]))).json()
        bad = await client.get("/v1/notifications?limit=0&colour=red", headers=bearer(world["keys"]["admin"]))
        assert bad.status == 422
        assert {p["field"] for p in (await bad.json())["details"]} == {"limit", "colour"}
    assert seen == [t["notification_id"] for t in reversed(world["tasks"])]  # billing's three, newest first
    assert [n["notification_id"] for n in everything["notifications"]] == [
        world["otp"]["notification_id"], *seen]
    assert everything["next_cursor"] is None
    assert [n["notification_id"] for n in delivered["notifications"]] == [world["tasks"][0]["notification_id"]]
    assert delivered["notifications"][0]["deliveries"][0]["state"] == "delivered"
    assert [n["notification_id"] for n in typed["notifications"]] == [world["otp"]["notification_id"]]


@pytest.mark.parametrize("query", ["user_id=%00", "since=2026-13-01T00:00:00Z", "cursor=" + "A" * 300,
                                   "type=otp&type=otp", "limit=99999999999"])
async def test_hostile_parameters_are_422_with_a_json_error(settings: Settings, world: dict[str, Any],
                                                            query: str) -> None:
    async with serving(settings) as client:
        response = await client.get(f"/v1/notifications?{query}", headers=bearer(world["keys"]["admin"]))
        assert response.status == 422
        assert response.content_type == "application/json" and (await response.json())["error"]


def test_the_read_queries_are_served_by_an_index(settings: Settings) -> None:
    from pipeline.policy.delivery_log import Cursor, ListQuery
    from pipeline.state import delivery_log

    cursor = Cursor(datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC), uuid.uuid4())
    with db.connect(settings) as conn:
        conn.execute("SET enable_seqscan = off")
        for service in (None, "svc"):  # which of the two the planner takes depends on the table's figures
            statement, params = delivery_log.page_statement(ListQuery(cursor=cursor), service)
            plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN {statement}".encode(), params).fetchall())
            assert "Seq Scan" not in plan and ("notifications_created_idx" in plan
                                               or "notifications_source_created_idx" in plan), plan
        statement, params = delivery_log.page_statement(ListQuery(user_id="u", state="failed"), "svc")
        plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN {statement}".encode(), params).fetchall())
        assert "notifications_user_created_idx" in plan or "notifications_source_created_idx" in plan
        plan = "\n".join(r[0] for r in conn.execute(
            ("EXPLAIN " + delivery_log.TRANSITIONS.replace("%s", f"'{uuid.uuid4()}'")).encode()).fetchall())
        assert "delivery_transitions_by_delivery" in plan
