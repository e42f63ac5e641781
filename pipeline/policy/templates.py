"""Rendering a task's content: pre-rendered `content` as is, or a template from the catalogue with its params.

Pure: the sender calls `render` before it claims anything it could not send. A template that does not exist or
lacks a parameter is a permanent failure with a clear code (retrying cannot fix it), never a crash.
Templates are per locale with an English fallback; `{name}` placeholders take `template_params`.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final


@dataclass(frozen=True)
class Rendered:
    subject: str | None
    body: str


class TemplateError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# template id -> locale -> (subject, body). `<type>.default` exists for every notification type.
CATALOGUE: Final[Mapping[str, Mapping[str, tuple[str | None, str]]]] = {
    "otp.login": {
        "en": ("Your login code", "Your login code is {code}. It expires in 5 minutes. Never share it."),
        "fr": ("Votre code de connexion", "Votre code de connexion est {code}. Il expire dans 5 minutes."),
    },
    "otp.default": {"en": ("Your verification code", "Your verification code is {code}. Never share it.")},
    "transaction.debit": {"en": ("Debit alert", "Debit of {amount} {currency} on account {account} at {merchant}.")},
    "transaction.default": {"en": ("Transaction alert", "A transaction was made on your account.")},
    "security.default": {"en": ("Security notice", "A new sign-in to your account. Not you? Contact us now.")},
    "price_alert.default": {"en": ("Price alert", "An asset on your watch list crossed your alert price.")},
    "portfolio.default": {"en": ("Portfolio update", "Your portfolio summary is ready.")},
    "marketing.default": {"en": ("News from us", "Something new is waiting for you in the app.")},
}


def _placeholders(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def render(task: Mapping[str, Any]) -> Rendered:
    """The subject and body to send for a DeliveryTask; raises TemplateError."""
    content = task.get("content")
    if content is not None:
        return Rendered(content.get("subject"), content["body"])
    template_id = task.get("template_id")
    locales = CATALOGUE.get(template_id or "")
    if locales is None:
        raise TemplateError("unknown_template", f"no template {template_id!r}")
    locale = str(task.get("locale") or "en")
    subject, body = locales.get(locale) or locales.get(locale.split("-")[0]) or locales["en"]
    params: Mapping[str, str] = task.get("template_params") or {}
    missing = sorted((_placeholders(body) | _placeholders(subject or "")) - set(params))
    if missing:
        raise TemplateError("missing_template_param", f"template {template_id!r} needs {missing}")
    return Rendered(subject.format_map(params) if subject else None, body.format_map(params))
