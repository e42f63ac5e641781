"""The console's pages. Each handler reads (in a thread where the client blocks), then renders one template; the
admin check and the CSRF check are done once, in `admin` and `checked_form`."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, Final

import aiohttp
import jinja2
from aiohttp import web
from multidict import MultiDictProxy

from pipeline.api import auth, keys
from pipeline.config import Settings
from pipeline.console import figures, session, sources
from pipeline.domain import LANES, STAGES, text_flaws
from pipeline.kafka import serde, topics
from pipeline.ops import dlq, quarantine, replay
from pipeline.policy.delivery_log import ListQuery
from pipeline.stages.worker import processes
from pipeline.state import db, delivery_log

COOKIE: Final = "notify_console"
MAX_LISTED: Final = 500
MAX_FIELD: Final = 300
HEADERS: Final = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
                                             "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
                  "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin", "Cache-Control": "no-store",
                  "X-Frame-Options": "DENY"}
NAV: Final = (("pipeline", "Pipeline"), ("providers", "Providers"), ("dlq", "DLQ"), ("quarantine", "Quarantine"),
              ("notifications", "Notifications"), ("replay", "Replay planner"))


@dataclasses.dataclass
class ConsoleState:
    settings: Settings
    secret: bytes
    env: jinja2.Environment
    pipeline: sources.PipelineFigures
    http: aiohttp.ClientSession | None = None


CONSOLE = web.AppKey("notify.console", ConsoleState)


@dataclasses.dataclass(frozen=True)
class Viewer:
    service: str
    key_id: str
    nonce: str  # CSRF tokens derive from it


Page = Callable[[web.Request, Viewer], Awaitable[web.StreamResponse]]


def _state(request: web.Request) -> ConsoleState:
    return request.app[CONSOLE]


def _page(request: web.Request, template: str, status: int = 200, nonce: str | None = None,
          cookie: str | None = None, **context: Any) -> web.Response:
    state = _state(request)
    body = state.env.get_template(template).render(
        nav=NAV, prefix="/console", csrf=session.csrf_token(state.secret, nonce) if nonce else "",
        fmt=figures.fmt, **context)
    response = web.Response(text=body, status=status, content_type="text/html", headers=HEADERS)
    if cookie is not None:
        response.set_cookie(COOKIE, cookie, path="/console", httponly=True, samesite="Strict",
                            secure=request.secure, max_age=session.SESSION_TTL_S)
    return response


def _problem(request: web.Request, status: int, message: str, viewer: Viewer | None = None) -> web.Response:
    return _page(request, "problem.html", status=status, nonce=viewer.nonce if viewer else None,
                 viewer=viewer, title=f"{status}", message=message, active="")


def _clean(values: Mapping[str, str], allowed: tuple[str, ...]) -> dict[str, str] | str:
    """The non-empty values of `allowed` fields; a message naming the first hostile or unknown one."""
    out = {}
    for name, value in values.items():
        if name not in allowed:
            return f"unknown field {name!r}"
        if len(value) > MAX_FIELD:
            return f"{name} is longer than {MAX_FIELD} characters"
        if flaws := text_flaws(value, name):
            return f"{flaws[0][0]} {flaws[0][1]}"
        if value.strip():
            out[name] = value.strip()
    return out


def admin(handler: Page) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Only for an admin key: by session cookie (else to the login page) or `Authorization: Bearer`."""
    async def checked(request: web.Request) -> web.StreamResponse:
        state = _state(request)
        verifier = request.app[auth.VERIFIER]
        try:
            presented = auth.presented_key(request)
            if presented is not None:
                caller = await verifier.caller_of(presented)
                if caller is None or not caller.allows("admin"):
                    return _problem(request, 403, "this key is not a valid key with the admin scope")
                return await handler(request, Viewer(caller.service, caller.key_id, f"bearer-{caller.key_id}"))
            current = session.decode(state.secret, request.cookies.get(COOKIE), time.time())
            active = None if current is None or current.key_id is None else await verifier.active_key(current.key_id)
        except auth.AuthUnavailable:
            return _problem(request, 503, "the key store (PostgreSQL) does not answer; retry shortly")
        if current is None or active is None or not keys.allows(active.scopes, "admin"):
            if request.method != "GET":  # a post from outside a session (another site's form): refused outright
                return _problem(request, 403, "refused: no console session (log in first)")
            raise web.HTTPSeeOther("/console/login")
        return await handler(request, Viewer(active.service, active.key_id, current.nonce))

    return checked


