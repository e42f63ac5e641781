"""The read API: what happened to a notification, from the delivery log (needs a key with `read` or `admin`).

GET /v1/notifications/{notification_id}   the notification as accepted, each channel's delivery, every attempt,
                                          and the timeline (received, state changes, attempts) in order
GET /v1/notifications?user_id=&type=&state=&channel=&since=&until=&limit=&cursor=
                                          newest first (created_at, then notification_id), keyset pages

A `read` key sees only notifications whose source_service is its own service; `admin` sees every one. Another
service's notification is a 404 like an unknown one (its existence is not told). 422 names every bad parameter.
When PostgreSQL does not answer: 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Final, NoReturn

import psycopg
from aiohttp import web

from pipeline.api import auth
from pipeline.api.ingest import json_error
from pipeline.config import Settings
from pipeline.kafka import serde
from pipeline.policy.delivery_log import InvalidQuery, parse_list_query
from pipeline.policy.request_contract import FieldProblem
from pipeline.state import db, delivery_log

log = logging.getLogger(__name__)

READ_TIMEOUT_S: Final = 10.0
RETRY_AFTER_S: Final = 5
ITEM_ROUTE: Final = "/v1/notifications/{notification_id}"
LIST_ROUTE: Final = "/v1/notifications"
SETTINGS = web.AppKey("notify.read_settings", Settings)
_codec = serde.AvroSerde()


def parse_id(text: str) -> uuid.UUID:
    """A notification id in its canonical form; 422 for anything else."""
    try:
        parsed = uuid.UUID(text) if len(text) == 36 else None
    except ValueError:
        parsed = None
    if parsed is None:
        json_error(web.HTTPUnprocessableEntity, "invalid notification id",
                   [FieldProblem("notification_id", "must be a UUID such as 3f1c1a2e-8a0e-4e4b-9a55-2d1f7a7f6b10")])
    return parsed


def _unavailable(exc: BaseException) -> NoReturn:
    log.warning("read API: PostgreSQL did not answer: %s", exc)
    json_error(web.HTTPServiceUnavailable, "the delivery log cannot be read right now; retry later",
               headers={"Retry-After": str(RETRY_AFTER_S)})


async def get_notification(request: web.Request) -> web.Response:
    notification_id = parse_id(request.match_info["notification_id"])
    caller = request[auth.CALLER]
    try:
        async with asyncio.timeout(READ_TIMEOUT_S):
            pool = await db.async_pool(request.app[SETTINGS])
            async with pool.connection() as conn:
                found = await delivery_log.fetch(conn, notification_id)
    except (psycopg.Error, TimeoutError, OSError) as exc:
        _unavailable(exc)
    if found is None or not caller.may_read(found.source_service):
        json_error(web.HTTPNotFound, f"no notification {notification_id} that this key may read")
    return web.json_response(found.as_json(_codec))


async def list_notifications(request: web.Request) -> web.Response:
    caller = request[auth.CALLER]
    try:
        query = parse_list_query({name: request.query.getall(name) for name in request.query})
    except InvalidQuery as exc:
        json_error(web.HTTPUnprocessableEntity, "invalid query parameters",
                   [FieldProblem(field, problem) for field, problem in exc.problems])
    service = None if caller.allows("admin") else caller.service
    try:
        async with asyncio.timeout(READ_TIMEOUT_S):
            pool = await db.async_pool(request.app[SETTINGS])
            async with pool.connection() as conn:
                items, next_cursor = await delivery_log.page(conn, query, service)
    except (psycopg.Error, TimeoutError, OSError) as exc:
        _unavailable(exc)
    return web.json_response({"notifications": items, "next_cursor": next_cursor})


def setup(app: web.Application, settings: Settings) -> None:
    """Add the read routes (call after auth.setup: their scope is `read`)."""
    app[SETTINGS] = settings
    app[auth.ROUTE_SCOPES][("GET", ITEM_ROUTE)] = "read"
    app[auth.ROUTE_SCOPES][("GET", LIST_ROUTE)] = "read"
    app.router.add_get(ITEM_ROUTE, get_notification)
    app.router.add_get(LIST_ROUTE, list_notifications)
