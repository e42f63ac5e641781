"""The country label of a send: from the E.164 calling code, longest code first, over a bounded set of labels."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline.policy.regions import CALLING_CODES, CountryLabels


def test_a_phone_number_is_labelled_by_its_longest_known_calling_code() -> None:
    labels = CountryLabels()
    assert labels.of("+2348012345678") == "NG"
    assert labels.of("+233201234567") == "GH"
    assert labels.of("+447911123456") == "GB"
    assert labels.of("+14155550100") == "NANP"  # +1 is the whole North American plan
    assert labels.of("+27821234567") == "ZA"  # 27, not 2 (no country) nor 278


def test_unknown_numbers_are_other_and_a_send_without_a_phone_is_none() -> None:
    labels = CountryLabels()
    assert labels.of("+8613800138000") == "other"
    assert labels.of(None) == labels.of("") == labels.of("ada@example.com") == "none"


def test_a_calling_code_the_routing_table_names_gets_a_label_of_its_own() -> None:
    labels = CountryLabels(["1876", "234", "nonsense"])
    assert labels.of("+18765550100") == "+1876"  # Jamaica, routed apart: longer than +1
    assert labels.of("+2348012345678") == "NG"  # the table's name wins over the bare code
    assert labels.labels() == frozenset({*CALLING_CODES.values(), "+1876", "other", "none"})


@given(st.text(alphabet="+0123456789", max_size=16))
def test_any_input_maps_into_the_bounded_label_set(phone: str) -> None:
    labels = CountryLabels(["1876"])
    assert labels.of(phone) in labels.labels()
