"""SendGrid v3 under /sendgrid, as the sendgrid SDK and its Mail helper see it.

POST /v3/mail/send (Authorization: Bearer <key>, the Mail JSON) answers 202 with an empty body and the message id
in X-Message-Id. Errors are {"errors": [{"message", "field", "help"}]}. GET /v3/messages/{msg_id} is the Email
Activity API (a paid add-on on real SendGrid) giving the message's status; GET /v3/messages?query=...&limit=N is its
"filter all messages", newest first, with the query language's `field="value"` terms joined by AND (to_email,
from_email, subject, status, msg_id and unique_args['notification_id'], the one custom arg the ledger keeps).
Delivery events are POSTed as a JSON array to the event webhook, signed as SendGrid's signed event webhook does:
ECDSA P-256 / SHA-256 over timestamp + body, base64 DER in X-Twilio-Email-Event-Webhook-Signature, timestamp in
X-Twilio-Email-Event-Webhook-Timestamp. The simulator's signing key is fixed, so its verification key can be the
default of NOTIFY_SENDGRID_WEBHOOK_PUBLIC_KEY. Custom args come back as top-level keys of each event.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from connectors.simulator.common import BOUNCE_DOMAIN, EMAIL, json_response, sim_of
from connectors.simulator.state import LedgerEntry

P = "sendgrid"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
SIGNING_KEY = ec.derive_private_key(
    int.from_bytes(hashlib.sha256(b"notify-simulator:sendgrid-event-webhook").digest(), "big") % _P256_ORDER,
    ec.SECP256R1(),
)
HELP = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html"
ACTIVITY_STATUS = {"accepted": "processing", "delivered": "delivered", "failed": "not_delivered"}
# One term of the Email Activity query language: field="value" or unique_args['name']="value".
QUERY_TERM = re.compile(r"""^\s*(?:(\w+)|unique_args\['([^']+)'\])\s*=\s*"((?:[^"\\]|\\.)*)"\s*$""")
QUERY_FIELDS = {"to_email": "to", "from_email": "sender", "subject": "subject"}


def public_key() -> str:
    """The verification key of the simulator's event webhook, base64 DER as SendGrid's settings page shows it."""
    der = SIGNING_KEY.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


def error(status: int, message: str, field: str | None = None, help_anchor: str | None = None,
          headers: dict[str, str] | None = None) -> web.Response:
    item = {"message": message, "field": field, "help": f"{HELP}#{help_anchor}" if help_anchor else None}
    return json_response(status, {"errors": [item]}, headers)


def _authorized(request: web.Request) -> bool:
    return request.headers.get("Authorization") == f"Bearer {sim_of(request).settings.sendgrid_api_key}"


def _validate(mail: Any) -> web.Response | None:
    if not isinstance(mail, dict):
        return error(400, "Bad Request")
    personalizations = mail.get("personalizations")
    if not isinstance(personalizations, list) or not personalizations:
        return error(400, "The personalizations field is required and must have at least one personalization.",
                     "personalizations", "message.personalizations")
    for i, p in enumerate(personalizations):
        tos = p.get("to") if isinstance(p, dict) else None
        if not isinstance(tos, list) or not tos:
            return error(400, "The to array is required for all personalization objects, and must have at least one "
                              "email object with a valid email address.", f"personalizations.{i}.to",
                         "message.personalizations.to")
        for j, to in enumerate(tos):
            if not EMAIL.match(str(to.get("email", "") if isinstance(to, dict) else "")):
                return error(400, "Does not contain a valid address.", f"personalizations.{i}.to.{j}.email",
                             "message.personalizations.to")
    sender = mail.get("from")
    if not isinstance(sender, dict) or not EMAIL.match(str(sender.get("email", ""))):
        return error(400, "The from object must be provided for every email send. It is an object that requires the "
                          "email parameter, but may also contain a name parameter.", "from.email", "message.from")
    if not mail.get("template_id"):
        if not mail.get("subject") and not personalizations[0].get("subject"):
            return error(400, "The subject is required. You can get around this requirement if you use a template "
                              "with a subject defined or if every personalization has a subject defined.", "subject",
                         "message.subject")
        if not mail.get("content"):
            return error(400, "Unless a valid template_id is provided, the content parameter is required. There "
                              "must be at least one defined content block.", "content", "message.content")
    return None


