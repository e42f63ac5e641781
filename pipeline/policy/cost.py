"""What a message costs at its provider: prices per message from configuration, SMS billed per segment.

Carriers bill an SMS per segment (pipeline/policy/sms.py counts them); email and push are billed per message.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.policy import sms


def message_cost(prices: Mapping[str, float], provider: str, channel: str, body: str) -> float:
    """USD for one accepted message: the provider's price, times the segments for SMS."""
    units = sms.segments(body) if channel == "sms" else 1
    return prices.get(provider, 0.0) * units
