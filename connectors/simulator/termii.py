"""Termii's messaging API under /termii (https://developers.termii.com).

POST /api/sms/send, JSON {to, from, sms, type: "plain", channel: "generic"|"dnd"|"whatsapp", api_key} answers
200 {"code": "ok", "message_id", "message_id_str", "message": "Successfully Sent", "balance", "user"}.
GET /api/sms/inbox?api_key=...&message_id=... is Termii's message history (a JSON list; one message when
message_id is given). Termii documents HTTP codes (400, 401, 403, 404, 422, 429, 5xx) but not its error bodies:
the simulator answers {"code": "fail", "message": ...} with the documented wording where there is one ("Invalid
Sender Id"). Delivery reports are POSTed as JSON to the account's webhook with X-Termii-Signature, the
HMAC-SHA512 (hex) of the body with the account's secret key.

Termii has no field for a client reference, so our connectors send X-Notify-Reference: <notification id>, a header
real Termii ignores and the simulator puts in its ledger.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from connectors.simulator.common import MAGIC_INVALID, MAGIC_UNSUBSCRIBED, json_response, sim_of
from connectors.simulator.state import LedgerEntry

P = "termii"
DIGITS = re.compile(r"^[1-9]\d{9,14}$")  # international format without "+"
REFERENCE_HEADER = "X-Notify-Reference"


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response(status, {"code": "fail", "message": message}, headers)


def _stamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _status(entry: LedgerEntry) -> str:
    state = entry.status()
    if state == "accepted":
        return "Message Sent"
    if state == "delivered":
        return "Delivered"
    return "DND Active on Phone Number" if entry.to == MAGIC_UNSUBSCRIBED.lstrip("+") else "Failed"


async def send(request: web.Request) -> web.Response:
    sim = sim_of(request)
    fault = await sim.state.draw_fault(P)
    if fault == "outage":
        return error(503, "Service Unavailable")
    if fault == "5xx":
        return error(500, "Something went wrong on our end")
    if fault == "429":
        return error(429, "Too Many Requests", {"Retry-After": f"{sim.state.faults[P].retry_after_s:g}"})
    try:
        data: Any = await request.json()
    except ValueError:
        return error(400, "Malformed JSON payload")
    if not isinstance(data, dict):
        return error(400, "Malformed JSON payload")
    if data.get("api_key") != sim.settings.termii_api_key:
        return error(401, "Unauthorized: No valid API key provided")
    to, sender, sms = str(data.get("to", "")), str(data.get("from", "")), str(data.get("sms", ""))
    if not 3 <= len(sender) <= 11:
        return error(400, "Invalid Sender Id")
    if not sms:
        return error(422, "The sms field is required.")
    if data.get("type") != "plain" or data.get("channel") not in ("generic", "dnd", "whatsapp"):
        return error(422, "type must be plain and channel one of generic, dnd, whatsapp")
    if not DIGITS.match(to) or to == MAGIC_INVALID.lstrip("+") or fault == "permanent":
        return error(400, f"Invalid phone number: {to}")
    message_id = str(3017 * 10**21 + secrets.randbelow(10**21))
    entry = sim.state.accept(P, message_id, notification_id=request.headers.get(REFERENCE_HEADER), to=to,
                             sender=sender, body=sms, fails=to == MAGIC_UNSUBSCRIBED.lstrip("+"))
    sim.schedule_callback(entry, sim.state.faults[P].webhook_url,
                          lambda e, _url: delivery_report(e, sim.settings.termii_secret_key))
    if fault == "hang":
        entry.hung = True
        await sim.state.hang()
    return json_response(200, {"code": "ok", "message_id": message_id, "message_id_str": message_id,
                               "message": "Successfully Sent", "balance": 9999.0, "user": "Notify Simulator"})


def history_item(entry: LedgerEntry) -> dict[str, Any]:
    return {"sender": entry.sender, "receiver": entry.to, "message": entry.body, "amount": 1, "reroute": 0,
            "status": _status(entry), "sms_type": "plain", "send_by": "api", "media_url": None,
            "message_id": entry.provider_message_id, "notify_url": None, "notify_id": None,
            "created_at": _stamp(entry.accepted_at)}


async def inbox(request: web.Request) -> web.Response:
    sim = sim_of(request)
    if await sim.state.draw_fault(P) == "outage":
        return error(503, "Service Unavailable")
    if request.query.get("api_key") != sim.settings.termii_api_key:
        return error(401, "Unauthorized: No valid API key provided")
    wanted = request.query.get("message_id")
    entries = sim.state.query(provider=P, provider_message_id=wanted)
    return json_response(200, [history_item(e) for e in entries])


def delivery_report(entry: LedgerEntry, secret_key: str) -> tuple[bytes, dict[str, str]]:
    status = _status(entry)
    report = {"type": "outbound", "id": str(uuid.uuid4()), "message_id": entry.provider_message_id,
              "receiver": entry.to, "sender": entry.sender, "message": entry.body, "sent_at": _stamp(entry.deliver_at),
              "cost": "3.9", "status": "DELIVERED" if status == "Delivered" else status, "channel": "generic"}
    body = json.dumps(report).encode()
    signature = hmac.new(secret_key.encode(), body, hashlib.sha512).hexdigest()
    return body, {"Content-Type": "application/json", "X-Termii-Signature": signature}


def add_routes(app: web.Application) -> None:
    app.router.add_post("/termii/api/sms/send", send)
    app.router.add_get("/termii/api/sms/inbox", inbox)
