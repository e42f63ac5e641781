"""Push per device, without a broker: a delivery's state and its pending devices from each device's result."""

from __future__ import annotations

import hashlib

from connectors.base import Outcome
from pipeline.bench.sender_rig import make_task
from pipeline.policy import push
from pipeline.policy.push import Device, DeviceResult, settle

PHONE = Device("android", "dXk3:APA91bH-phone")
TABLET = Device("android", "dXk3:APA91bH-tablet")
IPHONE = Device("ios", "ab" * 32)

OK = Outcome("accepted", "fcm", "ok", provider_message_id="projects/p/messages/1")
DOWN = Outcome("transient", "apns", "server_error", error_code="ServiceUnavailable")
GONE = Outcome("permanent", "fcm", "invalid_recipient", error_code="UNREGISTERED")
HUNG = Outcome("ambiguous", "fcm", "timeout", error_code="timeout")


def test_a_device_that_accepted_is_never_in_the_retry_and_the_transient_one_is() -> None:
    plan = settle([DeviceResult(PHONE, "accepted", OK), DeviceResult(IPHONE, "retry_scheduled", DOWN)])
    assert (plan.state, plan.pending, plan.accepted, plan.first_acceptance) == (
        "retry_scheduled", (IPHONE,), True, True)
    assert plan.reported == DOWN  # the row and its event say why it is still open


def test_a_permanently_failed_device_is_dropped_and_not_retried() -> None:
    plan = settle([DeviceResult(PHONE, "failed", GONE), DeviceResult(IPHONE, "retry_scheduled", DOWN)])
    assert (plan.state, plan.pending, plan.accepted) == ("retry_scheduled", (IPHONE,), False)
    dropped = settle([DeviceResult(PHONE, "accepted", OK), DeviceResult(TABLET, "failed", GONE)])
    assert (dropped.state, dropped.pending) == ("accepted", ())


def test_an_ambiguous_device_leaves_the_delivery_unknown_with_the_undecided_devices_pending() -> None:
    plan = settle([DeviceResult(PHONE, "accepted", OK), DeviceResult(TABLET, "unknown", HUNG),
                   DeviceResult(IPHONE, "retry_scheduled", DOWN)])
    assert (plan.state, plan.pending, plan.reported) == ("unknown", (TABLET, IPHONE), HUNG)


def test_with_nothing_pending_the_delivery_is_accepted_if_any_device_ever_accepted_else_failed() -> None:
    assert settle([DeviceResult(PHONE, "failed", GONE), DeviceResult(IPHONE, "failed", GONE)]).state == "failed"
    later = settle([DeviceResult(IPHONE, "failed", GONE)], accepted_before=True)
    assert (later.state, later.accepted, later.first_acceptance) == ("accepted", True, False)
    again = settle([DeviceResult(IPHONE, "accepted", OK)], accepted_before=True)
    assert (again.state, again.first_acceptance) == ("accepted", False)  # the user had it from the first device
    no_provider = settle([DeviceResult(IPHONE, "failed", None)])
    assert (no_provider.state, no_provider.reported) == ("failed", None)


def test_a_token_listed_twice_is_pending_once() -> None:
    plan = settle([DeviceResult(IPHONE, "retry_scheduled", DOWN), DeviceResult(IPHONE, "retry_scheduled", DOWN)])
    assert plan.pending == (IPHONE,)


def test_out_of_retries_or_of_time_a_delivery_that_reached_a_device_is_accepted() -> None:
    partial = settle([DeviceResult(PHONE, "accepted", OK), DeviceResult(IPHONE, "retry_scheduled", DOWN)])
    nowhere = settle([DeviceResult(IPHONE, "retry_scheduled", DOWN)])
    assert [push.after_retry_step(partial, a) for a in ("retry", "dead_letter", "expire")] == [
        "retry_scheduled", "accepted", "accepted"]
    assert [push.after_retry_step(nowhere, a) for a in ("retry", "dead_letter", "expire")] == [
        "retry_scheduled", "dead_lettered", "expired"]


def test_a_send_record_read_again_goes_only_to_the_devices_the_row_still_lists() -> None:
    listed = (PHONE, TABLET, IPHONE)
    assert push.still_pending(listed, (IPHONE,)) == (IPHONE,)
    assert push.still_pending(listed, (IPHONE, PHONE)) == (PHONE, IPHONE)  # the record's order
    assert push.still_pending(listed, None) == listed  # a row without a stored task: the record as it is


def test_the_reduced_task_keeps_everything_but_the_devices_that_are_done() -> None:
    task = make_task(channel="push", notification_type="security", to=None,
                     device_tokens=[PHONE.as_record(), IPHONE.as_record()])
    reduced = push.with_devices(task, [IPHONE])
    assert reduced["device_tokens"] == [{"platform": "ios", "token": "ab" * 32}]
    assert {k: v for k, v in reduced.items() if k != "device_tokens"} == {
        k: v for k, v in task.items() if k != "device_tokens"}
    assert push.devices_of(task) == (PHONE, IPHONE) and push.devices_of(make_task()) == ()


def test_a_device_is_named_by_a_fingerprint_of_its_token_never_the_token() -> None:
    assert IPHONE.fingerprint == hashlib.sha256(("ab" * 32).encode()).hexdigest()[:16]
    assert len(PHONE.fingerprint) == 16 and PHONE.fingerprint != TABLET.fingerprint
    assert PHONE.token not in PHONE.fingerprint
