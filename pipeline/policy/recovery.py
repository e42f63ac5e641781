"""What happens to a delivery after its send: retry tiers, receipts, and reconciliation. Pure functions.

- A transient failure on every provider goes to the next retry tier, due after the tier's delay (or later, if a
  provider asked with Retry-After). After the last tier it is dead-lettered. A retry that would come due after the
  notification expires is not scheduled: the delivery is expired now (an OTP retried after it expired is noise).
- A receipt moves an accepted (or unknown) delivery to delivered or failed. A failure after acceptance falls back
  to the next provider of the channel, once; a second failure is final. Receipts for a message that is no longer
  the row's (the first provider's, after a fallback) and receipts for final rows change nothing.
- Reconciliation resolves what the provider says about a stuck delivery: delivered, failed, still pending, or
  "never arrived", which is the only case that sends again.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from pipeline.policy.providers import retry_delay_s

FINAL_STATES = frozenset({"delivered", "failed", "dead_lettered", "suppressed", "expired"})


# ---------------------------------------------------------------------------------------------- retry tiers


@dataclass(frozen=True)
class RetryStep:
    action: Literal["retry", "dead_letter", "expire"]
    tier: int = 0  # retry: the tier to wait in (1-based)
    due: datetime.datetime | None = None  # retry: never released before this
    reason: str = ""


def after_transient(tiers_used: int, delays: Sequence[float], now: datetime.datetime,
                    retry_after_s: Sequence[float | None] = (),
                    expires_at: datetime.datetime | None = None) -> RetryStep:
    """The next step of a delivery that failed transiently on every provider, `tiers_used` tiers in."""
    if tiers_used >= len(delays):
        return RetryStep("dead_letter", reason="retries_exhausted")
    due = now + datetime.timedelta(seconds=retry_delay_s(delays[tiers_used], retry_after_s))
    if expires_at is not None and due >= expires_at:
        return RetryStep("expire", reason="expires_before_retry")
    return RetryStep("retry", tiers_used + 1, due, "transient")


# ---------------------------------------------------------------------------------------------- receipts

ReceiptAction = Literal["delivered", "failed", "fallback", "ignore"]


@dataclass(frozen=True)
class DeliveryView:
    """The fields of a deliveries row the receipt and reconciliation policies read."""

    state: str
    provider: str | None
    provider_message_id: str | None
    fallback_from: str | None


@dataclass(frozen=True)
class ReceiptStep:
    action: ReceiptAction
    reason: str
    fallback_to: str | None = None


def next_provider(order: Sequence[str], failed: str, fallback_from: str | None) -> str | None:
    """The provider a failure-after-acceptance falls back to: the first in order that has not failed; None once
    the one fallback is used."""
    if fallback_from is not None:
        return None
    return next((p for p in order if p != failed), None)


# Mailgun's webhook signature covers a timestamp and a token, not the event: a captured signature could carry any
# event data, so its receipts only move a delivery whose message id (from Mailgun's own answer) they name.
EVENT_DATA_UNSIGNED: Final = frozenset({"mailgun"})


def after_receipt(row: DeliveryView, provider: str, provider_message_id: str, status: str,
                  order: Sequence[str]) -> ReceiptStep:
    """What a receipt (`status` from `provider` about its message `provider_message_id`) does to the row."""
    if row.state in FINAL_STATES:
        return ReceiptStep("ignore", f"already {row.state}")
    if provider in EVENT_DATA_UNSIGNED and (row.provider, row.provider_message_id) != (provider, provider_message_id):
        return ReceiptStep("ignore", f"{provider} signs no event data: only a receipt about the message this delivery "
                                     "holds may change it")
    if row.provider_message_id is not None and (row.provider, row.provider_message_id) != (provider,
                                                                                        provider_message_id):
        return ReceiptStep("ignore", "stale: about a message that is no longer this delivery's")
    if row.state not in ("accepted", "unknown", "sending"):
        return ReceiptStep("ignore", f"not sent ({row.state})")
    if status in ("delivered", "opened", "clicked"):  # opened and clicked imply delivered (receipts can reorder)
        return ReceiptStep("delivered", status)
    if status != "failed":
        return ReceiptStep("ignore", f"{status}: not final")
    fallback = next_provider(order, provider, row.fallback_from)
    if fallback is None:
        return ReceiptStep("failed", "failed after acceptance" + (", fallback used" if row.fallback_from else ""))
    return ReceiptStep("fallback", f"failed at {provider}", fallback)


# ---------------------------------------------------------------------------------------------- reconciliation

Stuck = Literal["sending", "unknown", "accepted", "retry_scheduled", "queued"]
LookupAnswer = Literal["delivered", "failed", "pending", "not_found", "cannot_tell"]
ReconcileAction = Literal["delivered", "failed", "accepted", "resend", "dead_letter", "leave"]


@dataclass(frozen=True)
class ReconcileStep:
    action: ReconcileAction
    reason: str


def reconcile(stuck: Stuck, answer: LookupAnswer, channel: str) -> ReconcileStep:
    """What to do with a stuck row given what its provider(s) said.

    Never re-sends something a provider holds: only `not_found` (every provider of the channel answered and none
    has it) re-sends, and not even that for an `accepted` row: the provider gave us its message id, so it had the
    message; not knowing it now (a record deleted under a retention policy, another account) says nothing about
    whether it was delivered, and a re-send could be the user's second debit alert. That row goes to the DLQ,
    where an operator decides (`notify dlq redrive`). Push has no status API (`cannot_tell` always): an ambiguous
    push is re-sent, because the notification id is its collapse id, so the device shows it once even if the first
    one arrived.
    """
    if stuck in ("retry_scheduled", "queued"):
        return ReconcileStep("resend", f"overdue {stuck} row: the record that should re-drive it was lost")
    if answer == "delivered":
        return ReconcileStep("delivered", "the provider reports it delivered")
    if answer == "failed":
        return ReconcileStep("failed", "the provider reports it failed")
    if answer == "pending":
        if stuck == "accepted":
            return ReconcileStep("leave", "the provider still has it in flight")
        return ReconcileStep("accepted", "the provider holds it")
    if answer == "not_found" and stuck == "accepted":
        return ReconcileStep("dead_letter", "the provider accepted it (we hold its message id) and now does not know "
                                            "it: delivered or not cannot be told, so it is not re-sent blindly")
    if answer == "not_found":
        return ReconcileStep("resend", "never arrived at any provider")
    if channel == "push" and stuck in ("sending", "unknown"):
        return ReconcileStep("resend", "push has no status API; the collapse id makes a re-send show once")
    return ReconcileStep("leave", "the provider could not be asked; next sweep")
