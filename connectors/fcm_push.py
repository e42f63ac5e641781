"""Push through Firebase Cloud Messaging with the official SDK (firebase_admin.messaging, HTTP v1, its async API).

Sending: `messaging.send_each_async([message], dry_run=..., app=...)` POSTs {"message": ..., "validate_only": ...} to
projects/{project}/messages:send with httpx (HTTP/2 over TLS) from inside the event loop; the answer's `name`
("projects/{project}/messages/{id}") is the provider message id. `Message.test_mode` is `dry_run=True`
(validate_only): FCM checks the message and the token and answers, but delivers nothing (shadow mode).

Pointing the SDK at another host: firebase-admin has no option or emulator variable for FCM (FIREBASE_AUTH_EMULATOR_HOST
and FIREBASE_DATABASE_EMULATOR_HOST cover Auth and the Realtime Database only). `_MessagingService.__init__` builds
`self._fcm_url = FCM_URL.format(project_id)` from the constant https://fcm.googleapis.com/v1/projects/{}/messages:send
and every send passes that attribute as its URL, so we set it to NOTIFY_FCM_BASE_URL + the same path (by default the
simulator's /fcm), much as twilio_sms.py sets the Twilio client's `api.base_url`. The body, headers, auth and error
parsing stay the SDK's. We also give the service an `_async_client` of our own (the SDK's `HttpxAsyncClient`) for
two gaps of the default one: it retries 500 and 503 up to four times with backoff (seconds spent inside one
send, hiding an outage from our fallback and circuit breaker, which decide retries themselves), and its single
120 s timeout cannot tell a refused connection (transient) from a lost answer (ambiguous). Both attributes are
checked when the connector is built, so an SDK upgrade that renames them fails at start-up, not at send time.

Credentials: a service-account JSON (NOTIFY_FCM_CREDENTIALS). google-auth signs an RS256 assertion with its key and
POSTs it to the account's `token_uri` (grant_type jwt-bearer) for a one-hour OAuth2 access token. The SDK would
do that refresh synchronously inside its httpx auth flow, blocking the event loop, so we refresh it ourselves in
a worker thread whenever the token is missing or within google-auth's refresh margin of its expiry (one thread
at a time, under a lock): the SDK then finds a valid token and only adds the header. (It still refreshes inline,
blocking, if FCM answers 401 to a token it thought valid, e.g. a revoked key: rare, and the send fails anyway.)
After a refresh google-auth also looks up the account's Regional Access Boundary at iamcredentials.googleapis.com
in a daemon thread of its own, off the loop; against the simulator that lookup fails and backs off for 30 minutes.
Unset, the simulator's test account is used, its token requests sent to the simulator (<FCM base URL>/token).

Collapse: `android.collapse_key` and the APNs `apns-collapse-id` header are `collapse_key or notification_id`, so a
resend after an ambiguous outcome replaces the first notification on the device instead of showing a second one
(ARCHITECTURE.md, "Delivery semantics"). Webpush `Topic` is not set: it allows 32 URL-safe characters only.
Our notification id also travels in `data`, where the app (and the simulator's ledger) read it.

Status and receipts: FCM has neither (no status API, no delivery webhooks; BigQuery export is a daily batch).
`_status` raises ProviderQueryError rather than inventing an answer: an accepted send is as final as FCM gets,
and an ambiguous one cannot be settled by asking FCM; the collapse id is what keeps a resend harmless.
`find` keeps the base default (ProviderQueryError) for the same reason: FCM lists nothing it accepted.
"""

from __future__ import annotations

import asyncio
import json
import uuid
import warnings
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import firebase_admin
import google.auth.exceptions
import httpx
from firebase_admin import credentials, messaging
from firebase_admin import exceptions as firebase_exceptions
from firebase_admin._http_client import HttpxAsyncClient
from firebase_admin._retry import HttpxRetry
from google.auth.transport import requests as google_requests

