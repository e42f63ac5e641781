"""Twilio Programmable Messaging, as the twilio SDK sees it, under /twilio.

POST /2010-04-01/Accounts/{AccountSid}/Messages.json (form: To, From or MessagingServiceSid, Body, StatusCallback)
answers 201 with the Message resource; GET .../Messages/{Sid}.json fetches it; GET .../Messages.json lists them in
Twilio's page shape, newest first, filtered by To, From and DateSent> (on or after a GMT date YYYY-MM-DD or an
ISO 8601 time; a message still queued has no date_sent, so it is left out), paged with PageSize (default 50, at
most 1000) and Page. Basic auth with the account SID and auth token. Errors are Twilio's JSON: {"code", "message",
"more_info", "status"}. The status callback is the form Twilio POSTs to StatusCallback, signed in
X-Twilio-Signature (HMAC-SHA1 of the URL and the sorted parameters with the auth token:
twilio.request_validator.RequestValidator). Our notification id travels in the StatusCallback URL (?nid=...), which
is how the ledger learns it. A create with the account's test credentials (shadow sends) is answered the same way
and recorded under /_admin/test-sends only: never delivered, never called back.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from aiohttp import web
from twilio.request_validator import RequestValidator

from connectors.simulator.common import (
    E164,
    MAGIC_INVALID,
    MAGIC_NO_PERMISSION,
    MAGIC_NOT_MOBILE,
    MAGIC_UNREACHABLE,
    MAGIC_UNSUBSCRIBED,
    Simulator,
    basic_auth,
    json_response,
    sim_of,
)
from connectors.simulator.state import LedgerEntry

P = "twilio"
API = "2010-04-01"


def error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status}
    return json_response(status, body, headers)


def _test_credentials(request: web.Request) -> bool:
    """Whether the request comes with the account's test credentials (a shadow send: answered, never delivered)."""
    settings = sim_of(request).settings
    return basic_auth(request) == (settings.twilio_test_account_sid, settings.twilio_test_auth_token)


def _auth_error(request: web.Request, *, test: bool = False) -> web.Response | None:
    sim = sim_of(request)
    creds = basic_auth(request)
    expected = ((sim.settings.twilio_test_account_sid, sim.settings.twilio_test_auth_token) if test
                else (sim.settings.twilio_account_sid, sim.settings.twilio_auth_token))
    if creds is None or creds != expected:
        body = {"code": 20003, "detail": "Your AccountSid or AuthToken was incorrect.", "message": "Authenticate",
                "more_info": "https://www.twilio.com/docs/errors/20003", "status": 401}
        return json_response(401, body, {"WWW-Authenticate": 'Basic realm="Twilio API"'})
    if request.match_info["account"] != creds[0]:
        return error(404, 20404, f"The requested resource {request.path} was not found")
    return None


def _recipient_error(to: str, sender: str) -> web.Response | None:
    if not E164.match(to) or to == MAGIC_INVALID:
        return error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
    if to == MAGIC_UNSUBSCRIBED:
        return error(400, 21610, "Attempt to send to unsubscribed recipient")
    if to == MAGIC_NOT_MOBILE:
        return error(400, 21614, f"'To' number {to} is not a valid mobile number")
    if to == MAGIC_UNREACHABLE:
        return error(400, 21612, f"The 'To' phone number: {to}, is not currently reachable using the 'From' phone "
                                 f"number: {sender} via SMS.")
    if to == MAGIC_NO_PERMISSION:
        return error(400, 21408, f"Permission to send an SMS has not been enabled for the region indicated by the "
                                 f"'To' number: {to}.")
    return None


def resource(entry: LedgerEntry, account_sid: str) -> dict[str, Any]:
    status = {"accepted": "queued", "delivered": "delivered", "failed": "undelivered"}[entry.status()]
    failed = status == "undelivered"
    return {
        "account_sid": account_sid, "api_version": API, "body": entry.body,
        "date_created": formatdate(entry.accepted_at, usegmt=True),
        "date_sent": formatdate(entry.deliver_at, usegmt=True) if status != "queued" else None,
        "date_updated": formatdate(entry.accepted_at, usegmt=True), "direction": "outbound-api",
        "error_code": 30003 if failed else None, "error_message": "Unreachable destination handset" if failed else None,
        "from": entry.sender, "messaging_service_sid": None, "num_media": "0", "num_segments": "1", "price": None,
        "price_unit": "USD", "sid": entry.provider_message_id, "status": status, "to": entry.to,
        "subresource_uris": {"media": f"/{API}/Accounts/{account_sid}/Messages/{entry.provider_message_id}/Media.json"},
        "uri": f"/{API}/Accounts/{account_sid}/Messages/{entry.provider_message_id}.json",
    }


