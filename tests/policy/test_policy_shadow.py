"""Shadow comparisons without a broker: SMS encoding and segments, the mirrored share, percentiles, the report."""

from __future__ import annotations

import datetime
import uuid

import pytest

from pipeline.policy import shadow, sms
from pipeline.policy.shadow import ShadowResult, side


@pytest.mark.parametrize(("text", "encoding", "units", "segments"), [
    ("", "GSM-7", 0, 1),
    ("a" * 160, "GSM-7", 160, 1),
    ("a" * 161, "GSM-7", 161, 2),
    ("a" * 306, "GSM-7", 306, 2),
    ("a" * 307, "GSM-7", 307, 3),
    ("Über? GSM-7 has ä, ñ, é, £, ¥ and Δ", "GSM-7", 35, 1),
    ("{" * 80, "GSM-7", 160, 1),  # extension characters take two septets
    ("{" * 81, "GSM-7", 162, 2),
    ("€" + "a" * 159, "GSM-7", 161, 2),
    ("a" * 152 + "{" + "a" * 152, "GSM-7", 306, 3),  # the escape and its septet never straddle two segments
    ("Ваш код 123456", "UCS-2", 14, 1),
    ("й" * 70, "UCS-2", 70, 1),
    ("й" * 71, "UCS-2", 71, 2),
    ("й" * 134, "UCS-2", 134, 2),
    ("й" * 135, "UCS-2", 135, 3),
    ("😀" * 35, "UCS-2", 70, 1),  # an emoji is two UTF-16 units
    ("😀" * 36, "UCS-2", 72, 2),
    ("a" * 66 + "😀" + "a" * 66, "UCS-2", 134, 3),  # its surrogates never straddle two segments
    ("Code 123456 ₦", "UCS-2", 13, 1),  # the Naira sign is not GSM-7
])
def test_an_sms_is_encoded_and_segmented_as_carriers_bill_it(text: str, encoding: str, units: int,
                                                             segments: int) -> None:
    assert (sms.encoding(text), sms.units(text), sms.segments(text)) == (encoding, units, segments)


def test_a_side_carries_the_formatting_of_sms_only_and_no_code_when_accepted() -> None:
    sms = side("twilio", "sms", "Ваш код 1", outcome="accepted", code="ok", latency_s=0.0125)
    assert (sms.encoding, sms.segments, sms.length, sms.code, sms.latency_ms) == ("UCS-2", 1, 9, None, 12.5)
    email = side("mailgun", "email", "Hello 😀", outcome="permanent", code="400", latency_s=0.1)
    assert (email.encoding, email.segments, email.length, email.code) == (None, None, 7, "400")


def test_a_provider_that_transliterates_shows_its_own_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shadow, "TRANSLITERATION", {"twilio": {"\u2019": "'"}})
    body = "Don\u2019t share your code " + "x" * 60
    result = ShadowResult("n", "sms", "critical", side("termii", "sms", body, outcome="accepted", code=None,
                                                       latency_s=0.01),
                          side("twilio", "sms", body, outcome="accepted", code=None, latency_s=0.01))
    assert (result.primary.encoding, result.candidate.encoding) == ("UCS-2", "GSM-7")
    assert (result.primary.segments, result.candidate.segments) == (2, 1)
    assert result.encoding_differs and result.segments_differ
    [pair] = shadow.summarise([result])
    assert pair["formatting"] == {"encoding_differs": 1, "segments_differ": 1, "transliterates": ["twilio"]}


def test_the_mirrored_share_is_a_stable_draw_from_the_notification_id() -> None:
    ids = [str(uuid.uuid4()) for _ in range(4000)]
    mirrored = [i for i in ids if shadow.is_mirrored(i, 0.25)]
    assert 800 < len(mirrored) < 1200
    assert mirrored == [i for i in ids if shadow.is_mirrored(i, 0.25)]  # the same on every call and worker
    assert set(mirrored) <= {i for i in ids if shadow.is_mirrored(i, 0.5)}  # a larger share keeps the smaller one
    assert all(shadow.is_mirrored(i, 1.0) for i in ids)


def test_percentiles_interpolate_between_ranks_like_percentile_cont() -> None:
    values = [float(v) for v in range(1, 101)]
    assert shadow.percentile(values, 0.5) == pytest.approx(50.5)
    assert shadow.percentile(values, 0.95) == pytest.approx(95.05)
    assert shadow.percentile(values, 0.99) == pytest.approx(99.01)
    assert shadow.percentile([7.0], 0.99) == 7.0
    assert shadow.percentile([], 0.5) is None


