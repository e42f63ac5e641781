"""The pure parts of observability: metric declaration rules, SMS segments and cost, opt-out changes, lag."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline import config, metrics
from pipeline.config import REPO_ROOT
from pipeline.errors import ConfigError
from pipeline.ops.exporter import GroupLabels, build_snapshot, group_labels, lag
from pipeline.policy.cost import message_cost
from pipeline.policy.sms import segments as sms_segments
from pipeline.policy.user_settings import opt_out_changes

# ---------------------------------------------------------------------------------------- metric declarations


@pytest.mark.parametrize(("make", "name", "labels", "message"), [
    (metrics.counter, "notify_sends", (), "must end in _total"),
    (metrics.counter, "sends_total", (), "names are notify_"),
    (metrics.counter, "notify_Sends_total", (), "lower snake case"),
    (metrics.gauge, "notify_pending_total", (), "must not end in _total"),
    (metrics.counter, "notify_sends_by_user_total", ("user_id",), "not among the bounded labels"),
    (metrics.counter, "notify_sends_by_message_total", ("lane", "message_id"), "['message_id']"),
])
def test_declarations_refuse_bad_names_and_unbounded_labels(make: object, name: str, labels: tuple[str, ...],
                                                            message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make(name, "doc", labels)  # type: ignore[operator]
    assert name not in metrics.DECLARED


def test_a_histogram_names_its_unit() -> None:
    with pytest.raises(ValueError, match="must end in its unit"):
        metrics.histogram("notify_latency", "doc", ("lane",), buckets=(1.0,))


def test_every_declared_metric_follows_the_rules() -> None:
    import pipeline.api.app
    import pipeline.ops.exporter
    import pipeline.stages.worker  # noqa: F401 (imported for the metrics they declare)

    assert len(metrics.DECLARED) > 40
    for name, (kind, labels) in metrics.DECLARED.items():
        assert name.startswith("notify_"), name
        assert set(labels) <= metrics.LABELS, name
        assert name.endswith("_total") == (kind == "counter"), name
        if kind == "histogram":
            assert name.endswith(metrics.HISTOGRAM_UNITS), name


def test_metrics_off_records_nothing_and_still_serves_metrics() -> None:
    """NOTIFY_METRICS=off (for the with/without benchmark): every metric is a no-op, in a process of its own."""
    code = ("from pipeline import metrics; c = metrics.counter('notify_x_total', 'd', ['lane']); "
            "c.labels('bulk').inc(); h = metrics.histogram('notify_y_seconds', 'd', buckets=(1.0,)); h.observe(2); "
            "g = metrics.gauge('notify_zz', 'd'); g.set(3); "
            "from prometheus_client import generate_latest; print(metrics.ENABLED, b'notify_x' in generate_latest())")
    run = subprocess.run([sys.executable, "-c", code], env={"NOTIFY_METRICS": "off", "PATH": ""}, cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["False", "False"]
    with pytest.raises(ConfigError, match="NOTIFY_METRICS='maybe' is malformed"):
        config.load({"NOTIFY_METRICS": "maybe"})


# ---------------------------------------------------------------------------------------- cost


@pytest.mark.parametrize(("body", "segments"), [
    ("", 1),
    ("x" * 160, 1),
    ("x" * 161, 2),
    ("x" * 306, 2),
    ("x" * 307, 3),
    ("€" * 80, 1),  # extension-table characters take two septets: 160 septets
    ("€" * 81, 2),
    ("Your OTP is 123456 ₦", 1),  # the Naira sign is not GSM-7: UCS-2, 70 per segment
    ("₦" * 70, 1),
    ("₦" * 71, 2),
    ("₦" * 134, 2),
    ("₦" * 135, 3),
    ("😀" * 35, 1),  # an emoji is two UTF-16 units
    ("😀" * 36, 2),
])
def test_sms_segments_follow_gsm7_and_ucs2(body: str, segments: int) -> None:
    assert sms_segments(body) == segments


def test_message_cost_is_the_provider_price_times_segments_for_sms_only() -> None:
    prices = dict(config.load({}).provider_prices_usd)
    assert message_cost(prices, "twilio", "sms", "x" * 200) == pytest.approx(2 * prices["twilio"])
    assert message_cost(prices, "sendgrid", "email", "x" * 20000) == pytest.approx(prices["sendgrid"])
    assert message_cost(prices, "fcm", "push", "hello") == 0.0


def test_prices_must_name_every_provider() -> None:
    with pytest.raises(ConfigError, match="no price for"):
        config.load({"NOTIFY_PROVIDER_PRICES_USD": "twilio=0.01"})
    with pytest.raises(ConfigError, match="expected <provider>="):
        config.load({"NOTIFY_PROVIDER_PRICES_USD": "acme=0.01"})


# ---------------------------------------------------------------------------------------- opt-outs


def test_opt_out_changes_are_the_difference_between_versions() -> None:
    before = {"marketing": {"opted_in_channels": [], "opted_out_channels": ["sms"]},
              "price_alert": {"opted_in_channels": [], "opted_out_channels": ["email", "push"]}}
    after = {"marketing": {"opted_in_channels": [], "opted_out_channels": ["sms", "email"]},
             "price_alert": {"opted_in_channels": [], "opted_out_channels": ["push"]}}
    assert opt_out_changes(before, after) == [("marketing", "email", "opt_out"), ("price_alert", "email", "opt_in")]
    assert opt_out_changes(None, before) == [("marketing", "sms", "opt_out"), ("price_alert", "email", "opt_out"),
                                             ("price_alert", "push", "opt_out")]
    assert opt_out_changes(after, after) == []
    assert opt_out_changes(before, {}) == [("marketing", "sms", "opt_in"), ("price_alert", "email", "opt_in"),
                                           ("price_alert", "push", "opt_in")]


# ---------------------------------------------------------------------------------------- lag


def test_group_labels_know_only_stage_groups_of_this_prefix() -> None:
    assert group_labels("t1.notify-sender-critical", "t1.") == GroupLabels("sender", "critical")
    assert group_labels("t1.notify-receipts", "t1.") == GroupLabels("receipts", "")
    assert group_labels("t2.notify-sender-critical", "t1.") is None
    assert group_labels("t1.notify-sender-critical-table-ab12cd34", "t1.") is None
    assert group_labels("t1.notify-sender-everything", "t1.") is None
    assert group_labels("notify-intake-bulk", "") == GroupLabels("intake", "bulk")


def test_lag_is_unknown_without_a_commit_and_never_negative() -> None:
    assert lag(3, 10) == 7
    assert lag(10, 10) == 0
    assert lag(12, 10) == 0  # a high watermark read just before the commit
    assert lag(-1001, 10) is None  # librdkafka's "no committed offset"


def test_snapshot_keeps_our_groups_and_declared_topics() -> None:
    ends = {("p.send.sms.critical", 0): 10, ("p.send.sms.critical", 1): 4, ("p.other", 0): 99}
    logical = {"p.send.sms.critical": "send.sms.critical"}
    committed = {"p.notify-sender-critical": [("p.send.sms.critical", 0, 6), ("p.send.sms.critical", 1, -1001)],
                 "p.someone": [("p.send.sms.critical", 0, 0)]}
    snapshot = build_snapshot(ends, logical, committed, "p.")
    assert snapshot.lags == {("p.notify-sender-critical", "sender", "critical", "p.send.sms.critical", 0): 4}
    assert snapshot.ends == {("p.send.sms.critical", "send.sms.critical", 0): 10,
                             ("p.send.sms.critical", "send.sms.critical", 1): 4}
