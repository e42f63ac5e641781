"""The sender's plain decisions, without a broker: rendering, messages per task, routing tables, outcomes."""

from __future__ import annotations

import datetime

import pytest

from connectors.base import Outcome
from pipeline import config
from pipeline.bench.sender_rig import make_task
from pipeline.errors import ConfigError
from pipeline.policy import providers as policy
from pipeline.policy.templates import TemplateError, render
from pipeline.stages.send_jobs import messages_of, response_status


def test_content_is_sent_as_is_and_templates_take_their_params() -> None:
    assert render(make_task()).body == "Your code is 123456"
    task = make_task(content=None, template_id="otp.login", template_params={"code": "424242"}, locale="fr-CA")
    rendered = render(task)
    assert "424242" in rendered.body and rendered.subject == "Votre code de connexion"
    english = render(make_task(content=None, template_id="otp.login", template_params={"code": "1"}, locale="de"))
    assert english.subject == "Your login code"


@pytest.mark.parametrize(("template_id", "params", "code"), [
    ("nope", {}, "unknown_template"),
    ("otp.login", {}, "missing_template_param"),
])
def test_a_template_that_cannot_render_is_a_clear_permanent_error(template_id: str, params: dict[str, str],
                                                                   code: str) -> None:
    with pytest.raises(TemplateError) as caught:
        render(make_task(content=None, template_id=template_id, template_params=params))
    assert caught.value.code == code


def test_a_line_break_in_an_email_subject_folds_into_a_space_and_cannot_inject_a_header() -> None:
    injected = render(make_task(channel="email", content={"subject": "Hello\r\nBcc: victim@example.com\n\n",
                                                          "body": "line one\r\nline two"}))
    assert injected.subject == "Hello Bcc: victim@example.com"
    assert injected.body == "line one\r\nline two"  # the body is the body: its lines stay
    through_param = render(make_task(channel="email", content=None, template_id="transaction.debit",
                                     template_params={"amount": "1", "currency": "NGN", "account": "1",
                                                      "merchant": "x"}))
    assert through_param.subject == "Debit alert"
    assert render(make_task(channel="email", content={"subject": "\u2028", "body": "b"})).subject == " "
    assert render(make_task(channel="email", content={"subject": None, "body": "b"})).subject is None


def test_push_is_one_message_per_device_with_the_notification_id_as_collapse_key() -> None:
    task = make_task(channel="push", device_tokens=[{"platform": "android", "token": "a1"},
                                                    {"platform": "ios", "token": "b" * 64}])
    sent = messages_of(task, render(task))
    assert [(m.to, platform) for m, platform in sent] == [("a1", "android"), ("b" * 64, "ios")]
    assert {m.collapse_key for m, _ in sent} == {task["notification_id"]}
    [(sms, platform)] = messages_of(make_task(), render(make_task()))
    assert sms.to == "+2348031234567" and platform is None and sms.collapse_key is None


def test_a_device_token_names_its_push_provider() -> None:
    apns_token = "ab" * 32
    assert policy.for_device(("fcm", "apns"), "ios", apns_token) == ("apns",)
    assert policy.for_device(("fcm", "apns"), "ios", "fcm-registration-token:APA91b") == ("fcm",)
    assert policy.for_device(("fcm", "apns"), "android", "dXk3:APA91b") == ("fcm",)
    assert policy.for_device(("fcm",), "ios", apns_token) == ()  # APNs not configured for this route
    assert policy.for_device(("fcm", "apns"), "web", apns_token) == ("fcm",)


def test_routing_overrides_from_configuration() -> None:
    settings = config.load({"NOTIFY_ROUTING": "sms.bulk=termii,twilio; sms.+234=termii ;email.critical=mailgun"})
    table = policy.routing_table(settings.routing_overrides)
    assert table.order("sms", "critical", "+15551234567") == ("twilio", "termii")
    assert table.order("sms", "bulk", "+15551234567") == ("termii", "twilio")
    assert table.order("sms", "critical", "+2348031234567") == ("termii",)
    assert table.order("email", "critical") == ("mailgun",)
    assert table.order("push", "bulk") == ("fcm", "apns")


@pytest.mark.parametrize("raw", ["sms=twilio", "fax.bulk=twilio", "sms.bulk=carrier-pigeon", "sms.+2x=twilio",
                                 "sms.bulk="])
def test_a_malformed_routing_override_fails_at_start_up(raw: str) -> None:
    with pytest.raises(ConfigError, match="NOTIFY_ROUTING"):
        config.load({"NOTIFY_ROUTING": raw})


def test_shadow_configuration() -> None:
    assert dict(config.load({"NOTIFY_SHADOW": "sms=termii:0.05, email=mailgun:1"}).shadow) == {
        "sms": ("termii", 0.05), "email": ("mailgun", 1.0)}
    for raw in ("sms=termii", "sms=termii:0", "sms=termii:1.5", "fax=termii:0.1", "sms=nobody:0.1"):
        with pytest.raises(ConfigError, match="NOTIFY_SHADOW"):
            config.load({"NOTIFY_SHADOW": raw})


def test_recipient_refusals_end_the_attempt_but_a_provider_side_refusal_falls_over() -> None:
    assert policy.after("permanent", 1, 2, "invalid_recipient").action == "fail"
    assert policy.after("permanent", 1, 2, "unsubscribed").action == "fail"
    assert policy.after("permanent", 1, 2, "auth").action == "try_next"
    assert policy.after("permanent", 2, 2, "auth").action == "fail"


def test_what_counts_against_a_provider_for_its_breaker() -> None:
    assert policy.counts_against_provider("transient", "server_error")
    assert policy.counts_against_provider("ambiguous", "timeout")
    assert policy.counts_against_provider("permanent", "auth")
    assert not policy.counts_against_provider("permanent", "invalid_recipient")
    assert not policy.counts_against_provider("accepted", "ok")


def test_p95_retry_delay_and_combining_device_results() -> None:
    assert policy.p95([]) == 0.0
    assert policy.p95([0.1] * 95 + [3.0] * 5) == 0.1
    assert policy.p95([0.1] * 94 + [3.0] * 6) == 3.0
    assert policy.retry_delay_s(30, [None, 5]) == 30
    assert policy.retry_delay_s(30, [120, None]) == 120
    assert policy.combine(["failed", "accepted"]) == "accepted"
    assert policy.combine(["failed", "unknown", "retry_scheduled"]) == "unknown"
    assert policy.combine(["failed", "retry_scheduled"]) == "retry_scheduled"
    assert policy.combine(["failed", "failed"]) == "failed"


def test_response_status_is_an_http_status_or_nothing() -> None:
    assert response_status(Outcome("accepted", "twilio", "ok", provider_message_id="SM1")) == 200
    assert response_status(Outcome("transient", "twilio", "server_error", error_code="503")) == 503
    assert response_status(Outcome("permanent", "twilio", "invalid_recipient", error_code="21211")) is None
    assert response_status(Outcome("ambiguous", "twilio", "timeout", error_code="timeout")) is None


def test_make_task_defaults_are_valid_tasks() -> None:
    task = make_task(notification_type="marketing", channel="email", ttl=None)
    assert task["lane"] == "bulk" and task["expires_at"] is None and task["address"] == "ada@example.com"
    assert make_task()["expires_at"] > datetime.datetime.now(datetime.UTC)
