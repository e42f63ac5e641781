"""How an SMS is counted: its encoding, its length as providers and carriers count it, and its segments.

A text entirely of the GSM 03.38 alphabet (the basic table, and the extension table whose characters take two
septets: an escape and the character) is sent as GSM-7: 160 septets in one segment, 153 per segment when split
(7 go to the concatenation header). One character outside it (an emoji, a Naira sign, Cyrillic) makes the whole
text UCS-2: 70 UTF-16 units in one segment, 67 per segment when split, an astral character taking two. A character
is never split across two segments (an escape stays with its septet, surrogates stay together), as carriers and
Twilio's segment counter do, so a split text can take one segment more than its length divided by 153 or 67.
Carriers bill per segment (pipeline/policy/cost.py); shadow reports compare them (pipeline/policy/shadow.py).

Pure functions.
"""

from __future__ import annotations

from typing import Final, Literal

Encoding = Literal["GSM-7", "UCS-2"]

GSM7_BASIC: Final = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà")
GSM7_EXTENSION: Final = frozenset("\f^{}\\[~]|€")


def encoding(text: str) -> Encoding:
    """GSM-7 when every character is in the GSM 03.38 basic or extension table; UCS-2 otherwise."""
    return "GSM-7" if all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text) else "UCS-2"


def utf16_length(text: str) -> int:
    """Length as SMS providers' APIs count it (Twilio's 1,600 limit): UTF-16 code units (an emoji is two)."""
    return len(text.encode("utf-16-le")) // 2


def _widths(text: str) -> list[int]:
    """Each character's length: septets for GSM-7 (an extension character two), UTF-16 units for UCS-2."""
    if encoding(text) == "GSM-7":
        return [2 if c in GSM7_EXTENSION else 1 for c in text]
    return [2 if ord(c) > 0xFFFF else 1 for c in text]


def units(text: str) -> int:
    """The length a carrier counts: septets for GSM-7, UTF-16 units for UCS-2."""
    return sum(_widths(text))


def segments(text: str) -> int:
    """How many segments the SMS takes (at least one)."""
    single, per_part = (160, 153) if encoding(text) == "GSM-7" else (70, 67)
    widths = _widths(text)
    if sum(widths) <= single:
        return 1
    parts, room = 1, per_part
    for width in widths:
        if width > room:
            parts, room = parts + 1, per_part
        room -= width
    return parts