async def checked_form(request: web.Request, viewer: Viewer) -> MultiDictProxy[str | bytes | Any] | None:
    """The posted form if its CSRF token is this session's; None (the caller answers 403) otherwise."""
    form = await request.post()
    token = form.get("csrf")
    if not isinstance(token, str) or not session.csrf_ok(_state(request).secret, viewer.nonce, token):
        return None
    return form


def _forbidden_post(request: web.Request, viewer: Viewer | None) -> web.Response:
    return _problem(request, 403, "refused: the form's CSRF token is missing or not this session's (reload the "
                                  "page and submit it again)", viewer)


# --- login ---------------------------------------------------------------------------------------------------

async def login_page(request: web.Request) -> web.Response:
    state = _state(request)
    current = session.decode(state.secret, request.cookies.get(COOKIE), time.time())
    fresh = current or session.new_session(None, time.time())
    return _page(request, "login.html", nonce=fresh.nonce, viewer=None, active="", error=None,
                 cookie=None if current else session.encode(state.secret, fresh))


async def login(request: web.Request) -> web.Response:
    state = _state(request)
    current = session.decode(state.secret, request.cookies.get(COOKIE), time.time())
    form = await request.post()
    token = form.get("csrf")
    if current is None or not isinstance(token, str) or not session.csrf_ok(state.secret, current.nonce, token):
        return _forbidden_post(request, None)
    presented = form.get("key")
    try:
        caller = await request.app[auth.VERIFIER].caller_of(presented.strip()) if isinstance(presented, str) else None
    except auth.AuthUnavailable:
        return _problem(request, 503, "the key store (PostgreSQL) does not answer; retry shortly")
    if caller is None or not caller.allows("admin"):
        return _page(request, "login.html", status=403, nonce=current.nonce, viewer=None, active="",
                     error="not a valid key with the admin scope")
    opened = session.new_session(caller.key_id, time.time())  # a new nonce: nothing from before the login carries
    response = web.HTTPSeeOther("/console/pipeline")
    response.set_cookie(COOKIE, session.encode(state.secret, opened), path="/console", httponly=True,
                        samesite="Strict", secure=request.secure, max_age=session.SESSION_TTL_S)
    raise response


