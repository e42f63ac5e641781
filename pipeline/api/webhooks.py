"""Provider webhook receivers: delivery receipts, verified, onto the receipts topic; 200 once Kafka holds them.

POST /webhooks/{provider}   provider: twilio, termii, sendgrid, mailgun   -> 200 {"accepted": n}

`settings.webhook_url(provider)` (<NOTIFY_WEBHOOK_BASE_URL>/<provider>) is the URL the providers call and sign, so
a deployment sets NOTIFY_WEBHOOK_BASE_URL=https://<public host>/webhooks. The routes need no API key: a request
is authenticated by the provider's own signature (`Connector.verify_receipt`), checked against that public URL
plus the request's query string (Twilio signs the full URL, our `?nid=` included); without the setting, against
the URL the request itself was made to.

403: unsigned, forged, or a body too broken to check; a SendGrid or Mailgun request signed more than
NOTIFY_WEBHOOK_MAX_AGE_S ago (or ahead). A signature seen before (kept in Redis for twice that; Twilio and Termii,
which sign no time, for a day) is a replay: 200 with accepted 0, nothing produced. Without Redis the replay
check is skipped (counted): receipts keep flowing, and the receipts stage ignores what changes nothing.
400: signed, but a receipt we cannot read or encode.
404: a provider without receipts (fcm, apns). 413: body over MAX_BODY_BYTES. 503 with Retry-After: Kafka did not
take every receipt (the providers retry on any non-2xx). A request whose events we do not map: 200, accepted 0.
Each receipt becomes one ProviderReceipt record keyed by our notification id when the receipt carries it,
otherwise by the provider's message id.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

import redis.asyncio as aioredis
from aiohttp import web
from confluent_kafka import KafkaException
from redis.exceptions import RedisError

from connectors.base import Connector, Receipt
from connectors.factory import create_connector
from pipeline import metrics
from pipeline.api import auth
from pipeline.api.ingest import KAFKA_RETRY_AFTER_S, MAX_BODY_BYTES, json_error
from pipeline.config import Settings
from pipeline.domain import PROVIDERS
from pipeline.kafka import serde, topics
from pipeline.kafka.upstream import AckedProducer, ProducerClosed
from pipeline.state import redis_client

log = logging.getLogger(__name__)

RECEIPT_PROVIDERS: Final = ("twilio", "termii", "sendgrid", "mailgun")  # the ReceiptProvider enum
# Short enough to answer (503) before the providers' own webhook timeouts (10 to 15 s) when Kafka is away.
DELIVERY_TIMEOUT_S: Final = 5.0
# Headers that carry the signature; mailgun signs inside the JSON body instead.
_SIGNATURE_HEADERS: Final[Mapping[str, tuple[str, ...]]] = {
    "twilio": ("X-Twilio-Signature",), "termii": ("X-Termii-Signature",),
    "sendgrid": ("X-Twilio-Email-Event-Webhook-Signature", "X-Twilio-Email-Event-Webhook-Timestamp"),
}

REJECTED = metrics.counter("notify_webhook_rejected_total", "Webhook requests refused, by provider and reason "
                   "(unsigned, bad_signature, stale, unparsable, replay: answered 200, changes nothing).",
                   ["provider", "reason"])
REPLAY_UNCHECKED = metrics.counter(
    "notify_webhook_replay_unchecked_total", "Signed, fresh webhooks let through without the replay check because "
    "Redis could not be asked (receipts keep flowing; the receipts stage ignores a receipt that changes nothing).",
    ["provider"])
# Twilio and Termii sign no time: their signatures are remembered this long.
UNTIMED_REPLAY_MEMORY_S: Final = 86_400
RECEIPTS = metrics.counter(
    "notify_webhook_receipts_total", "Receipts Kafka acknowledged, by provider and mapped status.",
                   ["provider", "status"])


async def produce_all(producer: AckedProducer, records: Sequence[tuple[str, bytes, bytes]]) -> str | None:
    """Produce (topic, key, value) records and await every acknowledgement (bounded): None when Kafka took them
    all, otherwise why not."""
    futures = []
    for topic, key, value in records:
        try:
            futures.append(producer.produce(topic, key, value))
        except BufferError:
            return "the producer's queue is full"
        except KafkaException as exc:
            return str(exc.args[0])
        except ProducerClosed as exc:
            return str(exc)
    if not futures:
        return None
    _, pending = await asyncio.wait(futures, timeout=producer.wait_s)
    if pending:
        return f"no acknowledgement within {producer.wait_s:.0f} s"
    errors = [error for error in (f.result() for f in futures) if error is not None]
    return errors[0].str() if errors else None


@dataclass
class WebhookState:
    """What the handler shares; the connectors and the producer exist while the app runs.
    `delivery_timeout_s` applies to the producer made at startup."""

    settings: Settings
    delivery_timeout_s: float = DELIVERY_TIMEOUT_S
    connectors: dict[str, Connector] = field(default_factory=dict)
    producer: AckedProducer | None = None
    codec: serde.AvroSerde | None = None
    redis: aioredis.Redis | None = None


WEBHOOKS = web.AppKey("notify.webhooks", WebhookState)


def public_url(settings: Settings, provider: str, request: web.Request) -> str:
    """The URL the provider called and signed: the configured public URL with the request's query string, or
    (without NOTIFY_WEBHOOK_BASE_URL) the URL the request was made to. Both exactly as sent (raw)."""
    base = settings.webhook_url(provider)
    if base is None:
        return f"{request.scheme}://{request.host}{request.raw_path}"
    query = request.rel_url.raw_query_string
    return f"{base}?{query}" if query else base


def _reject(provider: str, reason: str, message: str, status: type[web.HTTPException] = web.HTTPForbidden
            ) -> NoReturn:
    REJECTED.labels(provider, reason).inc()
    json_error(status, message)


@dataclass(frozen=True)
class Signature:
    """What identifies one signed webhook request, and when its provider says it signed it (None: the scheme
    signs no time)."""

    identity: str
    signed_at: float | None


def signature_of(provider: str, body: bytes, headers: Mapping[str, str]) -> Signature:
    """The request's signature identity (a digest of what the provider signed with: Mailgun's token, else the
    signature headers) and its signed time; call after the signature verified. Pure."""
    if provider == "mailgun":
        signature = json.loads(body)["signature"]
        material, stamp = f"{signature['token']}", signature.get("timestamp")
    else:
        material = "\n".join(headers.get(name, "") for name in _SIGNATURE_HEADERS[provider])
        stamp = headers.get("X-Twilio-Email-Event-Webhook-Timestamp") if provider == "sendgrid" else None
    try:
        signed_at = None if stamp is None else float(stamp)
    except (TypeError, ValueError):
        signed_at = float("nan")  # signed, but not a time: never fresh
    return Signature(hashlib.sha256(f"{provider}\n{material}".encode()).hexdigest(), signed_at)


def is_fresh(signature: Signature, now: float, max_age_s: float) -> bool:
    """Whether a timed signature is within max_age_s of now (either way: clocks drift); untimed ones always are."""
    return signature.signed_at is None or abs(now - signature.signed_at) <= max_age_s


def replay_key(settings: Settings, signature: Signature) -> str:
    return f"{settings.topic_prefix}notify:webhook:{signature.identity}"


async def _first_use(state: WebhookState, provider: str, signature: Signature) -> bool | None:
    """Remember the signature; False when it was remembered already (a replay), None when Redis cannot say.

    The value is this request's own token: when a SET that Redis did apply times out and the client re-sends it,
    the second SET finds the key, and the token says it is ours, not a replay."""
    ttl = (UNTIMED_REPLAY_MEMORY_S if signature.signed_at is None
           else max(1, math.ceil(2 * state.settings.webhook_max_age_s)))
    key, token = replay_key(state.settings, signature), uuid.uuid4().bytes
    try:
        assert state.redis is not None
        if await state.redis.set(key, token, nx=True, ex=ttl):
            return True
        return bool(await state.redis.get(key) == token)
    except (RedisError, OSError, AssertionError) as exc:
        log.warning("%s webhook replay check skipped: %s", provider, exc)
        REPLAY_UNCHECKED.labels(provider).inc()
        return None


async def _forget(state: WebhookState, signature: Signature) -> None:
    """Let the provider's retry of a request we could not finish through."""
    with contextlib.suppress(RedisError, OSError, AttributeError):
        await state.redis.delete(replay_key(state.settings, signature))  # type: ignore[union-attr]