from connectors.base import (
    Connector,
    DeliveryStatus,
    Message,
    Outcome,
    OutcomeKind,
    ProviderQueryError,
    Reason,
    Receipt,
    accepted,
    classify_httpx_exception,
    classify_status,
    collapse_id,
    header,
    json_object,
    limits,
    parse_retry_after,
    small,
)
from pipeline.config import REPO_ROOT, Settings

NAME = "fcm"
SIMULATOR_ACCOUNT = REPO_ROOT / "connectors" / "simulator" / "keys" / "fcm-service-account.json"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
# FCM's errorCode (details[].errorCode) and the canonical status, as (kind, reason). A token that no longer exists
# or is not an FCM token is the recipient's problem; credentials, APNs/web push keys of the Firebase project and a
# token of another project are ours (see SENDER_ID_MISMATCH below).
CODES: dict[str, tuple[OutcomeKind, Reason]] = {
    "UNREGISTERED": ("permanent", "invalid_recipient"),  # 404: the app was uninstalled or the token expired
    "SENDER_ID_MISMATCH": ("permanent", "invalid_recipient"),  # 403: the token belongs to another Firebase project
    "THIRD_PARTY_AUTH_ERROR": ("permanent", "auth"),  # 401: the project's APNs key or web push credentials
    "APNS_AUTH_ERROR": ("permanent", "auth"),  # legacy name of the above
    "QUOTA_EXCEEDED": ("transient", "rate_limited"),  # 429, with Retry-After
    "UNAVAILABLE": ("transient", "server_error"),  # 503
    "INTERNAL": ("transient", "server_error"),  # 500
    "UNAUTHENTICATED": ("permanent", "auth"),
    "PERMISSION_DENIED": ("permanent", "auth"),
    "RESOURCE_EXHAUSTED": ("transient", "rate_limited"),
}


def service_account(settings: Settings) -> dict[str, Any]:
    """The service-account JSON in force: NOTIFY_FCM_CREDENTIALS, else the simulator's test account, whose token
    requests go to the simulator (<FCM base URL>/token) wherever it listens."""
    if settings.fcm_credentials is not None:
        info: dict[str, Any] = json.loads(settings.fcm_credentials.read_text())
        return info
    info = json.loads(SIMULATOR_ACCOUNT.read_text())
    info["token_uri"] = f"{settings.provider_base_url(NAME)}/token"
    return info


def build_message(msg: Message, ttl_s: int) -> messaging.Message:
    """The SDK's Message for one registration token (`msg.to`)."""
    data = {"notification_id": msg.notification_id}
    if msg.template_id:
        data["template_id"] = msg.template_id
    collapse = collapse_id(msg)
    with warnings.catch_warnings():
        # firebase-admin 7.7 deprecates Message.token for Message.fid (a Firebase installation ID). Apps register
        # FCM registration tokens with us (FirebaseMessaging.getToken()), which is what FCM's "token" targets.
        warnings.filterwarnings("ignore", "Message.token is deprecated", DeprecationWarning)
        return messaging.Message(
            token=msg.to,
            notification=messaging.Notification(title=msg.subject, body=msg.body),
            data=data,
            android=messaging.AndroidConfig(collapse_key=collapse, priority="high", ttl=timedelta(seconds=ttl_s)),
            apns=messaging.APNSConfig(headers={"apns-collapse-id": collapse, "apns-priority": "10"}),
        )


