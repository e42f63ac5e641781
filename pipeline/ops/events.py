"""`notify events tail`: read the delivery-events topic as a data team would, decoded, optionally filtered."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from pipeline.config import Settings
from pipeline.errors import DecodeError
from pipeline.kafka import clients, serde, topics


def render(event: dict[str, Any]) -> str:
    when = event["occurred_at"].isoformat(timespec="milliseconds")
    where = "/".join(x for x in (event.get("channel"), event.get("provider")) if x)
    error = f" [{event['error_code']}: {event['error_message'] or ''}]" if event.get("error_code") else ""
    return (f"{when} {event['status']:15} {event['stage']:12} {event['lane']:8} {event['notification_type']:12} "
            f"user={event['user_id']} id={event['notification_id']} {where}{error}")


def tail(settings: Settings, *, user: str | None = None, notification: str | None = None,
         from_beginning: bool = False, as_json: bool = False, limit: int | None = None,
         out: Callable[[str], None] = print) -> int:
    """Print delivery events until interrupted (or `limit` matched); returns how many were printed."""
    codec = serde.AvroSerde()
    consumer = clients.consumer(settings, f"events-tail-{uuid.uuid4().hex[:8]}",
                              **{"auto.offset.reset": "earliest" if from_beginning else "latest"})
    consumer.subscribe([settings.topic(topics.DELIVERY_EVENTS)])
    printed = 0
    try:
        while limit is None or printed < limit:
            message = consumer.poll(0.5)
            if message is None or message.error() is not None or message.value() is None:
                continue
            try:
                event = codec.decode(message.value() or b"", expected=serde.DELIVERY_EVENT).value
            except DecodeError as exc:
                out(f"! undecodable record at {message.partition()}/{message.offset()}: {exc}")
                continue
            if user is not None and event["user_id"] != user:
                continue
            if notification is not None and str(event["notification_id"]) != notification:
                continue
            out(json.dumps(event, default=str) if as_json else render(event))
            printed += 1
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return printed