@admin
async def logout(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    if await checked_form(request, viewer) is None:
        return _forbidden_post(request, viewer)
    response = web.HTTPSeeOther("/console/login")
    response.del_cookie(COOKIE, path="/console")
    raise response


async def index(_request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/console/pipeline")


# --- pipeline and providers ------------------------------------------------------------------------------------

@admin
async def pipeline_page(request: web.Request, viewer: Viewer) -> web.Response:
    state = _state(request)
    assert state.http is not None
    ready, (stages, source) = await asyncio.gather(sources.readiness(state.settings, state.http),
                                                   state.pipeline.read(state.settings, state.http))
    return _page(request, "pipeline.html", nonce=viewer.nonce, viewer=viewer, active="pipeline",
                 processes=ready, stages=stages, source=source)


@admin
async def providers_page(request: web.Request, viewer: Viewer) -> web.Response:
    state = _state(request)
    pool = await db.async_pool(state.settings)
    async with pool.connection() as conn:
        attempts, since = await sources.today_attempts(conn, state.settings, datetime.datetime.now(datetime.UTC))
    rows = figures.provider_figures(attempts, dict(state.settings.provider_prices_usd))
    return _page(request, "providers.html", nonce=viewer.nonce, viewer=viewer, active="providers",
                 breakers=await sources.breakers(state.settings), rows=rows, since=since, read=len(attempts),
                 sample=sources.PROVIDER_SAMPLE)


# --- DLQ and quarantine ----------------------------------------------------------------------------------------

QUARANTINE_FIELDS: Final = (*quarantine.FILTER_KEYS, "since", "until")


async def _dlq_entries(settings: Settings, filters: Mapping[str, str]) -> list[dlq.Entry]:
    return dlq.select(await asyncio.to_thread(dlq.read, settings), filters)


async def _quarantine_entries(settings: Settings, fields: Mapping[str, str]) -> list[quarantine.Entry]:
    filters = {k: v for k, v in fields.items() if k in quarantine.FILTER_KEYS}
    since = quarantine.parse_time(fields.get("since"), "since")
    until = quarantine.parse_time(fields.get("until"), "until")
    entries = await asyncio.to_thread(quarantine.read, settings)
    return quarantine.select(entries, filters, since=since, until=until)


def _kind(request: web.Request) -> str:
    return "dlq" if request.path.startswith("/console/dlq") else "quarantine"


@admin
async def queue_list(request: web.Request, viewer: Viewer) -> web.Response:
    kind = _kind(request)
    allowed = dlq.FILTER_KEYS if kind == "dlq" else QUARANTINE_FIELDS
    fields = _clean(dict(request.query), allowed)
    if isinstance(fields, str):
        return _problem(request, 422, fields, viewer)
    settings = _state(request).settings
    try:
        entries: list[Any] = (await _dlq_entries(settings, fields) if kind == "dlq"
                              else await _quarantine_entries(settings, fields))
    except (dlq.DlqError, quarantine.QuarantineError) as exc:
        return _problem(request, 422 if "since" in str(exc) or "until" in str(exc) else 503, str(exc), viewer)
    return _page(request, "queue.html", nonce=viewer.nonce, viewer=viewer, active=kind, kind=kind, fields=fields,
                 allowed=allowed, entries=[e.summary() for e in entries[-MAX_LISTED:]][::-1], total=len(entries),
                 shown=min(len(entries), MAX_LISTED))


@admin
async def queue_entry(request: web.Request, viewer: Viewer) -> web.Response:
    kind = _kind(request)
    fields = _clean(dict(request.query), ("position",))
    if isinstance(fields, str) or "position" not in fields:
        return _problem(request, 422, "give ?position=PARTITION:OFFSET", viewer)
    settings = _state(request).settings
    try:
        if kind == "dlq":
            found: list[Any] = dlq.select(await asyncio.to_thread(dlq.read, settings), {}, fields["position"])
            details = [e.details() for e in found]
            headers = [{k: v.decode(errors="replace") for k, v in e.record.headers.items()} for e in found]
        else:
            entries = await asyncio.to_thread(quarantine.read, settings)
            found = quarantine.select(entries, {}, position=fields["position"])
            codec = serde.serde(settings)
            details = [e.details(codec) for e in found]
            headers = [d["headers"] for d in details]
    except (dlq.DlqError, quarantine.QuarantineError) as exc:
        return _problem(request, 503, str(exc), viewer)
    if not found:
        return _problem(request, 404, f"no {kind} entry at {fields['position']}", viewer)
    return _page(request, "entry.html", nonce=viewer.nonce, viewer=viewer, active=kind, kind=kind,
                 position=fields["position"], details=details[0], headers=headers[0])


@admin
async def queue_redrive(request: web.Request, viewer: Viewer) -> web.Response:
    """Step 1 (no `confirm`): a dry run of what the filters select, and a confirmation form naming those entries.
    Step 2 (`confirm=yes` with the positions shown): the redrive of those entries only, once."""
    kind = _kind(request)
    form = await checked_form(request, viewer)
    if form is None:
        return _forbidden_post(request, viewer)
    allowed = dlq.FILTER_KEYS if kind == "dlq" else QUARANTINE_FIELDS
    posted = {k: v for k, v in form.items() if isinstance(v, str) and k not in ("csrf", "confirm", "positions")}
    fields = _clean(posted, allowed)
    if isinstance(fields, str):
        return _problem(request, 422, fields, viewer)
    confirm = form.get("confirm") == "yes"
    chosen_text = form.get("positions") if confirm else None
    chosen = set(chosen_text.split()) if isinstance(chosen_text, str) else None
    settings = _state(request).settings
    try:
        if kind == "dlq":
            dlq_selected = [e for e in await _dlq_entries(settings, fields) if chosen is None or e.position in chosen]
            done = await dlq.redrive(settings, dlq_selected, dry_run=not confirm)
            redriven, skipped = done.redriven, done.skipped
        else:
            q_selected = [e for e in await _quarantine_entries(settings, fields)
                          if chosen is None or e.position in chosen]
            put_back = await asyncio.to_thread(partial(quarantine.redrive, dry_run=not confirm), settings, q_selected)
            redriven, skipped = put_back.redriven, put_back.skipped
    except (dlq.DlqError, quarantine.QuarantineError) as exc:
        return _problem(request, 503, str(exc), viewer)
    return _page(request, "redrive.html", nonce=viewer.nonce, viewer=viewer, active=kind, kind=kind, fields=fields,
                 confirmed=confirm, redriven=redriven, skipped=skipped)


# --- notifications ---------------------------------------------------------------------------------------------

@admin
async def notifications_page(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    fields = _clean(dict(request.query), ("q",))
    if isinstance(fields, str):
        return _problem(request, 422, fields, viewer)
    q = fields.get("q")
    found: list[dict[str, Any]] = []
    if q is not None:
        try:
            as_id: uuid.UUID | None = uuid.UUID(q)
        except ValueError:
            as_id = None
        if as_id is not None:
            raise web.HTTPSeeOther(f"/console/notifications/{as_id}")
        pool = await db.async_pool(_state(request).settings)
        async with pool.connection() as conn:
            found, _ = await delivery_log.page(conn, ListQuery(user_id=q, limit=100), None)
    return _page(request, "notifications.html", nonce=viewer.nonce, viewer=viewer, active="notifications", q=q,
                 found=found)


@admin
async def notification_page(request: web.Request, viewer: Viewer) -> web.Response:
    try:
        notification_id = uuid.UUID(request.match_info["notification_id"])
    except ValueError:
        return _problem(request, 422, "not a notification id (a UUID)", viewer)
    pool = await db.async_pool(_state(request).settings)
    async with pool.connection() as conn:
        found = await delivery_log.fetch(conn, notification_id)
    if found is None:
        return _problem(request, 404, f"no notification {notification_id}", viewer)
    return _page(request, "notification.html", nonce=viewer.nonce, viewer=viewer, active="notifications",
                 log=found.as_json(serde.AvroSerde()))


# --- replay planner --------------------------------------------------------------------------------------------

def replay_choices(settings: Settings) -> tuple[list[str], list[str]]:
    """The groups of the pipeline's stages and the declared topics, as named on the cluster."""
    groups = [f"{settings.topic_prefix}notify-{stage}-{lane}" for stage, lane in processes(LANES, STAGES)
              if stage not in ("receipts", "reconcile")]
    groups.append(f"{settings.topic_prefix}notify-receipts")
    return groups, [settings.topic(name) for name in sorted(topics.catalogue())]


@admin
async def replay_page(request: web.Request, viewer: Viewer) -> web.Response:
    settings = _state(request).settings
    groups, topic_names = replay_choices(settings)
    fields = _clean(dict(request.query), ("group", "topic", "at"))
    if isinstance(fields, str):
        return _problem(request, 422, fields, viewer)
    planned, error = None, None
    if {"group", "topic", "at"} <= set(fields):
        if fields["group"] not in groups or fields["topic"] not in topic_names:
            return _problem(request, 422, "choose a group and a topic of the lists", viewer)
        try:
            replay.parse_datetime(fields["at"])
            planned = await asyncio.to_thread(replay.plan, settings, fields["group"], fields["topic"],
                                              to_datetime=fields["at"])
        except replay.ReplayError as exc:
            error = str(exc)
    return _page(request, "replay.html", nonce=viewer.nonce, viewer=viewer, active="replay", groups=groups,
                 topics=topic_names, fields=fields, plan=planned, error=error)


ROUTES: Final[list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]]] = [
    ("GET", "", index), ("GET", "/", index),
    ("GET", "/login", login_page), ("POST", "/login", login), ("POST", "/logout", logout),
    ("GET", "/pipeline", pipeline_page), ("GET", "/providers", providers_page),
    ("GET", "/dlq", queue_list), ("GET", "/dlq/entry", queue_entry), ("POST", "/dlq/redrive", queue_redrive),
    ("GET", "/quarantine", queue_list), ("GET", "/quarantine/entry", queue_entry),
    ("POST", "/quarantine/redrive", queue_redrive),
    ("GET", "/notifications", notifications_page), ("GET", "/notifications/{notification_id}", notification_page),
    ("GET", "/replay", replay_page),
]
