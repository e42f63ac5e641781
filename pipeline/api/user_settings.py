"""The settings API and its transactional outbox.

GET /v1/users/{user_id}/settings   200 with the settings and `ETag: "<version>"`; 404 when the user has none.
PUT /v1/users/{user_id}/settings   replaces them whole: 200 with the stored settings (new version); 422 naming
                                   every wrong field; 412 when `If-Match: "<version>"` is not the current one.

PostgreSQL (user_notification_settings) and the compacted user-settings topic must not diverge, so a PUT never
writes Kafka itself: in one database transaction it writes the row and an outbox row holding the encoded
UserSettings record; after the commit, the outbox relay publishes pending rows in id order and marks each
published once Kafka acknowledged it. A failed database write publishes nothing; a failed publish stays pending
and is retried (the PUT still answers 200: the write is durable, `published` says whether it is on Kafka yet).
One relay publishes at a time across every API process (an advisory lock), so a user's versions reach the topic
in order and compaction keeps the newest.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Final

from aiohttp import web
from confluent_kafka import KafkaError, Message, Producer
from psycopg.types.json import Jsonb

from pipeline import metrics
from pipeline.api.ingest import json_error, read_json
from pipeline.config import Settings
from pipeline.domain import MAX_USER_ID_LENGTH, text_flaws
from pipeline.kafka import clients, serde, topics
from pipeline.policy import user_settings as policy
from pipeline.policy.request_contract import InvalidRequest
from pipeline.stages.records import utcnow
from pipeline.state import db

log = logging.getLogger(__name__)

RELAY_INTERVAL_S: Final = 1.0
RELAY_BATCH: Final = 500
RELAY_LOCK: Final = 0x6E6F7469  # pg advisory lock id of the settings outbox relay ("noti")
PUBLISH_TIMEOUT_S: Final = 10.0

PUBLISHED = metrics.counter("notify_settings_published_total", "Settings outbox rows published to Kafka.", ["outcome"])
PENDING = metrics.gauge(
    "notify_settings_outbox_pending", "Settings outbox rows not yet on Kafka (as of the last relay run).")
PREFERENCE_CHANGES = metrics.counter(
    "notify_preference_changes_total", "Opt-outs and opt-ins users made through the settings API, by notification "
    "type (category) and channel.", ["channel", "category", "change"])
WRITES = metrics.counter("notify_settings_writes_total", "Settings API writes, by outcome.", ["outcome"])

SELECT_SETTINGS = """
SELECT timezone, channel_preference, category_settings, to_char(quiet_hours_start, 'HH24:MI'),
       to_char(quiet_hours_end, 'HH24:MI'), digest, phone_e164, email, device_tokens, version, updated_at
