"""What a message costs at its provider: prices per message from configuration, SMS billed per segment.

Carriers bill an SMS per segment: 160 characters of the GSM-7 alphabet fit one, and a longer text is split into
segments of 153 (7 characters go to the concatenation header). One character outside GSM-7 (an emoji, a Naira
sign) turns the whole text into UCS-2: 70 per single segment, 67 when split. Characters of GSM-7's extension table
take two septets. Email and push are billed per message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

GSM7_BASIC: Final = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION: Final = frozenset("^{}\\[~]|€\f")


def sms_segments(body: str) -> int:
    """How many segments a carrier bills for `body` (at least one)."""
    if all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in body):
        septets = sum(2 if c in GSM7_EXTENSION else 1 for c in body)
        return 1 if septets <= 160 else math.ceil(septets / 153)
    units = sum(2 if ord(c) > 0xFFFF else 1 for c in body)  # UTF-16 code units: astral characters take two
    return 1 if units <= 70 else math.ceil(units / 67)


def message_cost(prices: Mapping[str, float], provider: str, channel: str, body: str) -> float:
    """USD for one accepted message: the provider's price, times the segments for SMS."""
    units = sms_segments(body) if channel == "sms" else 1
    return prices.get(provider, 0.0) * units
