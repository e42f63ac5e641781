"""The webhook receiver of the raw baseline chain (`python -m pipeline.bench.baseline --hop receiver`): the
simulator's delivery callbacks on the API's port, signatures checked, each produced to receipts and acknowledged
before the answer."""

from __future__ import annotations

import asyncio
import datetime
import json
import signal
import threading
from urllib.parse import parse_qs, parse_qsl, urlsplit

from aiohttp import web
from confluent_kafka import KafkaError, Message, Producer

from connectors.factory import create_connector
from pipeline import config
from pipeline.kafka import clients, serde, topics


async def run_receiver(port: int) -> None:
    """The simulator's callbacks: checked (the providers' signatures), produced to receipts, acknowledged, 200."""
    settings = config.settings()
    producer: Producer = clients.producer(settings)
    codec = serde.AvroSerde()
    verifiers = {p: create_connector(p, settings) for p in ("twilio", "sendgrid")}
    loop = asyncio.get_running_loop()
    receipts_topic = settings.topic(topics.RECEIPTS)
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            producer.poll(0.05)

    threading.Thread(target=poll, daemon=True).start()

    def produce(key: bytes, value: bytes) -> asyncio.Future[KafkaError | None]:
        done: asyncio.Future[KafkaError | None] = loop.create_future()
        def acked(error: KafkaError | None, _message: Message) -> None:
            loop.call_soon_threadsafe(done.set_result, error)

        producer.produce(receipts_topic, value, key, on_delivery=acked)
        return done

    def receipt(provider: str, pid: str, nid: str | None, raw: str) -> bytes:
        now = datetime.datetime.now(datetime.UTC)
        return codec.encode(serde.PROVIDER_RECEIPT, {
            "provider": provider, "provider_message_id": pid, "notification_id": nid,
            "status": "delivered" if raw == "delivered" else "other", "raw_status": raw, "error_code": None,
            "error_message": None, "occurred_at": now, "received_at": now}, trusted=True)

    async def twilio(request: web.Request) -> web.Response:
        body = await request.read()
        url = f"{settings.webhook_url('twilio')}?{request.query_string}"
        if not verifiers["twilio"].verify_receipt(url, body, request.headers):
            return web.Response(status=403)
        form = dict(parse_qsl(body.decode()))
        nid = parse_qs(urlsplit(url).query).get("nid", [None])[0]
        await produce((nid or "").encode(), receipt("twilio", form["MessageSid"], nid, form.get("MessageStatus", "")))
        return web.Response(status=200)

    async def sendgrid(request: web.Request) -> web.Response:
        body = await request.read()
        if not verifiers["sendgrid"].verify_receipt(settings.webhook_url("sendgrid") or "", body, request.headers):
            return web.Response(status=403)
        waits = [produce(str(e.get("notification_id")).encode(),
                         receipt("sendgrid", str(e["sg_message_id"]).split(".")[0], e.get("notification_id"),
                                 str(e["event"]))) for e in json.loads(body)]
        await asyncio.gather(*waits)
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/webhooks/twilio", twilio)
    app.router.add_post("/webhooks/sendgrid", sendgrid)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stopped = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    await stopped.wait()
    stop.set()
    await runner.cleanup()
