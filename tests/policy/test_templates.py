"""Templates as files (templates/): per channel and locale, sandboxed and strict; SMS encoding and segments; the
`notify templates` commands and the start-up check. Pure: no broker, no database."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline import cli, config
from pipeline.api.openapi import openapi_document
from pipeline.domain import CHANNELS
from pipeline.errors import ConfigError
from pipeline.policy import templates
from pipeline.policy.sms import encoding as sms_encoding
from pipeline.policy.sms import segments as sms_segments
from pipeline.policy.templates import TemplateError, render

TEMPLATES = config.REPO_ROOT / "templates"
Use = Callable[[dict[str, str]], templates.Catalogue]
DEBIT = {"amount": "5000", "currency": "NGN", "account": "****1234", "merchant": "Shoprite"}


def task(template_id: str, channel: str = "sms", locale: str = "en", **params: str) -> dict[str, object]:
    return {"content": None, "template_id": template_id, "locale": locale, "channel": channel,
            "template_params": params}


def write(root: Path, files: dict[str, str]) -> Path:
    """A templates folder: the repository's, with `files` (relative path -> text; "" removes it) changed."""
    shutil.copytree(TEMPLATES, root)
    for name, text in files.items():
        path = root / name
        if text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        else:
            path.unlink()
    return root


