"""Firebase Cloud Messaging HTTP v1 under /fcm, as firebase-admin and google-auth see it.

POST /token is Google's OAuth2 token endpoint for service accounts: a form with
grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer and `assertion`, an RS256 JWT signed with the service
account's key (iss = client_email, aud = https://oauth2.googleapis.com/token, scope, iat, exp). The signature is
checked with the public part of the account the simulator accepts (NOTIFY_FCM_CREDENTIALS, default the simulator's
test account); the answer is {"access_token", "expires_in": 3599, "token_type": "Bearer"}, Google's
{"error": "invalid_grant", "error_description"} otherwise. Access tokens are HMAC-signed by the simulator, so they
stay valid for their hour across simulator restarts, as Google's do.

POST /v1/projects/{project}/messages:send (Authorization: Bearer <access token>) takes {"message": {...},
"validate_only": bool} and answers {"name": "projects/{project}/messages/{id}"}; validate_only (dry run) answers
"projects/{project}/messages/fake_message_id" as FCM does and records the message under /_admin/test-sends only.
Errors are Google's {"error": {"code", "message", "status", "details": [{"@type": ...FcmError, "errorCode"}]}}.

Magic registration tokens (or installation ids, "fid"): "unregistered..." -> 404 UNREGISTERED; "invalid..." (or
empty, or with whitespace) -> 400 INVALID_ARGUMENT; "mismatch..." -> 403 SENDER_ID_MISMATCH. Faults: outage ->
503 UNAVAILABLE, 5xx -> 500 INTERNAL, 429 -> 429 QUOTA_EXCEEDED with Retry-After, permanent -> UNREGISTERED,
hang -> accepted, recorded and never answered; a fault programmed for the token (device_faults) is answered the
same way once the request passed auth and validation. The ledger entry has the notification id of
data["notification_id"], the token as `to`, the notification's body and title, and the collapse key FCM got
(android.collapse_key, else apns-collapse-id). There are no delivery receipts: FCM has none.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from connectors.fcm_push import FCM_ERROR_TYPE, service_account
from connectors.simulator.common import SIM, Simulator, json_response, sim_of
from connectors.simulator.state import Fault

P = "fcm"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
TOKEN_LIFETIME_S = 3600
_TOKEN_SECRET = hashlib.sha256(b"notify-simulator:fcm-access-tokens").digest()
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"


@dataclass(frozen=True)
class Account:
    """The service account the simulator accepts, as Google knows it: its email, key id and public key."""

    email: str
    key_id: str | None
    public_key: rsa.RSAPublicKey


ACCOUNT = web.AppKey("fcm_account", Account)


def load_account(info: dict[str, Any]) -> Account:
    key = serialization.load_pem_private_key(str(info["private_key"]).encode(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("a service account key is an RSA key")
    return Account(str(info["client_email"]), info.get("private_key_id"), key.public_key())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def issue_access_token(email: str, now: float | None = None) -> str:
    claims = _b64(json.dumps({"sub": email, "exp": int((now or time.time()) + TOKEN_LIFETIME_S)}).encode())
    return f"ya29.sim.{claims}.{_b64(hmac.new(_TOKEN_SECRET, claims.encode(), hashlib.sha256).digest())}"


def access_token_subject(token: str) -> str | None:
    """The account an access token was issued to, or None when it is not ours or has expired."""
    prefix, _, rest = token.partition("ya29.sim.")
    claims, _, signature = rest.partition(".")
    expected = _b64(hmac.new(_TOKEN_SECRET, claims.encode(), hashlib.sha256).digest())
    if prefix or not claims or not hmac.compare_digest(signature, expected):
        return None
    data = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    return str(data["sub"]) if data.get("exp", 0) > time.time() else None


def grant_error(description: str, error: str = "invalid_grant") -> web.Response:
    return json_response(400, {"error": error, "error_description": description})


async def token(request: web.Request) -> web.Response:
    form = await request.post()
    if form.get("grant_type") != GRANT_TYPE:
        return grant_error(f"Invalid grant_type: {form.get('grant_type', '')}", "unsupported_grant_type")
    assertion = str(form.get("assertion", ""))
    account = request.app[ACCOUNT]
    try:
        head = jwt.get_unverified_header(assertion)
        claims = jwt.decode(assertion, account.public_key, algorithms=["RS256"],
                            audience=[GOOGLE_TOKEN_URI, str(request.url)],
                            options={"require": ["iss", "aud", "iat", "exp"]}, leeway=300)
    except jwt.ExpiredSignatureError:
        return grant_error("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable "
                           "timeframe. Check your iat and exp values in the JWT claim.")
    except jwt.InvalidTokenError:
        return grant_error("Invalid JWT Signature.")
    if claims["iss"] != account.email or (account.key_id and head.get("kid") not in (None, account.key_id)):
        return grant_error("Invalid grant: account not found")
    if int(claims["exp"]) - int(claims["iat"]) > TOKEN_LIFETIME_S:
        return grant_error("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable "
                           "timeframe. Check your iat and exp values in the JWT claim.")
    return json_response(200, {"access_token": issue_access_token(account.email), "expires_in": TOKEN_LIFETIME_S - 1,
                               "token_type": "Bearer"})


def error(status: int, canonical: str, message: str, fcm_code: str | None = None,
          details: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None) -> web.Response:
    items = ([{"@type": FCM_ERROR_TYPE, "errorCode": fcm_code}] if fcm_code else []) + (details or [])
    body: dict[str, Any] = {"code": status, "message": message, "status": canonical}
    if items:
        body["details"] = items
    return json_response(status, {"error": body}, headers)


def invalid(message: str, field: str) -> web.Response:
    return error(400, "INVALID_ARGUMENT", message, "INVALID_ARGUMENT",
                 [{"@type": BAD_REQUEST_TYPE, "fieldViolations": [{"field": field, "description": message}]}])


def _token_error(token: str) -> web.Response | None:
    if not token or re.search(r"\s", token) or token.startswith("invalid"):
        return invalid("The registration token is not a valid FCM registration token", "message.token")
    if token.startswith("unregistered"):
        return error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED")
    if token.startswith("mismatch"):
        return error(403, "PERMISSION_DENIED", "SenderId mismatch", "SENDER_ID_MISMATCH")
    return None


def _message_error(message: Any) -> web.Response | None:
    if not isinstance(message, dict):
        return invalid("Invalid JSON payload received. Unknown name \"message\"", "message")
    targets = [k for k in ("token", "fid", "topic", "condition") if message.get(k) is not None]
    if len(targets) != 1:
        return invalid("Exactly one of token, fid, topic or condition must be specified", "message")
    data = message.get("data", {})
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        return invalid("Invalid value at 'message.data': values must be strings", "message.data")
    return None


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _collapse_id(message: dict[str, Any]) -> str | None:
    android = _object(message.get("android"))
    value = android.get("collapse_key") or _object(_object(message.get("apns")).get("headers")).get("apns-collapse-id")
    return str(value) if value else None


def _busy(sim: Simulator, fault: Fault | None) -> web.Response | None:
    """FCM's answers to an outage, a 5xx or a 429 fault; None for the other faults."""
    if fault == "outage":
        return error(503, "UNAVAILABLE", "The service is currently unavailable.", "UNAVAILABLE")
    if fault == "5xx":
        return error(500, "INTERNAL", "Internal error encountered.", "INTERNAL")
    if fault == "429":
        retry = f"{sim.state.faults[P].retry_after_s:g}"
        return error(429, "RESOURCE_EXHAUSTED", "Quota exceeded for quota metric 'Send requests'.", "QUOTA_EXCEEDED",
                     headers={"Retry-After": retry})
    return None