def classify(status: int, body: str | Mapping[str, Any] | None, headers: Mapping[str, str] | None = None) -> Outcome:
    """An FCM v1 answer to messages:send as an Outcome (pure).

    Errors are Google's {"error": {"code", "message", "status", "details": [{"@type": ...FcmError, "errorCode"}]}};
    FCM's errorCode decides when present, then the canonical status, then the HTTP status.
    """
    headers = headers or {}
    payload = json_object(body)
    if 200 <= status < 300:
        name = payload.get("name")
        if isinstance(name, str) and name:
            return accepted(NAME, name, small(payload))
        return Outcome("ambiguous", NAME, "server_error", error_code=str(status),
                       error_message="2xx answer without a message name", raw=small(payload))
    error: dict[str, Any] = payload["error"] if isinstance(payload.get("error"), dict) else {}
    details: list[Any] = error["details"] if isinstance(error.get("details"), list) else []
    fcm_code = next((str(d.get("errorCode")) for d in details
                     if isinstance(d, dict) and d.get("@type") == FCM_ERROR_TYPE and d.get("errorCode")), None)
    canonical = str(error.get("status") or "") or None
    message = str(error.get("message") or payload.get("message") or "") or None
    code = fcm_code or canonical or str(status)
    retry_after = header(headers, "Retry-After")
    for key in (fcm_code, canonical):
        if key in CODES:
            kind, reason = CODES[key]
            return Outcome(kind, NAME, reason, error_code=code, error_message=message, raw=small(payload),
                           retry_after_s=parse_retry_after(retry_after) if kind == "transient" else None)
    if "INVALID_ARGUMENT" in (fcm_code, canonical):
        # The same code covers a malformed token and a malformed message; FCM names the field in BadRequest
        # fieldViolations ("message.token") and in its message ("...not a valid FCM registration token").
        fields = [str(v.get("field", "")) for d in details if isinstance(d, dict)
                  for v in d.get("fieldViolations", []) if isinstance(v, dict)]
        bad_token = "message.token" in fields or "registration token" in (message or "").lower()
        return Outcome("permanent", NAME, "invalid_recipient" if bad_token else "bad_request", error_code=code,
                       error_message=message, raw=small(payload))
    return classify_status(NAME, status, retry_after=retry_after, error_code=code, error_message=message,
                           raw=small(payload))


def classify_error(exc: BaseException) -> Outcome:
    """What the SDK raised or returned for one send: the HTTP answer when there was one, else its cause."""
    if isinstance(exc, firebase_exceptions.FirebaseError):
        response = exc.http_response
        if isinstance(response, httpx.Response):
            return classify(response.status_code, response.text, response.headers)
        if exc.cause is not None:
            return classify_error(exc.cause)
        return Outcome("ambiguous", NAME, "connection_lost", error_code=str(exc.code), error_message=str(exc))
    if isinstance(exc, httpx.HTTPError | httpx.InvalidURL):
        return classify_httpx_exception(NAME, exc)
    if isinstance(exc, google.auth.exceptions.TransportError):
        # The token endpoint could not be reached: nothing went to FCM.
        return Outcome("transient", NAME, "connection", error_code="token_endpoint", error_message=str(exc))
    if isinstance(exc, google.auth.exceptions.RefreshError):
        # The token endpoint refused the assertion (invalid_grant: unknown key, disabled account) or kept failing.
        if exc.retryable:
            return Outcome("transient", NAME, "server_error", error_code="token_endpoint", error_message=str(exc))
        return Outcome("permanent", NAME, "auth", error_code="invalid_grant", error_message=str(exc))
    if isinstance(exc, google.auth.exceptions.GoogleAuthError):  # a key google-auth cannot use
        return Outcome("permanent", NAME, "auth", error_code="credentials", error_message=str(exc))
    # Something broke while the request may have been out (an unreadable 2xx, an SDK surprise): not known unsent.
    return Outcome("ambiguous", NAME, "connection_lost", error_code="unknown",
                   error_message=f"{type(exc).__name__}: {exc}")


class _TokenRequest(google_requests.Request):
    """google-auth's requests transport with our timeouts (its default is 120 s per token request)."""

    def __init__(self, timeout: tuple[float, float]) -> None:
        super().__init__()
        self._timeout = timeout

    def __call__(self, url: str, method: str = "GET", body: Any = None, headers: Any = None, timeout: Any = None,
                 **kwargs: Any) -> Any:
        return super().__call__(  # type: ignore[no-untyped-call]  # google-auth leaves it unannotated
            url, method=method, body=body, headers=headers, timeout=self._timeout, **kwargs)


