"""The receipts stage: receipts (from the webhook receivers) -> `deliveries` delivered / failed, events, one fallback.

A receipt names its provider's message id and, when the provider echoes it, our notification id; the channel
follows from the provider. The row is locked, `recovery.after_receipt` decides, the row moves and an event goes
out. A failure after acceptance re-queues the delivery once for the next provider of its channel (the row keeps
`fallback_from`, which the sender skips) and re-injects its stored task; a second failure is final. Receipts are
idempotent: a repeated or stale one finds the row final or no longer about that message and changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pipeline import metrics
from pipeline.kafka import serde, topics
from pipeline.policy import providers as policy
from pipeline.policy import recovery
from pipeline.stages.context import StageContext
from pipeline.stages.records import Record, utcnow
from pipeline.stages.runtime import Stage
from pipeline.state import db, deliveries

log = logging.getLogger("notify.receipts")

CHANNEL_OF = {"twilio": "sms", "termii": "sms", "sendgrid": "email", "mailgun": "email"}
HEADER_FALLBACK_FROM = "notify-fallback-from"

RECEIPTS = metrics.counter(
    "notify_receipts_total", "Receipts the receipts stage applied, by provider and result.",
    ["provider", "status", "result"])
DELIVERED_LATENCY = metrics.histogram(
    "notify_delivered_latency_seconds", "From a notification's creation to its provider's delivered receipt.",
    ["lane", "channel", "type"], buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600))


# Two lookups (each on its index), not one with OR, which would scan the table.
BY_KEY = "(d.notification_id, d.channel) IN (SELECT * FROM unnest(%s::uuid[], %s::text[]))"
BY_MESSAGE = "(d.provider, d.provider_message_id) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"


@dataclass(slots=True)
class Applied:
    """What a receipt did: its step, and the row it moved (None: nothing matched)."""

    receipt: dict[str, Any]
    step: recovery.ReceiptStep | None
    row: deliveries.DeliveryRow | None = None
    code: str | None = None
    raced: bool = False  # another writer moved the row between our read and our write


class ReceiptHandler:
    """A batch of receipts: one locking read of every row they name, the policy on each in order (a second receipt
    for a row sees what the first did), one statement for every transition, then events and fallbacks."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.routing = policy.routing_table(ctx.settings.routing_overrides)
        self.codec = ctx.codec
        self._receipts = metrics.Children(RECEIPTS)

    async def __call__(self, ctx: StageContext, records: list[Record]) -> None:
        receipts = [r for r in (ctx.decode(record, serde.PROVIDER_RECEIPT) for record in records) if r is not None]
        if not receipts:
            return
        applied = await self.apply_all(receipts)
        for item in applied:
            result = self._report(item)
            self._receipts(item.receipt["provider"], item.receipt["status"], result).inc()
            ctx.outcomes(result).inc()

    async def apply_all(self, receipts: list[dict[str, Any]]) -> list[Applied]:
        keyed = [(str(r["notification_id"]), CHANNEL_OF[r["provider"]]) for r in receipts
                 if r.get("notification_id") is not None]
        by_message = [(r["provider"], r["provider_message_id"]) for r in receipts if r.get("notification_id") is None]
        pool = await db.async_pool(self.ctx.settings)
        async with pool.connection() as conn, conn.transaction():
            rows = []
            if keyed:
                rows += await deliveries.fetch(conn, BY_KEY, ([k[0] for k in keyed], [k[1] for k in keyed]),
                                               lock=True)
            if by_message:
                rows += await deliveries.fetch(conn, BY_MESSAGE, ([k[0] for k in by_message],
                                                                  [k[1] for k in by_message]), lock=True)
            by_key = {(row.notification_id, row.channel): row for row in rows}
            of_message = {(row.provider, row.provider_message_id): row for row in rows if row.provider_message_id}
            current: dict[tuple[str, str], recovery.DeliveryView] = {k: row.view for k, row in by_key.items()}
            moves: dict[tuple[str, str], deliveries.Move] = {}
            applied: list[Applied] = []
            for receipt in receipts:
                provider, message_id, status = receipt["provider"], receipt["provider_message_id"], receipt["status"]
                nid = receipt.get("notification_id")
                row = (by_key.get((str(nid), CHANNEL_OF[provider])) if nid is not None
                       else of_message.get((provider, message_id)))
                if row is None:
                    applied.append(Applied(receipt, None))
                    continue
                key = (row.notification_id, row.channel)
                step = recovery.after_receipt(current[key], provider, message_id, status,
                                              deliveries.provider_order(self.routing, self.codec, row))
                code = receipt.get("error_code") or (receipt["raw_status"] if step.action != "delivered" else None)
                if step.action == "fallback" and row.task is None:  # written before tasks were stored: no re-send
                    step = recovery.ReceiptStep("failed", "failed after acceptance; no stored task to fall back with")
                if step.action == "ignore":
                    applied.append(Applied(receipt, step, row, code))
                    continue
                if step.action == "fallback":
                    move = deliveries.Move(row, "queued", code=code,
                                           message=receipt.get("error_message") or step.reason,
                                           fallback_from=provider, clear_provider=True)
                    current[key] = recovery.DeliveryView("queued", None, None, provider)
                else:
                    move = deliveries.Move(row, step.action, provider=provider, provider_message_id=message_id,
                                           code=code, message=receipt.get("error_message"))
                    current[key] = recovery.DeliveryView(step.action, provider, message_id, row.fallback_from)
                moves[key] = move  # at most one per row: after a final state or a fallback, receipts are ignored
                applied.append(Applied(receipt, step, row, code))
            moved = await deliveries.transition_all(conn, list(moves.values()))
        # After the commit: a fallback task the sender read before it would find the row not yet queued.
        for item in applied:
            if item.row is not None and item.step is not None and item.step.action != "ignore" and \
                    (item.row.notification_id, item.row.channel) not in moved:
                item.raced = True
        return applied

    def _report(self, item: Applied) -> str:
        """Stage what an applied receipt says (events, a fallback's task); its result for the metrics."""
        if item.row is None or item.step is None:
            return "unmatched"
        step, row, receipt, code = item.step, item.row, item.receipt, item.code
        provider, channel = receipt["provider"], row.channel
        if item.raced:
            return "raced"
        if step.action == "ignore":
            return "ignored"
        if step.action == "fallback":
            deliveries.reinject(self.ctx, row, {HEADER_FALLBACK_FROM: provider.encode()})
            self.ctx.emit(row.subject, "queued", channel=channel, provider=provider, lane=row.lane,
                          attempt=row.attempt_count, error_code=code,
                          error_message=f"failed after acceptance at {provider}; falling back to {step.fallback_to}")
            return "fallback"
        self.ctx.emit(row.subject, step.action, channel=channel, provider=provider, lane=row.lane,
                      attempt=row.attempt_count, error_code=code if step.action == "failed" else None,
                      error_message=receipt.get("error_message"))
        if step.action == "delivered":
            DELIVERED_LATENCY.labels(row.lane, channel, row.notification_type).observe(
                max(0.0, (utcnow() - row.created_at).total_seconds()))
        return step.action


def build(ctx: StageContext) -> Stage:
    return Stage(ctx, {topics.RECEIPTS: ReceiptHandler(ctx)})