async def mail_send(request: web.Request) -> web.Response:
    sim = sim_of(request)
    fault = await sim.state.draw_fault(P)
    if fault == "outage":
        return error(503, "Service Unavailable")
    if fault == "5xx":
        return error(500, "internal server error")
    if fault == "429":
        retry = sim.state.faults[P].retry_after_s
        return error(429, "too many requests", headers={
            "Retry-After": f"{retry:g}", "X-RateLimit-Limit": "600", "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(int(time.time() + retry))})
    if not _authorized(request):
        return error(401, "The provided authorization grant is invalid, expired, or revoked")
    try:
        mail: Any = await request.json()
    except ValueError:
        return error(400, "Bad Request", help_anchor="message.body")
    if invalid := _validate(mail):
        return invalid
    first = mail["personalizations"][0]
    to = str(first["to"][0]["email"])
    if fault == "permanent":
        return error(400, "Does not contain a valid address.", "personalizations.0.to.0.email",
                     "message.personalizations.to")
    custom = {**(mail.get("custom_args") or {}), **(first.get("custom_args") or {})}
    sandbox = bool(((mail.get("mail_settings") or {}).get("sandbox_mode") or {}).get("enable"))
    content = mail.get("content") or [{"value": ""}]
    html = next((str(c.get("value")) for c in content if isinstance(c, dict) and c.get("type") == "text/html"), None)
    message_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode()[:22]
    entry = sim.state.accept(P, message_id, notification_id=custom.get("notification_id"), to=to,
                             sender=str(mail["from"]["email"]), body=str(content[0].get("value", "")),
                             subject=mail.get("subject") or first.get("subject"), html=html,
                             fails=to.endswith("@" + BOUNCE_DOMAIN), test_mode=sandbox)
    if sandbox:  # sandbox mode: validated and answered 200, never delivered, no events
        return web.Response(status=200, headers={"X-Message-Id": message_id})
    sim.schedule_batched(entry, sim.state.faults[P].webhook_url, lambda e: _events(e, custom), sign_events)
    if fault == "hang":
        entry.hung = True
        await sim.state.hang()
    return web.Response(status=202, headers={"X-Message-Id": message_id})


def sg_message_id(entry: LedgerEntry) -> str:
    """The id SendGrid shows in events and activity: the X-Message-Id, then the filter node that took it."""
    return f"{entry.provider_message_id}.filterdrecv-7bf5c69d5-sim-1-{int(entry.accepted_at):X}-1.0"


def _events(entry: LedgerEntry, custom: dict[str, Any]) -> list[dict[str, Any]]:
    base = {"email": entry.to, "smtp-id": f"<{entry.provider_message_id}@sim.sendgrid.net>",
            "sg_message_id": sg_message_id(entry), "category": [], **custom}
    events = [{**base, "event": "processed", "timestamp": int(entry.accepted_at),
               "sg_event_id": secrets.token_urlsafe(16)}]
    if entry.status() == "delivered":
        events.append({**base, "event": "delivered", "timestamp": int(entry.deliver_at),
                       "sg_event_id": secrets.token_urlsafe(16), "response": "250 OK"})
    elif entry.status() == "failed":
        events.append({**base, "event": "bounce", "timestamp": int(entry.deliver_at),
                       "sg_event_id": secrets.token_urlsafe(16), "type": "bounce", "status": "5.1.1",
                       "reason": "550 5.1.1 The email account that you tried to reach does not exist."})
    return events


def event_webhook(entry: LedgerEntry, custom: dict[str, Any], signed_at: float | None = None
                  ) -> tuple[bytes, dict[str, str]]:
    """One message's events as a signed Event Webhook request."""
    body = json.dumps(_events(entry, custom)).encode()
    return body, sign_events(body, signed_at)


def sign_events(body: bytes, signed_at: float | None = None) -> dict[str, str]:
    """The headers of a signed Event Webhook request (ECDSA over timestamp + body), for a batch of events; signed
    now unless `signed_at` says when."""
    timestamp = str(int(time.time() if signed_at is None else signed_at))
    signature = SIGNING_KEY.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {"Content-Type": "application/json",
                  "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
                  "X-Twilio-Email-Event-Webhook-Timestamp": timestamp}


async def message_activity(request: web.Request) -> web.Response:
    sim = sim_of(request)
    if await sim.state.draw_fault(P) == "outage":
        return error(503, "Service Unavailable")
    if not _authorized(request):
        return error(401, "The provided authorization grant is invalid, expired, or revoked")
    entry = sim.state.find(P, request.match_info["msg_id"])
    if entry is None:
        return error(404, "message not found")
    status = ACTIVITY_STATUS[entry.status()]
    events = [{"event_name": {"processed": "processed", "bounce": "bounced"}.get(e["event"], e["event"]),
               "processed": datetime.fromtimestamp(e["timestamp"], UTC).isoformat(), "reason": e.get("reason")}
              for e in _events(entry, {})]
    return json_response(200, {
        "from_email": entry.sender, "msg_id": entry.provider_message_id, "subject": entry.subject,
        "to_email": entry.to, "status": status, "opens_count": 0, "clicks_count": 0,
        "last_event_time": events[-1]["processed"], "events": events})


def _query_filter(query: str) -> Callable[[LedgerEntry], bool]:
    """The Email Activity query as a test on ledger entries; ValueError for what the simulator does not read."""
    tests: list[Callable[[LedgerEntry], bool]] = []
    for term in filter(None, re.split(r"\s+AND\s+", query.strip())):
        match = QUERY_TERM.match(term)
        if match is None:
            raise ValueError(term)
        name, arg, value = match.group(1), match.group(2), json.loads(f'"{match.group(3)}"')
        tests.append(_term_test(name, arg, value))
    return lambda entry: all(test(entry) for test in tests)


def _term_test(name: str | None, arg: str | None, value: str) -> Callable[[LedgerEntry], bool]:
    if arg is not None:  # the ledger keeps one custom arg: other names match nothing
        return lambda e: arg == "notification_id" and e.notification_id == value
    if name == "msg_id":
        return lambda e: value in (e.provider_message_id, sg_message_id(e))
    if name == "status":
        return lambda e: ACTIVITY_STATUS[e.status()] == value
    if name in QUERY_FIELDS:
        return lambda e: getattr(e, QUERY_FIELDS[name]) == value
    raise ValueError(name)


def _listed(entry: LedgerEntry) -> dict[str, Any]:
    last = entry.deliver_at if entry.status() != "accepted" else entry.accepted_at
    return {"from_email": entry.sender, "msg_id": sg_message_id(entry), "subject": entry.subject,
            "to_email": entry.to, "status": ACTIVITY_STATUS[entry.status()], "opens_count": 0, "clicks_count": 0,
            "last_event_time": datetime.fromtimestamp(last, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}


async def filter_messages(request: web.Request) -> web.Response:
    sim = sim_of(request)
    if await sim.state.draw_fault(P) == "outage":
        return error(503, "Service Unavailable")
    if not _authorized(request):
        return error(401, "The provided authorization grant is invalid, expired, or revoked")
    try:
        limit = int(request.query.get("limit", "10"))
        wanted = _query_filter(request.query.get("query", ""))
    except ValueError:
        return error(400, "invalid query", "query")
    if not 1 <= limit <= 1000:
        return error(400, "limit must be between 1 and 1000", "limit")
    entries = [e for e in reversed(sim.state.query(provider=P)) if wanted(e)][:limit]  # newest first
    return json_response(200, {"messages": [_listed(e) for e in entries]})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/sendgrid/v3/mail/send", mail_send)
    app.router.add_get("/sendgrid/v3/messages", filter_messages)  # the list; {msg_id} needs one more segment
    app.router.add_get("/sendgrid/v3/messages/{msg_id}", message_activity)
