"""The settings API on the real stack: PostgreSQL and the user-settings topic never diverge (transactional outbox)."""

from __future__ import annotations

import uuid
from typing import Any

from support.harness import bearer, read_topic, serving

from pipeline.api.user_settings import SettingsOutbox
from pipeline.config import Settings
from pipeline.kafka import serde, topics
from pipeline.kafka.clients import producer
from pipeline.state import db

OPT_OUT: dict[str, Any] = {
    "timezone": "Africa/Lagos",
    "categories": {"marketing": {"opted_out_channels": ["sms"]}, "portfolio": {"digest": "hourly"}},
    "quiet_hours": {"start": "22:00", "end": "07:00"},
    "digest": "daily",
    "contacts": {"phone": "+2348012345678"},
}


def published(settings: Settings, user_id: str) -> list[dict[str, Any]]:
    codec = serde.AvroSerde()
    return [codec.decode(m.value(), expected=serde.USER_SETTINGS).value
            for m in read_topic(settings, topics.USER_SETTINGS, 3) if m.key() == user_id.encode()]


def outbox_rows(settings: Settings, user_id: str) -> list[tuple[int, bool]]:
    with db.connect(settings) as conn:
        rows = conn.execute("SELECT version, published_at IS NOT NULL FROM settings_outbox WHERE user_id = %s "
                            "ORDER BY id", (user_id,)).fetchall()
    return [(int(r[0]), bool(r[1])) for r in rows]


async def test_put_stores_publishes_and_get_reads_back_with_the_version_as_etag(
        applied: Settings, api_key: str, unique: str) -> None:
    user = f"user-{unique}"
    async with serving(applied) as client:
        missing = await client.get(f"/v1/users/{user}/settings", headers=bearer(api_key))
        first = await client.put(f"/v1/users/{user}/settings", json=OPT_OUT, headers=bearer(api_key))
        second = await client.put(f"/v1/users/{user}/settings", headers=bearer(api_key),
                                  json={**OPT_OUT, "channel_preference": ["push", "email"]})
        read = await client.get(f"/v1/users/{user}/settings", headers=bearer(api_key))
        body = await read.json()
        assert missing.status == 404
        assert (first.status, second.status, read.status) == (200, 200, 200), await first.text()
        assert (await first.json())["published"] is True
        assert read.headers["ETag"] == '"2"'
        assert body["version"] == 2 and body["channel_preference"] == ["push", "email"]
        assert body["categories"] == {
            "marketing": {"opted_in_channels": [], "opted_out_channels": ["sms"], "digest": None},
            "portfolio": {"opted_in_channels": [], "opted_out_channels": [], "digest": "hourly"}}
        assert body["quiet_hours"] == {"start": "22:00", "end": "07:00"} and body["digest"] == "daily"
    on_topic = published(applied, user)
    assert [s["version"] for s in on_topic] == [1, 2]
    assert on_topic[-1]["channel_preference"] == ["push", "email"]
    assert (on_topic[-1]["digest"], on_topic[-1]["categories"]["portfolio"]["digest"]) == ("daily", "hourly")
    assert outbox_rows(applied, user) == [(1, True), (2, True)]


async def test_a_bad_body_is_422_and_a_stale_if_match_is_412_and_neither_is_published(
        applied: Settings, api_key: str, unique: str) -> None:
    user = f"user-{unique}"
    async with serving(applied) as client:
        bad = await client.put(f"/v1/users/{user}/settings", json={"timezone": "Nowhere/Town"},
                               headers=bearer(api_key))
        ok = await client.put(f"/v1/users/{user}/settings", json=OPT_OUT, headers=bearer(api_key))
        stale = await client.put(f"/v1/users/{user}/settings", json={},
                                 headers={**bearer(api_key), "If-Match": '"7"'})
        fresh = await client.put(f"/v1/users/{user}/settings", json={},
                                 headers={**bearer(api_key), "If-Match": '"1"'})
        unauthenticated = await client.get(f"/v1/users/{user}/settings")
        assert bad.status == 422
        assert (await bad.json())["details"][0]["field"] == "timezone"
        assert (ok.status, stale.status, fresh.status, unauthenticated.status) == (200, 412, 200, 401)
        assert (await stale.json())["current_version"] == 1
    assert [s["version"] for s in published(applied, user)] == [1, 2]


async def test_when_kafka_is_away_the_write_is_kept_and_the_relay_publishes_it_later(
        applied: Settings, api_key: str, unique: str) -> None:
    user = f"user-{unique}"
    unreachable = producer(applied, **{"bootstrap.servers": "127.0.0.1:1", "delivery.timeout.ms": 1500,
                                        "socket.connection.setup.timeout.ms": 1000})
    async with serving(applied, outbox=SettingsOutbox(applied, unreachable)) as client:
        response = await client.put(f"/v1/users/{user}/settings", json=OPT_OUT, headers=bearer(api_key))
        assert response.status == 200, await response.text()
        assert (await response.json())["published"] is False
        assert (await (await client.get(f"/v1/users/{user}/settings", headers=bearer(api_key))).json())[
            "version"] == 1
    unreachable.purge()
    unreachable.flush(0)
    assert outbox_rows(applied, user) == [(1, False)]
    assert published(applied, user) == []
    relay = SettingsOutbox(applied)
    while await relay.relay_once():  # other tests' leftovers may be pending too; drain them all
        pass
    relay.close()
    assert outbox_rows(applied, user) == [(1, True)]
    (on_topic,) = published(applied, user)
    assert on_topic["categories"]["marketing"]["opted_out_channels"] == ["sms"]
    assert str(uuid.UUID(int=0)) != on_topic["user_id"]