async def create_message(request: web.Request) -> web.Response:
    sim = sim_of(request)
    fault = await sim.state.draw_fault(P)
    if fault == "outage":
        return error(503, 20503, "Service unavailable")
    if fault == "5xx":
        return error(500, 20500, "An internal server error has occurred")
    if fault == "429":
        retry = f"{sim.state.faults[P].retry_after_s:g}"
        return error(429, 20429, "Too Many Requests", {"Retry-After": retry})
    test = _test_credentials(request)  # messages create is the one resource test credentials may use
    if denied := _auth_error(request, test=test):
        return denied
    form = await request.post()
    to, sender = str(form.get("To", "")), str(form.get("From", form.get("MessagingServiceSid", "")))
    body, callback = str(form.get("Body", "")), form.get("StatusCallback")
    if not to:
        return error(400, 21604, "A 'To' phone number is required.")
    if not sender:
        return error(400, 21603, "A 'From' phone number is required.")
    if not body:
        return error(400, 21602, "Message body is required.")
    if len(body) > 1600:
        return error(400, 21617, "The concatenated message body exceeds the 1600 character limit.")
    if rejected := _recipient_error(to, sender):
        return rejected
    if fault == "permanent":
        return error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
    callback_url = str(callback) if callback else None
    nid = parse_qs(urlsplit(callback_url).query).get("nid", [None])[0] if callback_url else None
    entry = sim.state.accept(P, "SM" + secrets.token_hex(16), notification_id=nid, to=to, sender=sender, body=body,
                             test_mode=test)
    if not test:  # test credentials never deliver, so they never call back
        sim.schedule_callback(entry, callback_url, lambda e, url: status_callback(
            e, url, sim.settings.twilio_account_sid, sim.settings.twilio_auth_token))
    if fault == "hang":
        entry.hung = True
        await sim.state.hang()
    return json_response(201, resource(entry, sim.settings.twilio_test_account_sid if test
                                       else sim.settings.twilio_account_sid))


async def _read_refused(sim: Simulator, request: web.Request) -> web.Response | None:
    """What a read (fetch, list) gets instead of its answer: 503 in an outage, 401 with bad credentials."""
    if await sim.state.draw_fault(P) == "outage":
        return error(503, 20503, "Service unavailable")
    return _auth_error(request)


async def fetch_message(request: web.Request) -> web.Response:
    sim = sim_of(request)
    if refused := await _read_refused(sim, request):
        return refused
    entry = sim.state.find(P, request.match_info["sid"])
    if entry is None:
        return error(404, 20404, f"The requested resource {request.path.removeprefix('/twilio')} was not found")
    return json_response(200, resource(entry, sim.settings.twilio_account_sid))


def _date_bound(value: str) -> datetime:
    """A DateSent filter value as a UTC time: a GMT date (its midnight) or an ISO 8601 time; ValueError otherwise."""
    when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _sent_since(query: Any) -> Callable[[LedgerEntry], bool]:
    """The DateSent> filter of a list request ("DateSent>=YYYY-MM-DD" on the wire), on the date the message was sent.
    A message still queued has no date_sent, so the filter leaves it out."""
    bound = _date_bound(query["DateSent>"]) if query.get("DateSent>") else None

    def keep(entry: LedgerEntry) -> bool:
        if bound is None:
            return True
        return entry.status() != "accepted" and datetime.fromtimestamp(entry.deliver_at, UTC) >= bound

    return keep


def _page(request: web.Request, entries: list[LedgerEntry], account_sid: str) -> dict[str, Any]:
    """One page of Twilio's list shape (the SDK follows next_page_uri until it is null)."""
    size = min(int(request.query.get("PageSize", "50")), 1000)
    page = int(request.query.get("Page", "0"))
    if size < 1 or page < 0:
        raise ValueError("PageSize and Page must be positive")
    path = request.path.removeprefix("/twilio")
    filters = {k: v for k, v in request.query.items() if k not in ("Page", "PageSize", "PageToken")}

    def uri(number: int) -> str:
        return f"{path}?{urlencode({**filters, 'PageSize': size, 'Page': number})}"

    start = page * size
    shown = entries[start:start + size]
    more = len(entries) > start + size
    return {"messages": [resource(e, account_sid) for e in shown], "first_page_uri": uri(0),
            "next_page_uri": uri(page + 1) if more else None,
            "previous_page_uri": uri(page - 1) if page > 0 else None, "page": page, "page_size": size,
            "start": start, "end": start + max(len(shown) - 1, 0), "uri": uri(page)}


async def list_messages(request: web.Request) -> web.Response:
    sim = sim_of(request)
    if refused := await _read_refused(sim, request):
        return refused
    try:
        sent_in_range = _sent_since(request.query)
        entries = [e for e in sim.state.query(provider=P, to=request.query.get("To"), sender=request.query.get("From"))
                   if sent_in_range(e)]
        # Newest first, as Twilio lists them.
        page = _page(request, sorted(entries, key=lambda e: e.accepted_at, reverse=True),
                     sim.settings.twilio_account_sid)
    except ValueError:
        return error(400, 20001, "Invalid date value.")
    return json_response(200, page)


def status_callback(entry: LedgerEntry, url: str, account_sid: str, auth_token: str) -> tuple[bytes, dict[str, str]]:
    """The form Twilio POSTs to StatusCallback for the message's final status, with its X-Twilio-Signature."""
    status = "delivered" if entry.final_status == "delivered" else "undelivered"
    sid = entry.provider_message_id
    params = {"AccountSid": account_sid, "ApiVersion": API, "From": entry.sender, "MessageSid": sid,
              "MessageStatus": status, "SmsSid": entry.provider_message_id, "SmsStatus": status, "To": entry.to}
    if status == "undelivered":
        params["ErrorCode"] = "30003"
    signature = str(RequestValidator(auth_token).compute_signature(url, params))
    headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature,
               "I-Twilio-Idempotency-Token": str(uuid.uuid4()), "User-Agent": "TwilioProxy/1.1"}
    return urlencode(params).encode(), headers


def add_routes(app: web.Application) -> None:
    app.router.add_post(f"/twilio/{API}/Accounts/{{account}}/Messages.json", create_message)
    app.router.add_get(f"/twilio/{API}/Accounts/{{account}}/Messages.json", list_messages)
    app.router.add_get(f"/twilio/{API}/Accounts/{{account}}/Messages/{{sid}}.json", fetch_message)