class FcmPush(Connector):
    name = NAME
    channel = "push"
    supports_test_mode = True  # dry_run / validate_only

    def __init__(self, *, base_url: str, project_id: str, service_account: Mapping[str, Any], timeout_s: float,
                 connect_timeout_s: float, max_concurrency: int, ttl_s: int = 86400) -> None:
        super().__init__(timeout_s=timeout_s, connect_timeout_s=connect_timeout_s, max_concurrency=max_concurrency)
        self.ttl_s = ttl_s
        self.credential = credentials.Certificate(dict(service_account))
        self.google_credential = self.credential.get_credential()
        self.app = firebase_admin.initialize_app(self.credential, {"projectId": project_id},
                                                 name=f"notify-fcm-{uuid.uuid4().hex}")
        service = messaging._get_messaging_service(self.app)
        if not (hasattr(service, "_fcm_url") and hasattr(service, "_async_client")):
            raise RuntimeError("firebase_admin.messaging changed: no _fcm_url/_async_client to point at "
                               f"{base_url}; check the SDK version against requirements.lock")
        service._fcm_url = f"{base_url.rstrip('/')}/v1/projects/{project_id}/messages:send"
        self.client = HttpxAsyncClient(
            credential=self.google_credential,
            timeout=httpx.Timeout(timeout_s, connect=self.connect_timeout_s),  # typed int, passed to httpx as is
            retry_config=HttpxRetry(max_retries=0),
        )
        service._async_client = self.client
        self._token_request = _TokenRequest((self.connect_timeout_s, timeout_s))
        self._refreshing = asyncio.Lock()
        self._deleted = False

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> FcmPush:
        kwargs: dict[str, Any] = {
            "base_url": settings.provider_base_url(NAME), "project_id": settings.fcm_project_id,
            "service_account": service_account(settings), **limits(settings),
        }
        return cls(**{**kwargs, **overrides})

    async def _access_token(self) -> None:
        """A valid OAuth2 token before the SDK looks (refreshed in a thread: google-auth's transport blocks)."""
        if self.google_credential.valid:
            return
        async with self._refreshing:
            if not self.google_credential.valid:
                await asyncio.to_thread(self.google_credential.refresh, self._token_request)

    async def _send(self, msg: Message) -> Outcome:
        if not msg.to.strip():
            return Outcome("permanent", NAME, "invalid_recipient", error_code="empty_token",
                           error_message="no registration token")
        try:
            await self._access_token()
        except google.auth.exceptions.GoogleAuthError as exc:
            return classify_error(exc)
        try:
            async with asyncio.timeout(self.timeout_s):
                batch = await messaging.send_each_async([build_message(msg, self.ttl_s)], dry_run=msg.test_mode,
                                                        app=self.app)
        except ValueError as exc:  # the SDK refused to encode the message
            return Outcome("permanent", NAME, "bad_request", error_code="invalid_message", error_message=str(exc))
        except firebase_exceptions.FirebaseError as exc:  # UnknownError around something unexpected
            return classify_error(exc)
        [response] = batch.responses
        if response.success:
            return accepted(NAME, str(response.message_id), {"name": str(response.message_id)})
        return classify_error(response.exception)

    async def _status(self, provider_message_id: str) -> DeliveryStatus:
        raise ProviderQueryError(f"FCM has no status API (asked about {provider_message_id})")

    async def close(self) -> None:
        await super().close()
        await self.client.aclose()
        if not self._deleted:
            self._deleted = True
            # delete_app closes the messaging service, whose close() calls asyncio.run(): not inside our loop.
            await asyncio.to_thread(firebase_admin.delete_app, self.app)

    def verify_receipt(self, url: str, body: bytes, headers: Mapping[str, str]) -> bool:
        return False  # FCM sends no delivery webhooks

    def parse_receipt(self, url: str, body: bytes, headers: Mapping[str, str]) -> list[Receipt]:
        return []