FROM user_notification_settings WHERE user_id = %s
"""
LOCK_VERSION = "SELECT version, category_settings FROM user_notification_settings WHERE user_id = %s FOR UPDATE"
UPSERT_SETTINGS = """
INSERT INTO user_notification_settings (user_id, timezone, channel_preference, category_settings,
    quiet_hours_start, quiet_hours_end, digest, phone_e164, email, device_tokens, version, updated_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (user_id) DO UPDATE SET timezone = EXCLUDED.timezone, channel_preference = EXCLUDED.channel_preference,
    category_settings = EXCLUDED.category_settings, quiet_hours_start = EXCLUDED.quiet_hours_start,
    quiet_hours_end = EXCLUDED.quiet_hours_end, digest = EXCLUDED.digest, phone_e164 = EXCLUDED.phone_e164,
    email = EXCLUDED.email, device_tokens = EXCLUDED.device_tokens, version = EXCLUDED.version,
    updated_at = EXCLUDED.updated_at
"""
INSERT_OUTBOX = """
INSERT INTO settings_outbox (topic, user_id, version, payload) VALUES (%s, %s, %s, %s) RETURNING id
"""
PENDING_ROWS = """
SELECT id, user_id, payload FROM settings_outbox WHERE published_at IS NULL AND topic = %s ORDER BY id LIMIT %s
"""
MARK_PUBLISHED = "UPDATE settings_outbox SET published_at = now(), attempts = attempts + 1 WHERE id = ANY(%s)"
MARK_FAILED = "UPDATE settings_outbox SET attempts = attempts + 1, last_error = %s WHERE id = ANY(%s)"
COUNT_PENDING = "SELECT count(*) FROM settings_outbox WHERE published_at IS NULL AND topic = %s"
IS_PUBLISHED = "SELECT published_at IS NOT NULL FROM settings_outbox WHERE id = %s"


class SettingsOutbox:
    """Publishes pending outbox rows to the user-settings topic, in order, marking them once acknowledged."""

    def __init__(self, settings: Settings, producer: Producer | None = None) -> None:
        self.settings = settings
        self._owns_producer = producer is None  # a given producer is the caller's to close
        self.producer = producer or clients.producer(settings, **{"delivery.timeout.ms": int(PUBLISH_TIMEOUT_S * 1000)})
        self.topic = settings.topic(topics.USER_SETTINGS)

    def _publish(self, rows: list[Any]) -> tuple[list[int], list[int], str | None]:
        """Produce `rows` and wait; (published ids: the acknowledged prefix, failed ids, first error)."""
        results: list[concurrent.futures.Future[None]] = []
        for _id, user_id, payload in rows:
            done: concurrent.futures.Future[None] = concurrent.futures.Future()

            def on_delivery(error: KafkaError | None, _message: Message,
                            done: concurrent.futures.Future[None] = done) -> None:
                done.set_exception(RuntimeError(str(error))) if error else done.set_result(None)

            try:
                self.producer.produce(self.topic, key=user_id.encode(), value=bytes(payload), on_delivery=on_delivery)
            except (BufferError, RuntimeError) as exc:
                done.set_exception(RuntimeError(f"not queued: {exc}"))
            results.append(done)
        self.producer.flush(PUBLISH_TIMEOUT_S + 5)
        published: list[int] = []
        for (row_id, _user, _payload), done in zip(rows, results, strict=True):
            if not done.done() or done.exception() is not None:  # keep order: stop at the first failure
                error = "no acknowledgement in time" if not done.done() else str(done.exception())
                return published, [r[0] for r in rows[len(published):]], error
            published.append(row_id)
        return published, [], None

    async def relay_once(self) -> int | None:
        """Publish what is pending (one batch); how many rows were published, None if another relay holds the lock."""
        pool = await db.async_pool(self.settings)
        async with pool.connection() as conn, conn.transaction():
            locked = await (await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (RELAY_LOCK,))).fetchone()
            if not locked or not locked[0]:
                return None
            rows = await (await conn.execute(PENDING_ROWS, (self.topic, RELAY_BATCH))).fetchall()
            if rows:
                published, failed, error = await asyncio.to_thread(self._publish, rows)
                if published:
                    await conn.execute(MARK_PUBLISHED, (published,))
                    PUBLISHED.labels("published").inc(len(published))
                if failed:
                    await conn.execute(MARK_FAILED, (error, failed))
                    PUBLISHED.labels("failed").inc(len(failed))
                    log.warning("settings outbox: %d row(s) not published (%s); retrying", len(failed), error)
            count = await (await conn.execute(COUNT_PENDING, (self.topic,))).fetchone()
            PENDING.set(count[0] if count else 0)
            return len(rows) - len(failed) if rows else 0

    async def run(self, stop: asyncio.Event, interval_s: float = RELAY_INTERVAL_S) -> None:
        while not stop.is_set():
            try:
                while (await self.relay_once() or 0) >= RELAY_BATCH:
                    pass
            except Exception:  # the database or Kafka is away: the rows wait, the next tick retries
                log.exception("settings outbox relay failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    def close(self) -> None:
        self.producer.flush(5)
        if self._owns_producer:  # else its connections outlive the app (and keep retrying a stopped broker)
            self.producer.close()


OUTBOX = web.AppKey("notify.settings_outbox", SettingsOutbox)
_codec = serde.AvroSerde()


def _row_as_json(user_id: str, row: Any) -> dict[str, Any]:
    tz, preference, categories, start, end, digest, phone, email, tokens, version, updated_at = row
    return policy.as_json({
        "user_id": user_id, "timezone": tz, "channel_preference": list(preference), "categories": categories,
        "quiet_hours": {"start": start, "end": end} if start is not None else None, "digest": digest,
        "contacts": {"phone": phone, "email": email, "device_tokens": tokens}, "version": version,
        "updated_at": updated_at,
    })


def _user_id(request: web.Request) -> str:
    user_id = request.match_info["user_id"]
    if not user_id.strip() or len(user_id) > MAX_USER_ID_LENGTH:
        json_error(web.HTTPUnprocessableEntity, f"user_id must be 1 to {MAX_USER_ID_LENGTH} characters")
    for _, flaw in text_flaws(user_id):
        json_error(web.HTTPUnprocessableEntity, f"user_id {flaw}")
    return user_id


async def get_settings(request: web.Request) -> web.Response:
    user_id = _user_id(request)
    pool = await db.async_pool(request.app[OUTBOX].settings)
    async with pool.connection() as conn:
        row = await (await conn.execute(SELECT_SETTINGS, (user_id,))).fetchone()
    if row is None:
        json_error(web.HTTPNotFound, f"user {user_id!r} has no settings: defaults apply")
    body = _row_as_json(user_id, row)
    return web.json_response(body, headers={"ETag": f'"{body["version"]}"'})


async def put_settings(request: web.Request) -> web.Response:
    user_id = _user_id(request)
    body = await read_json(request)
    outbox = request.app[OUTBOX]
    if_match = request.headers.get("If-Match")
    pool = await db.async_pool(outbox.settings)
    async with pool.connection() as conn, conn.transaction():
        current = await (await conn.execute(LOCK_VERSION, (user_id,))).fetchone()
        if if_match is not None and if_match.strip() != "*" and (
                current is None or if_match.strip().strip('"') != str(current[0])):
            WRITES.labels("precondition_failed").inc()
            json_error(web.HTTPPreconditionFailed, "the settings changed since you read them (If-Match)",
                        current_version=None if current is None else current[0])
        version = 1 if current is None else int(current[0]) + 1
        try:
            record = policy.parse(user_id, body, version=version, now=utcnow())
        except InvalidRequest as exc:
            WRITES.labels("invalid").inc()
            json_error(web.HTTPUnprocessableEntity, "invalid settings", exc.problems)
        quiet, contacts = record["quiet_hours"], record["contacts"]
        await conn.execute(UPSERT_SETTINGS, (
            user_id, record["timezone"], record["channel_preference"], Jsonb(record["categories"]),
            quiet["start"] if quiet else None, quiet["end"] if quiet else None, record["digest"],
            contacts["phone"], contacts["email"], Jsonb(contacts["device_tokens"]), version, record["updated_at"]))
        payload = _codec.encode(serde.USER_SETTINGS, record)
        row = await (await conn.execute(INSERT_OUTBOX, (outbox.topic, user_id, version, payload))).fetchone()
    assert row is not None
    WRITES.labels("stored").inc()
    for category, channel, change in policy.opt_out_changes(None if current is None else current[1],
                                                            record["categories"]):
        PREFERENCE_CHANGES.labels(channel, category, change).inc()
    # Publish now rather than on the next tick (bounded; the relay retries whatever this does not finish).
    with contextlib.suppress(Exception):
        await asyncio.wait_for(outbox.relay_once(), PUBLISH_TIMEOUT_S + 6)
    async with pool.connection() as conn:
        published = await (await conn.execute(IS_PUBLISHED, (row[0],))).fetchone()
    response = {**policy.as_json(record), "published": bool(published and published[0])}
    return web.json_response(response, headers={"ETag": f'"{version}"'})


def setup(app: web.Application, settings: Settings, outbox: SettingsOutbox | None = None) -> None:
    """The settings routes and the outbox relay (started and stopped with the app)."""
    app.router.add_get("/v1/users/{user_id}/settings", get_settings)
    app.router.add_put("/v1/users/{user_id}/settings", put_settings)

    async def relay_lifecycle(app: web.Application) -> AsyncIterator[None]:
        app[OUTBOX] = outbox or SettingsOutbox(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(app[OUTBOX].run(stop))
        yield
        stop.set()
        await task
        await asyncio.to_thread(app[OUTBOX].close)

    app.cleanup_ctx.append(relay_lifecycle)
