"""The receipts stage: receipts (from the webhook receivers) -> `deliveries` delivered / failed, events, one fallback.

A receipt names its provider's message id and, when the provider echoes it, our notification id; the channel
follows from the provider. The row is locked, `recovery.after_receipt` decides, the row moves and an event goes
out. A failure after acceptance re-queues the delivery once for the next provider of its channel (the row keeps
`fallback_from`, which the sender skips) and re-injects its stored task; a second failure is final. Receipts are
idempotent: a repeated or stale one finds the row final or no longer about that message and changes nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline import db, deliveries, metrics, serde, topics
from pipeline.policy import providers as policy
from pipeline.policy import recovery
from pipeline.stages.runtime import Record, Stage, StageContext, utcnow

log = logging.getLogger("notify.receipts")

CHANNEL_OF = {"twilio": "sms", "termii": "sms", "sendgrid": "email", "mailgun": "email"}
HEADER_FALLBACK_FROM = "notify-fallback-from"

RECEIPTS = metrics.counter(
    "notify_receipts_total", "Receipts the receipts stage applied, by provider and result.",
    ["provider", "status", "result"])
DELIVERED_LATENCY = metrics.histogram(
    "notify_delivered_latency_seconds", "From a notification's creation to its provider's delivered receipt.",
    ["lane", "channel", "type"], buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600))


class ReceiptHandler:
    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.routing = policy.routing_table(ctx.settings.routing_overrides)
        self.codec = ctx.codec

    async def __call__(self, ctx: StageContext, record: Record) -> str:
        receipt = await ctx.decode_or_quarantine(record, serde.PROVIDER_RECEIPT)
        if receipt is None:
            return "undecodable"
        result = await self.apply(receipt)
        RECEIPTS.labels(receipt["provider"], receipt["status"], result).inc()
        return result

    async def apply(self, receipt: dict[str, Any]) -> str:
        provider, message_id, status = receipt["provider"], receipt["provider_message_id"], receipt["status"]
        channel = CHANNEL_OF[provider]
        nid = receipt.get("notification_id")
        pool = await db.async_pool(self.ctx.settings)
        async with pool.connection() as conn, conn.transaction():
            if nid is not None:
                rows = await deliveries.fetch(conn, "d.notification_id = %s AND d.channel = %s",
                                              (str(nid), channel), lock=True)
            else:
                rows = await deliveries.fetch(conn, "d.provider = %s AND d.provider_message_id = %s",
                                              (provider, message_id), lock=True)
            if not rows:
                return "unmatched"
            row = rows[0]
            step = recovery.after_receipt(row.view, provider, message_id, status,
                                          deliveries.provider_order(self.routing, self.codec, row))
            code = receipt.get("error_code") or (receipt["raw_status"] if step.action != "delivered" else None)
            if step.action == "ignore":
                return "ignored"
            if step.action == "fallback" and row.task is None:  # written before tasks were stored: cannot re-send
                step = recovery.ReceiptStep("failed", "failed after acceptance; no stored task to fall back with")
            if step.action == "fallback":
                moved = await deliveries.transition(
                    conn, row, "queued", code=code, message=receipt.get("error_message") or step.reason,
                    fallback_from=provider, clear_provider=True)
            else:
                moved = await deliveries.transition(
                    conn, row, step.action, provider=provider, provider_message_id=message_id, code=code,
                    message=receipt.get("error_message"))
        if not moved:
            return "raced"
        # After the commit: a fallback task the sender read before it would find the row not yet queued.
        if step.action == "fallback":
            deliveries.reinject(self.ctx, row, {HEADER_FALLBACK_FROM: provider.encode()})
            await self.ctx.emit(row.subject, "queued", channel=channel, provider=provider, lane=row.lane,
                                attempt=row.attempt_count, error_code=code,
                                error_message=f"failed after acceptance at {provider}; "
                                              f"falling back to {step.fallback_to}")
            return "fallback"
        await self.ctx.emit(row.subject, step.action, channel=channel, provider=provider, lane=row.lane,
                            attempt=row.attempt_count, error_code=code if step.action == "failed" else None,
                            error_message=receipt.get("error_message"))
        if step.action == "delivered":
            DELIVERED_LATENCY.labels(row.lane, channel, row.notification_type).observe(
                max(0.0, (utcnow() - row.created_at).total_seconds()))
        return step.action


def build(ctx: StageContext) -> Stage:
    return Stage(ctx, {topics.RECEIPTS: ReceiptHandler(ctx)})