def _signed(provider: str, body: bytes, headers: Mapping[str, str]) -> bool:
    """Whether the request carries a signature at all (ValueError: the body cannot even be read for one)."""
    if provider == "mailgun":
        payload = json.loads(body)
        signature = payload.get("signature") if isinstance(payload, dict) else None
        return isinstance(signature, dict) and bool(signature.get("signature"))
    return all(headers.get(name) for name in _SIGNATURE_HEADERS[provider])


async def _read_body(request: web.Request) -> bytes:
    too_large = {"error": f"body larger than {MAX_BODY_BYTES} bytes", "max_size": MAX_BODY_BYTES}
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=request.content_length,
                                            text=json.dumps(too_large), content_type="application/json")
    try:
        return await request.read()  # aiohttp stops reading at the app's client_max_size
    except web.HTTPRequestEntityTooLarge:  # chunked, without Content-Length
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=MAX_BODY_BYTES + 1,
                                            text=json.dumps(too_large), content_type="application/json") from None


def _record(settings: Settings, codec: serde.AvroSerde, receipt: Receipt, received_at: datetime.datetime
            ) -> tuple[str, bytes, bytes]:
    """(topic, key, value) of one receipt; serde.EncodeError when it does not fit the schema."""
    notification_id = None
    if receipt.notification_id:
        try:
            notification_id = uuid.UUID(receipt.notification_id)
        except ValueError:  # not one of ours: found through provider_message_id instead
            log.warning("%s receipt for %s names notification id %r, not a UUID: ignored", receipt.provider,
                        receipt.provider_message_id, receipt.notification_id)
    value: dict[str, Any] = {
        "provider": receipt.provider, "provider_message_id": receipt.provider_message_id,
        "notification_id": notification_id, "status": receipt.status, "raw_status": receipt.raw_status,
        "error_code": receipt.error_code, "error_message": receipt.error_message,
        "occurred_at": receipt.occurred_at, "received_at": received_at,
    }
    key = str(notification_id) if notification_id else receipt.provider_message_id
    return (settings.topic(topics.RECEIPTS), key.encode("utf-8"),
            codec.encode(serde.PROVIDER_RECEIPT, value))


