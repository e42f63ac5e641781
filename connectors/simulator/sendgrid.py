"""SendGrid v3 under /sendgrid, as the sendgrid SDK and its Mail helper see it.

POST /v3/mail/send (Authorization: Bearer <key>, the Mail JSON) answers 202 with an empty body and the message id
in X-Message-Id. Errors are {"errors": [{"message", "field", "help"}]}. GET /v3/messages/{msg_id} is the Email
Activity API (a paid add-on on real SendGrid) giving the message's status. Delivery events are POSTed as a JSON
array to the event webhook, signed as SendGrid's signed event webhook does: ECDSA P-256 / SHA-256 over
timestamp + body, base64 DER in X-Twilio-Email-Event-Webhook-Signature, timestamp in
X-Twilio-Email-Event-Webhook-Timestamp. The simulator's signing key is fixed, so its verification key can be the
default of NOTIFY_SENDGRID_WEBHOOK_PUBLIC_KEY. Custom args come back as top-level keys of each event.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
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
    message_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode()[:22]
    entry = sim.state.accept(P, message_id, notification_id=custom.get("notification_id"), to=to,
                             sender=str(mail["from"]["email"]), body=str(content[0].get("value", "")),
                             subject=mail.get("subject") or first.get("subject"),
                             fails=to.endswith("@" + BOUNCE_DOMAIN), test_mode=sandbox)
    if sandbox:  # sandbox mode: validated and answered 200, never delivered, no events
        return web.Response(status=200, headers={"X-Message-Id": message_id})
    sim.schedule_callback(entry, sim.state.faults[P].webhook_url, lambda e, _url: event_webhook(e, custom))
    if fault == "hang":
        entry.hung = True
        await sim.state.hang()
    return web.Response(status=202, headers={"X-Message-Id": message_id})


def _events(entry: LedgerEntry, custom: dict[str, Any]) -> list[dict[str, Any]]:
    sg_message_id = f"{entry.provider_message_id}.filterdrecv-7bf5c69d5-sim-1-{int(entry.accepted_at):X}-1.0"
    base = {"email": entry.to, "smtp-id": f"<{entry.provider_message_id}@sim.sendgrid.net>",
            "sg_message_id": sg_message_id, "category": [], **custom}
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


def event_webhook(entry: LedgerEntry, custom: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(_events(entry, custom)).encode()
    timestamp = str(int(time.time()))
    signature = SIGNING_KEY.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return body, {"Content-Type": "application/json",
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
    status = {"accepted": "processing", "delivered": "delivered", "failed": "not_delivered"}[entry.status()]
    events = [{"event_name": {"processed": "processed", "bounce": "bounced"}.get(e["event"], e["event"]),
               "processed": datetime.fromtimestamp(e["timestamp"], UTC).isoformat(), "reason": e.get("reason")}
              for e in _events(entry, {})]
    return json_response(200, {
        "from_email": entry.sender, "msg_id": entry.provider_message_id, "subject": entry.subject,
        "to_email": entry.to, "status": status, "opens_count": 0, "clicks_count": 0,
        "last_event_time": events[-1]["processed"], "events": events})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/sendgrid/v3/mail/send", mail_send)
    app.router.add_get("/sendgrid/v3/messages/{msg_id}", message_activity)