@pytest.mark.parametrize(("text", "seconds"), [("24h", 86400), ("30m", 1800), ("7d", 604800), ("90s", 90),
                                               ("1.5h", 5400), ("2w", 1209600)])
def test_since_is_a_window_back_from_now(text: str, seconds: int) -> None:
    assert shadow.parse_since(text) == datetime.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "24", "h", "-1h", "0h", "1y", "abc"])
def test_a_malformed_since_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="unit"):
        shadow.parse_since(text)


def result(body: str, primary: tuple[str, str | None, float], candidate: tuple[str, str | None, float],
           *, channel: str = "sms", pair: tuple[str, str] = ("termii", "twilio")) -> ShadowResult:
    return ShadowResult(str(uuid.uuid4()), channel, "critical",
                        side(pair[0], channel, body, outcome=primary[0], code=primary[1], latency_s=primary[2]),
                        side(pair[1], channel, body, outcome=candidate[0], code=candidate[1], latency_s=candidate[2]))


def test_the_report_compares_acceptance_latency_formatting_and_errors_per_pair() -> None:
    ok = ("accepted", None, 0.0)
    results = [
        *(result("Your code is 1", ("accepted", None, 0.010 * i), ("accepted", None, 0.020 * i)) for i in range(1, 8)),
        result("Ваш код 2", ok, ("permanent", "21211", 0.05)),
        result("Код 😀" * 20, ok, ("permanent", "21211", 0.05)),
        result("x", ("permanent", "400", 0.01), ("transient", "20503", 0.05)),
        result("Hello", ok, ok, channel="email", pair=("sendgrid", "mailgun")),
    ]
    email, sms = shadow.summarise(results)  # by channel
    assert (sms["channel"], sms["primary"]["provider"], sms["candidate"]["provider"], sms["mirrored"]) == (
        "sms", "termii", "twilio", 10)
    assert (sms["primary"]["accepted"], sms["candidate"]["accepted"]) == (9, 7)
    assert (sms["primary"]["acceptance_rate"], sms["candidate"]["acceptance_rate"]) == (0.9, 0.7)
    assert sms["acceptance_rate_difference"] == pytest.approx(-0.2)
    assert sms["candidate"]["top_errors"] == [["21211", 2], ["20503", 1]]
    assert sms["primary"]["top_errors"] == [["400", 1]]
    # "Код 😀" * 20 is 120 UTF-16 units: two UCS-2 segments; every other text is one segment
    assert (sms["primary"]["segments"], sms["candidate"]["segments"]) == (11, 11)
    assert sms["primary"]["encodings"] == {"GSM-7": 8, "UCS-2": 2}
    assert sms["formatting"] == {"encoding_differs": 0, "segments_differ": 0, "transliterates": []}
    assert sms["candidate"]["latency_ms"]["p50"] == pytest.approx(shadow.percentile(
        [20.0 * i for i in range(1, 8)] + [50.0] * 3, 0.5))
    assert sms["latency_difference_ms"]["p50"] == pytest.approx(
        sms["candidate"]["latency_ms"]["p50"] - sms["primary"]["latency_ms"]["p50"])
    assert (email["channel"], email["mirrored"], email["primary"]["segments"]) == ("email", 1, None)
    table = shadow.render_table([sms, email], since="24h")
    assert "sms: termii (primary) vs twilio (candidate), 10 mirrored" in table
    assert "90.0%" in table and "70.0%" in table and "-20.0 pt" in table
    assert "candidate's top errors: 21211 x2, 20503 x1" in table
    assert "email: sendgrid (primary) vs mailgun (candidate), 1 mirrored" in table


def test_an_empty_window_says_so() -> None:
    assert shadow.summarise([]) == []
    assert "no shadow results in the last 1h" in shadow.render_table([], since="1h")


def test_comparisons_become_one_array_per_column() -> None:
    rows = [result("Ваш код", ("accepted", None, 0.01), ("permanent", "21211", 0.02))]
    columns = shadow.shadow_columns(rows)
    assert columns["candidate_codes"] == ["21211"] and columns["primary_codes"] == [None]
    assert columns["primary_encodings"] == ["UCS-2"] and columns["candidate_segments"] == [1]
    assert {len(v) for v in columns.values()} == {1} and len(columns) == 17
