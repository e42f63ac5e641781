"""Which country a send is for, as a metric label: "which region is affected?" when a provider fails somewhere.

From the E.164 calling code of an SMS recipient: the longest known code wins (+1 vs +1876). The label set is
bounded, so per-country series cannot grow with traffic: the countries of CALLING_CODES (ISO 3166 alpha-2;
+1 is the whole North American Numbering Plan, `NANP`), the calling codes that routing overrides name and
this table does not (`+<code>`), `other` for any other number, and `none` where there is no phone (email, push).
Pure; the sender computes it once per message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

CALLING_CODES: Final[Mapping[str, str]] = {
    "1": "NANP", "20": "EG", "27": "ZA", "33": "FR", "44": "GB", "49": "DE", "55": "BR", "91": "IN",
    "212": "MA", "221": "SN", "225": "CI", "233": "GH", "234": "NG", "237": "CM", "250": "RW", "254": "KE",
    "255": "TZ", "256": "UG", "260": "ZM", "971": "AE",
}
NO_PHONE: Final = "none"
OTHER: Final = "other"


class CountryLabels:
    """The label of each phone number, over CALLING_CODES and the routing table's own calling codes."""

    def __init__(self, routed_codes: Iterable[str] = ()) -> None:
        self.codes: dict[str, str] = {code: f"+{code}" for code in routed_codes if code.isdigit()}
        self.codes.update(CALLING_CODES)

    def of(self, phone: str | None) -> str:
        if not phone or not phone.startswith("+"):
            return NO_PHONE
        for length in (4, 3, 2, 1):
            label = self.codes.get(phone[1:1 + length])
            if label is not None:
                return label
        return OTHER

    def labels(self) -> frozenset[str]:
        """Every value `of` can return."""
        return frozenset({*self.codes.values(), NO_PHONE, OTHER})