@pytest.fixture
def use(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Use:
    """use(files): render from a copy of templates/ with `files` changed (NOTIFY_TEMPLATES_DIR points at it)."""
    def apply(files: dict[str, str]) -> templates.Catalogue:
        root = write(tmp_path / "templates", files)
        monkeypatch.setenv("NOTIFY_TEMPLATES_DIR", str(root))
        return templates.catalogue()
    return apply


def test_every_template_renders_on_every_channel_in_every_locale() -> None:
    found = templates.validate()
    assert found.problems == () and found.directory == TEMPLATES
    assert set(found.ids) == {"otp.login", "otp.default", "transaction.debit", "transaction.default",
                              "security.default", "price_alert.default", "portfolio.default", "marketing.default"}
    assert set(found.templates["otp.login"]) == {"en", "fr"}
    for template_id, locales in found.templates.items():
        for locale, parts in locales.items():
            params = {name: "v" for part in parts.values() for name in part.variables}
            email, sms, push = (render(task(template_id, channel, locale, **params)) for channel in
                                ("email", "sms", "push"))
            assert email.subject and email.body.strip(), (template_id, locale)
            assert sms.body == push.body == email.body  # no sms.txt or push_body.txt: the email text
            assert push.subject == email.subject  # no push_title.txt: the email subject
            assert sms.html is None and push.html is None
    assert render(task("otp.login", "email", code="424242")).html == (
        "<p>Your login code is <strong>424242</strong>.</p>\n<p>It expires in 5 minutes. Never share it.</p>")


def test_the_texts_are_those_of_the_former_catalogue() -> None:
    rendered = render(task("transaction.debit", "email", **DEBIT))
    assert rendered.subject == "Debit alert"
    assert rendered.body == "Debit of 5000 NGN on account ****1234 at Shoprite."  # no trailing newline
    assert render(task("otp.login", locale="fr", code="1")).body == (
        "Votre code de connexion est 1. Il expire dans 5 minutes.")


@pytest.mark.parametrize(("locale", "folder"), [
    ("en-NG", "en"), ("fr-CA", "fr"), ("fr", "fr"), ("FR_ca", "fr"), ("xx", "en"), ("yo-NG", "en"), (None, "en"),
])
def test_a_locale_falls_back_to_its_language_then_to_english(locale: str | None, folder: str) -> None:
    assert templates.resolve_locale("otp.login", locale) == folder
    expected = {"fr": "Votre code de connexion", "en": "Your login code"}[folder]
    assert render({**task("otp.login", "email", code="1"), "locale": locale}).subject == expected


def test_a_regional_folder_wins_over_its_language(use: Use) -> None:
    use({"otp.login/en-NG/email_text.txt": "Your Naija code is {{ code }}.\n"})
    assert render(task("otp.login", locale="en-NG", code="7")).body == "Your Naija code is 7."
    assert render(task("otp.login", locale="en-GB", code="7")).body.startswith("Your login code is 7.")


def test_each_channel_reads_its_own_file_and_falls_back_within_the_locale(use: Use) -> None:
    use({"otp.login/en/sms.txt": "{{ code }} is your code\n", "otp.login/en/push_title.txt": "Sign in\n",
         "otp.login/en/push_body.txt": "Tap to see your code\n"})
    sms, email, push = (render(task("otp.login", channel, code="9")) for channel in CHANNELS)
    assert sms.body == "9 is your code"
    assert (push.subject, push.body) == ("Sign in", "Tap to see your code")
    assert (email.subject, email.body) == ("Your login code", "Your login code is 9. It expires in 5 minutes. "
                                                              "Never share it.")
    french = render(task("otp.login", "sms", "fr", code="9"))  # fr has no sms.txt: its own email text, not en's
    assert french.body == "Votre code de connexion est 9. Il expire dans 5 minutes."


def test_a_missing_variable_is_named_and_a_defined_test_still_works(use: Use) -> None:
    with pytest.raises(TemplateError) as caught:
        render(task("transaction.debit", "email", amount="5"))
    assert caught.value.code == "missing_template_param"
    assert str(caught.value) == "template 'transaction.debit' needs account, currency, merchant"
    use({"otp.login/en/sms.txt": "{{ code }}{% if name is defined %} for {{ name }}{% endif %}\n"})
    assert render(task("otp.login", code="1")).body == "1"
    assert render(task("otp.login", code="1", name="Ada")).body == "1 for Ada"
    with pytest.raises(TemplateError) as caught:
        render(task("otp.login", name="Ada"))
    assert str(caught.value) == "template 'otp.login' needs code"


def test_an_unknown_template_is_refused_with_the_known_ones() -> None:
    with pytest.raises(TemplateError) as caught:
        render(task("promo.nov"))
    assert caught.value.code == "unknown_template"
    assert str(caught.value) == f"no template 'promo.nov'; known: {', '.join(templates.template_ids())}"
    enum = openapi_document()["components"]["schemas"]["NotificationRequest"]["properties"]["template_id"]["enum"]
    assert enum == [*templates.template_ids(), None]


def test_the_sandbox_blocks_attribute_access_and_the_template_is_refused(use: Use) -> None:
    found = use({"otp.login/en/sms.txt": "{{ ''.__class__.__mro__ }}\n",
                 "otp.default/en/push_body.txt": "{{ code.__class__ }}\n"})
    assert [p.split(":")[0] for p in found.problems] == ["otp.default/en/push_body.txt", "otp.login/en/sms.txt"]
    assert all("not allowed in the sandbox" in p and "unsafe" in p for p in found.problems)
    with pytest.raises(TemplateError) as caught:
        render(task("otp.login", "email", code="1"))  # the email parts are fine, but the template is broken
    assert caught.value.code == "invalid_template" and "otp.login/en/sms.txt" in str(caught.value)
    with pytest.raises(TemplateError) as caught:
        render(task("otp.default", "sms", code="1"))
    assert caught.value.code == "invalid_template"
    assert render(task("security.default")).body  # other templates still render


def test_html_is_escaped_and_text_is_not() -> None:
    merchant = '<script>alert("x")</script> & Co'
    email = render(task("transaction.debit", "email", **{**DEBIT, "merchant": merchant}))
    assert email.html is not None and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; Co" in email.html
    assert "<script>" not in email.html and "<strong>5000 NGN</strong>" in email.html  # the markup is the file's
    assert merchant in email.body
    assert merchant in render(task("transaction.debit", "sms", **{**DEBIT, "merchant": merchant})).body


@pytest.mark.parametrize(("body", "encoding", "segments"), [
    ("", "GSM-7", 1),
    ("a" * 160, "GSM-7", 1),
    ("a" * 161, "GSM-7", 2),
    ("a" * 306, "GSM-7", 2),
    ("a" * 307, "GSM-7", 3),
    ("@£$¥èéÄÖÑÜ§¿äöñüà\n\r", "GSM-7", 1),
    ("€" * 80, "GSM-7", 1),  # extension characters take two septets: 160
    ("€" * 80 + "a", "GSM-7", 2),
    ("{" * 79 + "a" * 3, "GSM-7", 2),  # 161
    ("a" * 152 + "{" + "a" * 152, "GSM-7", 3),  # 306 septets, but the { cannot straddle parts 1 and 2
    ("ж" * 70, "UCS-2", 1),
    ("ж" * 71, "UCS-2", 2),
    ("ж" * 134, "UCS-2", 2),
    ("ж" * 135, "UCS-2", 3),
    ("a" * 69 + "ç", "UCS-2", 1),  # GSM-7 has Ç, not ç: one character makes the whole message UCS-2
    ("a" * 70 + "á", "UCS-2", 2),
    ("😀" * 35, "UCS-2", 1),  # 70 UTF-16 units
    ("😀" * 35 + "a", "UCS-2", 2),
    ("a" * 66 + "😀" + "a" * 66, "UCS-2", 3),  # 134 units, but the emoji cannot straddle parts 1 and 2
])
def test_sms_encoding_and_segments(body: str, encoding: str, segments: int) -> None:
    assert sms_encoding(body) == encoding
    assert sms_segments(body) == segments


def test_a_broken_folder_lists_each_problem(tmp_path: Path) -> None:
    root = write(tmp_path / "templates", {
        "marketing.default/en/email_text.txt": "", "marketing.default/en/sms.text": "hi\n",
        "security.default/en/email_subject.txt": "{{ code \n", "portfolio.default/en/email_text.txt": " \n",
        "otp.login/fr_FR/email_text.txt": "x\n", "Promo/en/email_text.txt": "x\n",
    })
    shutil.move(root / "price_alert.default", root / "price_alert.other")
    (root / "price_alert.other" / "en").rename(root / "price_alert.other" / "de")
    problems = templates.load(root).problems
    assert problems == (
        "Promo: not a template folder (<type>.<name>, lower case, e.g. otp.login)",
        "marketing.default/en/sms.text: unknown file; known: email_subject.txt, email_text.txt, email_html.html, "
        "sms.txt, push_title.txt, push_body.txt",
        "marketing.default/en/email_text.txt: missing (every other body falls back to it)",
        "otp.login/fr_FR: not a locale folder (such as en, fr or en-NG)",
        "portfolio.default/en/email_text.txt: empty",
        "price_alert.other/en: missing (the locale every other falls back to)",
        "security.default/en/email_subject.txt:1: unexpected end of template, expected 'end of print statement'.",
        "price_alert.default: missing (every notification type has a default template)",
    )
    with pytest.raises(ConfigError) as caught:
        templates.validate(root)
    assert str(caught.value).startswith(f"templates in {root} are invalid:\n  Promo: not a template folder")
    assert templates.load(tmp_path / "nowhere").problems == (
        f"{tmp_path / 'nowhere'}: not a directory (NOTIFY_TEMPLATES_DIR)",)


def notify(*argv: str, templates_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NOTIFY_TEMPLATES_DIR": str(templates_dir)}
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], env=env, capture_output=True, text=True,
                          timeout=60, cwd=config.REPO_ROOT)


