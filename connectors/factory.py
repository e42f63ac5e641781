"""Connectors by provider name, configured from Settings."""

from __future__ import annotations

from typing import Any

from connectors.base import Connector
from connectors.mailgun_email import MailgunEmail
from connectors.sendgrid_email import SendGridEmail
from connectors.termii_sms import TermiiSms
from connectors.twilio_sms import TwilioSms
from pipeline.config import Settings

CONNECTORS: dict[str, type[TwilioSms | TermiiSms | SendGridEmail | MailgunEmail]] = {
    "twilio": TwilioSms, "termii": TermiiSms, "sendgrid": SendGridEmail, "mailgun": MailgunEmail,
}


def create_connector(provider: str, settings: Settings, **overrides: Any) -> Connector:
    """The connector of `provider` (twilio, termii, sendgrid, mailgun); `overrides` replace constructor arguments."""
    try:
        cls = CONNECTORS[provider]
    except KeyError:
        raise ValueError(f"unknown provider {provider!r}; known: {sorted(CONNECTORS)}") from None
    return cls.from_settings(settings, **overrides)