async def receive(request: web.Request) -> web.Response:
    provider = request.match_info["provider"]
    if provider not in RECEIPT_PROVIDERS:
        json_error(web.HTTPNotFound, f"no webhook for {provider!r}: receipts come from "
                   f"{', '.join(RECEIPT_PROVIDERS)}")
    state = request.app[WEBHOOKS]
    connector, producer, codec = state.connectors.get(provider), state.producer, state.codec
    if connector is None or producer is None or codec is None:  # only while starting or stopping
        json_error(web.HTTPServiceUnavailable, "the API is not ready",
                   headers={"Retry-After": str(KAFKA_RETRY_AFTER_S)})
    body = await _read_body(request)
    url, headers = public_url(state.settings, provider, request), request.headers
    try:
        signed = _signed(provider, body, headers)
        valid = signed and connector.verify_receipt(url, body, headers)
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested past the parser...: never signed
        _reject(provider, "unparsable", f"cannot read the body to check its signature: {exc}")
    if not signed:
        _reject(provider, "unsigned", f"no {provider} signature")
    if not valid:
        _reject(provider, "bad_signature", f"the {provider} signature does not match {url}")
    received_at = datetime.datetime.now(datetime.UTC)
    signature = signature_of(provider, body, headers)
    if not is_fresh(signature, received_at.timestamp(), state.settings.webhook_max_age_s):
        _reject(provider, "stale", f"signed at {signature.signed_at}, more than "
                f"{state.settings.webhook_max_age_s:.0f} s from now: refused as a possible replay")
    try:
        receipts = connector.parse_receipt(url, body, headers)
        records = [_record(state.settings, codec, receipt, received_at) for receipt in receipts]
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError, serde.EncodeError) as exc:
        # Not the body itself in the log: receipts carry phone numbers and addresses.
        log.error("signed %s webhook of %d bytes we cannot read: %s", provider, len(body), exc)
        _reject(provider, "unparsable", f"signed, but not a {provider} receipt we can read: {exc}",
                web.HTTPBadRequest)
    if await _first_use(state, provider, signature) is False:
        REJECTED.labels(provider, "replay").inc()
        return web.json_response({"accepted": 0, "replayed": True})
    error = await produce_all(producer, records)
    if error is not None:
        await _forget(state, signature)
        log.warning("%d %s receipt(s) not produced: %s", len(records), provider, error)
        json_error(web.HTTPServiceUnavailable, f"Kafka did not take the receipts: {error}",
                   headers={"Retry-After": str(KAFKA_RETRY_AFTER_S)})
    for receipt in receipts:
        RECEIPTS.labels(provider, receipt.status).inc()
    return web.json_response({"accepted": len(receipts)})


def setup(app: web.Application, settings: Settings) -> None:
    """Add the webhook routes (public: call after auth.setup); the connectors and the receipts producer are made
    when the app starts, and flushed and closed when it stops."""
    app[WEBHOOKS] = WebhookState(settings)
    # Every provider name, so that fcm and apns get their 404 without a key.
    app[auth.PUBLIC_PATHS].update(f"/webhooks/{provider}" for provider in PROVIDERS)
    app.router.add_post("/webhooks/{provider}", receive)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        state = app[WEBHOOKS]
        state.codec = serde.serde(state.settings)
        state.connectors = {p: create_connector(p, state.settings) for p in RECEIPT_PROVIDERS}
        state.producer = AckedProducer(state.settings, delivery_timeout_s=state.delivery_timeout_s)
        state.redis = redis_client.async_client(state.settings.redis_dsn)
        yield
        owned, state.producer = state.producer, None  # new requests get 503 from here on
        connectors, state.connectors = state.connectors, {}
        remaining = await asyncio.to_thread(owned.close)
        if remaining:
            log.error("receipts producer closed with %d record(s) unacknowledged", remaining)
        for connector in connectors.values():
            await connector.close()
        if state.redis is not None:
            await state.redis.aclose()

    app.cleanup_ctx.append(lifecycle)