async def send(request: web.Request) -> web.Response:
    sim = sim_of(request)
    fault = await sim.state.draw_fault(P)
    if (busy := _busy(sim, fault)) is not None:
        return busy
    auth = request.headers.get("Authorization", "")
    subject = access_token_subject(auth[7:]) if auth.startswith("Bearer ") else None
    if subject != request.app[ACCOUNT].email:
        return error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials. Expected OAuth 2 access "
                     "token, login cookie or other valid authentication credential.", headers={
                         "WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'})
    project = request.match_info["project"]
    if project != sim.settings.fcm_project_id:
        return error(403, "PERMISSION_DENIED", f"Permission 'cloudmessaging.messages.create' denied on resource "
                     f"'//cloudresourcemanager.googleapis.com/projects/{project}' (or it may not exist).")
    try:
        body: Any = await request.json()
    except ValueError:
        return error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
    if not isinstance(body, dict):
        return error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
    if invalid_message := _message_error(body.get("message")):
        return invalid_message
    message: dict[str, Any] = body["message"]
    to = str(message.get("token") or message.get("fid") or message.get("topic") or message.get("condition"))
    fault = sim.state.device_fault(P, to) or fault  # programmed for this token: replaces the draw
    if (busy := _busy(sim, fault)) is not None:
        return busy
    if ("token" in message or "fid" in message) and (rejected := _token_error(to)):
        return rejected
    if fault == "permanent":
        return error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED")
    notification = _object(message.get("notification"))
    data = message.get("data") or {}
    test_mode = body.get("validate_only") is True
    name = (f"projects/{project}/messages/fake_message_id" if test_mode
            else f"projects/{project}/messages/0:{int(time.time() * 1000)}%{secrets.token_hex(8)}")
    entry = sim.state.accept(P, name, notification_id=data.get("notification_id"), to=to, sender=project,
                             body=str(notification.get("body") or ""), subject=notification.get("title"),
                             test_mode=test_mode, collapse_id=_collapse_id(message))
    if fault == "hang":
        entry.hung = True
        await sim.state.hang()
    return json_response(200, {"name": name})


def add_routes(app: web.Application) -> None:
    app[ACCOUNT] = load_account(service_account(app[SIM].settings))
    app.router.add_post("/fcm/token", token)
    app.router.add_post("/fcm/v1/projects/{project}/messages:send", send)
