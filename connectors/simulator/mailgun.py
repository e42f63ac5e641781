"""Mailgun under /mailgun (https://documentation.mailgun.com).

POST /v3/{domain}/messages (basic auth api:<key>; form from, to, subject, text/html, v:<name> user variables)
answers 200 {"id": "<...@domain>", "message": "Queued. Thank you."}; bad auth is 401 with the text "Forbidden",
bad input 400 {"message": ...}, an unknown domain 404. GET /v3/{domain}/events lists events (accepted, then
delivered or failed), filtered by message-id and recipient, within begin / end (RFC 2822 dates or epoch seconds),
in the order `ascending` (yes / no) says, at most `limit` (default 100, at most 300). Webhooks POST JSON
{"signature": {timestamp, token, signature}, "event-data": {...}} where signature = hex HMAC-SHA256(webhook
signing key, timestamp + token).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from datetime import UTC, datetime
from email.utils import parseaddr, parsedate_to_datetime
from typing import Any

from aiohttp import web

from connectors.simulator.common import BOUNCE_DOMAIN, EMAIL, basic_auth, json_response, sim_of
from connectors.simulator.state import LedgerEntry

P = "mailgun"


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response(status, {"message": message}, headers)


def _denied(request: web.Request) -> web.Response | None:
    sim = sim_of(request)
    if basic_auth(request) != ("api", sim.settings.mailgun_api_key):
        return web.Response(status=401, text="Forbidden", headers={"WWW-Authenticate": 'Basic realm="MG API"'})
    if request.match_info["domain"] != sim.settings.mailgun_domain:
        return error(404, f"Domain not found: {request.match_info['domain']}")
    return None


async def messages(request: web.Request) -> web.Response:
    sim = sim_of(request)
    fault = await sim.state.draw_fault(P)
    if fault == "outage":
        return error(503, "Service Unavailable")
    if fault == "5xx":
        return error(500, "Internal Server Error")
    if fault == "429":
        return error(429, "Too many requests", {"Retry-After": f"{sim.state.faults[P].retry_after_s:g}"})
    if denied := _denied(request):
        return denied
    form = await request.post()
    sender, to = str(form.get("from", "")), str(form.get("to", ""))
    if not sender:
        return error(400, "from parameter is missing")
    if not to:
        return error(400, "to parameter is missing")
    address = parseaddr(to)[1]
    if not EMAIL.match(address) or fault == "permanent":
        return error(400, "to parameter is not a valid address. please check documentation")
    if not form.get("subject"):
        return error(400, "subject parameter is missing")
    if not form.get("text") and not form.get("html") and not form.get("template"):
        return error(400, "Need at least one of 'text', 'html' or 'template' parameters specified")
    variables = {k[2:]: str(v) for k, v in form.items() if k.startswith("v:")}
    testmode = str(form.get("o:testmode", "")).lower() in ("yes", "true")
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    message_id = f"{stamp}.{secrets.token_hex(8)}@{sim.settings.mailgun_domain}"
    entry = sim.state.accept(P, message_id, notification_id=variables.get("notification_id"), to=address,
                             sender=sender, body=str(form.get("text", "")), subject=str(form.get("subject")),
                             html=str(form["html"]) if form.get("html") else None,
                             fails=address.endswith("@" + BOUNCE_DOMAIN), test_mode=testmode)
    if testmode:  # o:testmode: accepted and answered as usual, never delivered, no webhooks
        return json_response(200, {"id": f"<{message_id}>", "message": "Queued. Thank you."})
    sim.schedule_callback(entry, sim.state.faults[P].webhook_url,
                          lambda e, _url: webhook(e, variables, sim.settings.mailgun_webhook_signing_key))
    if fault == "hang":
        entry.hung = True
        await sim.state.hang()
    return json_response(200, {"id": f"<{message_id}>", "message": "Queued. Thank you."})


def _event(entry: LedgerEntry, kind: str, variables: dict[str, str]) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": secrets.token_urlsafe(16), "event": kind, "recipient": entry.to,
        "recipient-domain": entry.to.rpartition("@")[2], "log-level": "info",
        "timestamp": entry.accepted_at if kind == "accepted" else entry.deliver_at,
        "message": {"headers": {"message-id": entry.provider_message_id, "from": entry.sender, "to": entry.to,
                                "subject": entry.subject}},
        "user-variables": variables, "flags": {"is-authenticated": True, "is-test-mode": False},
    }
    if kind == "delivered":
        event["delivery-status"] = {"code": 250, "message": "OK", "description": "", "attempt-no": 1}
    elif kind == "failed":
        event.update({"log-level": "error", "severity": "permanent", "reason": "bounce"})
        event["delivery-status"] = {"code": 550, "message": "5.1.1 The email account that you tried to reach does "
                                    "not exist.", "description": "", "attempt-no": 1}
    return event


def _events(entry: LedgerEntry, variables: dict[str, str]) -> list[dict[str, Any]]:
    status = entry.status()
    events = [_event(entry, "accepted", variables)]
    if status != "accepted":
        events.append(_event(entry, status, variables))
    return events


def _when(value: str) -> float:
    """A begin / end value, RFC 2822 or epoch seconds, as epoch seconds; ValueError otherwise."""
    try:
        return float(value)
    except ValueError:
        when = parsedate_to_datetime(value)  # ValueError when it is not a date either
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _window(query: Any) -> tuple[float, float, bool, int]:
    """The time range, direction and page size of an events request (Mailgun: begin to end; with begin alone,
    `ascending` says which way the range runs)."""
    ascending = query.get("ascending", "no").lower() == "yes"
    limit = int(query.get("limit", "100"))
    if not 1 <= limit <= 300:
        raise ValueError("limit must be between 1 and 300")
    begin = _when(query["begin"]) if query.get("begin") else None
    end = _when(query["end"]) if query.get("end") else None
    if begin is not None and end is None:
        return (begin, float("inf"), True, limit) if ascending else (float("-inf"), begin, False, limit)
    low, high = sorted((begin if begin is not None else float("-inf"), end if end is not None else float("inf")))
    return low, high, ascending, limit


async def events(request: web.Request) -> web.Response:
    sim = sim_of(request)
    if await sim.state.draw_fault(P) == "outage":
        return error(503, "Service Unavailable")
    if denied := _denied(request):
        return denied
    try:
        low, high, ascending, limit = _window(request.query)
    except ValueError as exc:
        return error(400, f"Invalid parameter: {exc}")
    entries = sim.state.query(provider=P, provider_message_id=request.query.get("message-id"),
                              to=request.query.get("recipient"))
    items = [event for e in entries
             for event in _events(e, {"notification_id": e.notification_id} if e.notification_id else {})
             if low <= event["timestamp"] <= high]
    items = sorted(items, key=lambda event: event["timestamp"], reverse=not ascending)[:limit]
    base = f"{request.url.with_query(None)}"
    return json_response(200, {"items": items, "paging": {"next": f"{base}/next", "previous": f"{base}/previous",
                                                          "first": base, "last": base}})


def webhook(entry: LedgerEntry, variables: dict[str, str], signing_key: str, signed_at: float | None = None
            ) -> tuple[bytes, dict[str, str]]:
    """One event of the message as a signed webhook request; signed now unless `signed_at` says when."""
    timestamp, token = str(int(time.time() if signed_at is None else signed_at)), secrets.token_hex(25)
    signature = hmac.new(signing_key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    payload = {"signature": {"timestamp": timestamp, "token": token, "signature": signature},
               "event-data": _event(entry, entry.status(), variables)}
    return json.dumps(payload).encode(), {"Content-Type": "application/json"}


def add_routes(app: web.Application) -> None:
    app.router.add_post("/mailgun/v3/{domain}/messages", messages)
    app.router.add_get("/mailgun/v3/{domain}/events", events)