def test_templates_check_exits_1_naming_the_broken_file(tmp_path: Path) -> None:
    good = notify("templates", "check", templates_dir=TEMPLATES)
    assert (good.returncode, good.stdout) == (0, f"templates: 8 templates in {TEMPLATES}, every one valid\n")
    broken = write(tmp_path / "templates", {"otp.login/fr/email_html.html": "<p>{{ code }</p>\n"})
    checked = notify("templates", "check", templates_dir=broken)
    assert checked.returncode == 1
    assert checked.stdout.startswith("! otp.login/fr/email_html.html:1: unexpected '}'")


@pytest.mark.parametrize("argv", [("api",), ("worker", "--stage", "sender", "--lane", "critical")])
def test_the_api_and_workers_refuse_to_start_with_invalid_templates(tmp_path: Path, argv: tuple[str, ...]) -> None:
    broken = write(tmp_path / "templates", {"otp.login/en/push_body.txt": "{{ code.__class__ }}\n"})
    started = notify(*argv, templates_dir=broken)
    assert started.returncode == 1
    assert f"notify {argv[0]}: templates in {broken} are invalid:\n  otp.login/en/push_body.txt: not allowed" in (
        started.stderr)


def test_templates_render_shows_each_channel_with_the_sms_encoding(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["templates", "render", "otp.login", "--locale", "fr-CA", "--param", "code=123456"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("otp.login: locale fr-CA renders from fr/\n\n[sms]\nbody:\nVotre code de connexion est "
                          "123456. Il expire dans 5 minutes.\nsms: GSM-7, 61 characters, 1 segment(s)\n\n[email]\n"
                          "subject: Votre code de connexion\n")
    assert "html:\n<p>Votre code de connexion est <strong>123456</strong>.</p>" in out
    assert "\n[push]\ntitle: Votre code de connexion\n" in out
    assert cli.main(["templates", "render", "transaction.debit", "--channel", "sms", *(
        f"--param={k}={v}" for k, v in {**DEBIT, "merchant": "Café € ж"}.items())]) == 0
    out = capsys.readouterr().out
    assert "[email]" not in out and out.endswith("sms: UCS-2, 50 characters, 1 segment(s)\n")
    assert cli.main(["templates", "render", "otp.login"]) == 1
    assert capsys.readouterr().err == "notify templates render: missing_template_param: template 'otp.login' " \
                                      "needs code\n"
