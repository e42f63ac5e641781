"""The recovery policies (retry tiers, receipts, reconciliation) as plain functions."""

from __future__ import annotations

import datetime

import pytest

from pipeline.policy.recovery import DeliveryView, after_receipt, after_transient, next_provider, reconcile

NOW = datetime.datetime(2026, 11, 22, 12, 0, tzinfo=datetime.UTC)
DELAYS = (5.0, 15.0, 45.0)
SMS = ("twilio", "termii")


def test_each_transient_failure_goes_one_tier_further_with_that_tiers_delay() -> None:
    steps = [after_transient(used, DELAYS, NOW) for used in range(3)]
    assert [(s.action, s.tier) for s in steps] == [("retry", 1), ("retry", 2), ("retry", 3)]
    assert [(s.due - NOW).total_seconds() for s in steps if s.due] == [5, 15, 45]


def test_after_the_last_tier_the_delivery_is_dead_lettered() -> None:
    step = after_transient(3, DELAYS, NOW)
    assert (step.action, step.reason, step.due) == ("dead_letter", "retries_exhausted", None)


def test_a_providers_retry_after_only_makes_the_retry_later() -> None:
    assert after_transient(0, DELAYS, NOW, [90, None]).due == NOW + datetime.timedelta(seconds=90)
    assert after_transient(0, DELAYS, NOW, [1]).due == NOW + datetime.timedelta(seconds=5)


def test_a_retry_that_would_come_due_after_expiry_expires_the_delivery_now() -> None:
    expires = NOW + datetime.timedelta(seconds=10)
    assert after_transient(0, DELAYS, NOW, expires_at=expires).action == "retry"
    assert after_transient(1, DELAYS, NOW, expires_at=expires).action == "expire"
    assert after_transient(0, DELAYS, NOW, [30], expires_at=expires).action == "expire"


ACCEPTED = DeliveryView("accepted", "twilio", "SM1", None)


@pytest.mark.parametrize(("status", "action"), [
    ("delivered", "delivered"), ("opened", "delivered"), ("clicked", "delivered"), ("sent", "ignore"),
    ("accepted", "ignore"), ("deferred", "ignore"), ("other", "ignore"), ("failed", "fallback"),
])
def test_a_receipt_for_an_accepted_delivery(status: str, action: str) -> None:
    assert after_receipt(ACCEPTED, "twilio", "SM1", status, SMS).action == action


def test_a_failure_after_acceptance_falls_back_to_the_next_provider_once() -> None:
    first = after_receipt(ACCEPTED, "twilio", "SM1", "failed", SMS)
    assert (first.action, first.fallback_to) == ("fallback", "termii")
    # after the fallback, termii accepted; its failure is final
    second = after_receipt(DeliveryView("accepted", "termii", "T1", "twilio"), "termii", "T1", "failed", SMS)
    assert second.action == "failed"
    # the fallback provider is the first in order that is not the failed one
    assert next_provider(SMS, "termii", None) == "twilio"
    assert next_provider(("twilio",), "twilio", None) is None


def test_stale_duplicate_and_early_receipts_change_nothing() -> None:
    after_fallback = DeliveryView("accepted", "termii", "T1", "twilio")
    assert after_receipt(after_fallback, "twilio", "SM1", "delivered", SMS).action == "ignore"  # the old message's
    assert after_receipt(DeliveryView("delivered", "twilio", "SM1", None), "twilio", "SM1", "failed",
                         SMS).action == "ignore"
    assert after_receipt(DeliveryView("queued", None, None, None), "twilio", "SM1", "delivered",
                         SMS).action == "ignore"


def test_a_receipt_resolves_an_unknown_delivery_that_has_no_provider_id_yet() -> None:
    unknown = DeliveryView("unknown", "twilio", None, None)
    assert after_receipt(unknown, "twilio", "SM9", "delivered", SMS).action == "delivered"


@pytest.mark.parametrize(("stuck", "answer", "channel", "action"), [
    ("unknown", "delivered", "sms", "delivered"),
    ("unknown", "pending", "sms", "accepted"),  # the provider holds it: never sent again
    ("unknown", "not_found", "sms", "resend"),
    ("unknown", "cannot_tell", "sms", "leave"),
    ("sending", "pending", "email", "accepted"),
    ("sending", "not_found", "email", "resend"),
    ("sending", "cannot_tell", "push", "resend"),  # no status API; the collapse id shows it once
    ("accepted", "pending", "sms", "leave"),
    ("accepted", "failed", "sms", "failed"),
    ("accepted", "delivered", "email", "delivered"),
    ("accepted", "cannot_tell", "sms", "leave"),
    ("accepted", "not_found", "sms", "dead_letter"),  # it had our message once: an operator decides, not a re-send
    ("retry_scheduled", "cannot_tell", "sms", "resend"),
    ("queued", "cannot_tell", "email", "resend"),
])
def test_reconciliation_resends_only_what_no_provider_holds(stuck: str, answer: str, channel: str,
                                                            action: str) -> None:
    assert reconcile(stuck, answer, channel).action == action  # type: ignore[arg-type]


def test_a_mailgun_receipt_moves_only_the_delivery_holding_its_message_id_others_may_overtake_the_answer() -> None:
    email = ("sendgrid", "mailgun")
    sending = DeliveryView("sending", None, None, None)
    # Mailgun signs no event data: a receipt before we know the message id could be a forgery on a captured token.
    assert after_receipt(sending, "mailgun", "<m1@mg>", "delivered", email).action == "ignore"
    assert after_receipt(sending, "mailgun", "<m1@mg>", "failed", email).action == "ignore"
    held = DeliveryView("accepted", "mailgun", "<m1@mg>", None)
    assert after_receipt(held, "mailgun", "<m1@mg>", "delivered", email).action == "delivered"
    assert after_receipt(held, "mailgun", "<other@mg>", "failed", email).action == "ignore"
    # SendGrid signs the whole body: its receipt may overtake the sender's answer.
    assert after_receipt(sending, "sendgrid", "sg1", "delivered", email).action == "delivered"
