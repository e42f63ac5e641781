"""The ops console in a real browser: Debian's headless Chromium driven by Selenium (chromium-driver), against the API
process, the simulator and the after-send workers (sender, retry, receipts, and the lag exporter) on the real stack.

Data is made the way production makes it: SMS and email tasks go through the sender to the simulator and come back
as receipts; one SMS exhausts its retry tiers into the DLQ; undecodable bytes on a send topic are quarantined. Each
page is loaded after logging in with an admin key, checked for that data, and saved as a screenshot in the test's
tmp_path (and, with UPDATE_SCREENSHOTS=1, in docs/console/ for the README: a plain run leaves the work tree clean).
A DLQ redrive done through the page's dry run and confirmation reaches the simulator's ledger exactly once; forged
posts (a tampered token, none, another site's form) are refused with 403.
"""

from __future__ import annotations

import base64
import http.server
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from support.loop_rig import LoopRig, start_loop

from pipeline.api.keys import create_key
from pipeline.bench.sender_rig import make_task
from pipeline.config import REPO_ROOT, Settings
from pipeline.domain import STAGES
from pipeline.kafka import clients, topics
from pipeline.stack.common import ensure_debian_packages, find_binary
from pipeline.stages.worker import processes as processes_of
from pipeline.state import db

SCREENSHOTS = REPO_ROOT / "docs" / "console"
UPDATE_SCREENSHOTS = os.environ.get("UPDATE_SCREENSHOTS") == "1"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000")
FAILING = {"error_rates": {"5xx": 1.0}}
HEALTHY = {"error_rates": {}, "outage_s": 0, "undelivered_rate": 0.0, "accept_then_hang": 0.0,
           "lost_receipts": 0.0, "delivery_delay_ms": 200}
SECRET = "console-browser-test-secret"


@pytest.fixture(scope="module")
def rig(settings: Settings) -> Iterator[LoopRig]:
    yield from start_loop(settings, "tcon", STAGES, exporter=True, api_env={
        "NOTIFY_METRICS_PORT": "{metrics_port}", "NOTIFY_API_PORT": "{api_port}", "NOTIFY_CONSOLE_SECRET": SECRET})


@pytest.fixture(scope="module")
def seeded(rig: LoopRig) -> Iterator[dict[str, Any]]:
    """Delivered SMS and email, one dead letter, one quarantined record; the admin key of the console."""
    for provider in ("twilio", "termii", "sendgrid", "mailgun"):
        rig.sim.configure(provider, **HEALTHY)
    user = f"ada-{uuid.uuid4().hex[:8]}"
    delivered = rig.run([make_task(user_id=user, notification_type="transaction") for _ in range(4)]
                        + [make_task(user_id=user, notification_type="portfolio", channel="email", ttl=None)
                           for _ in range(2)])
    assert set(rig.wait(delivered, timeout_s=60).values()) == {"delivered"}
    rig.sim.configure("twilio", **FAILING)
    rig.sim.configure("termii", **FAILING)
    [dead] = rig.run([make_task(user_id=user, to=f"+1415{uuid.uuid4().int % 10_000_000:07d}")])
    assert rig.wait([dead], done=("dead_lettered",), timeout_s=60) == {dead: "dead_lettered"}
    rig.sim.configure("twilio", **HEALTHY)
    rig.sim.configure("termii", **HEALTHY)
    producer = clients.producer(rig.settings)
    producer.produce(rig.settings.topic(topics.send_topic("sms", "critical")), key=b"broken", value=b"\x00garbage")
    assert producer.flush(30) == 0
    service = f"ops-{uuid.uuid4().hex[:8]}"
    _, key = create_key(rig.settings, service, ["admin"])
    deadline = time.monotonic() + 30
    while not _quarantined(rig) and time.monotonic() < deadline:
        time.sleep(0.5)
    yield {"user": user, "delivered": delivered, "dead": dead, "key": key}
    with db.connect(rig.settings) as conn, conn.transaction():
        conn.execute("DELETE FROM api_keys WHERE service = %s", (service,))


def _quarantined(rig: LoopRig) -> bool:
    from pipeline.ops import quarantine

    return bool(quarantine.select(quarantine.read(rig.settings), {"key": "broken"}))


@pytest.fixture(scope="module")
def browser(rig: LoopRig, seeded: dict[str, Any]) -> Iterator[webdriver.Chrome]:
    """Headless Debian Chromium (installed here when missing), logged in to the console with the admin key."""
    ensure_debian_packages({"chromium": "chromium", "chromedriver": "chromium-driver"})
    profile = tempfile.mkdtemp(prefix="notify-chromium-")
    options = Options()
    options.binary_location = find_binary("chromium") or "/usr/bin/chromium"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager never downloads anything
    driver = webdriver.Chrome(service=Service(find_binary("chromedriver") or "/usr/bin/chromedriver"),
                              options=options)
    driver.set_page_load_timeout(45)
    try:
        driver.get(f"{rig.api_url}/console/pipeline")
        assert driver.current_url.endswith("/console/login")
        driver.find_element(By.ID, "key").send_keys(seeded["key"])
        click(driver, By.ID, "login")
        assert driver.current_url.endswith("/console/pipeline"), driver.page_source[:2000]
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def click(driver: webdriver.Chrome, by: str, value: str) -> None:
    """Click what submits a form or follows a link, and wait until the next page replaced this one."""
    page = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(by, value).click()
    WebDriverWait(driver, 30).until(expected_conditions.staleness_of(page))


def screenshot(driver: webdriver.Chrome, name: str, tmp_path: Path) -> None:
    """The whole page (beyond the window, through the DevTools protocol) as a test artifact, and as
    docs/console/<name>.png when UPDATE_SCREENSHOTS=1."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 6000), "scale": 1}})
    png = base64.b64decode(shot["data"])
    assert png.startswith(b"\x89PNG")
    (tmp_path / f"{name}.png").write_bytes(png)
    if UPDATE_SCREENSHOTS:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        (SCREENSHOTS / f"{name}.png").write_bytes(png)


def cells(driver: webdriver.Chrome, table_id: str) -> list[list[str]]:
    rows = driver.find_element(By.ID, table_id).find_elements(By.TAG_NAME, "tr")[1:]
    return [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")] for row in rows]


def test_the_pipeline_page_shows_lag_throughput_and_the_readiness_of_every_process(
        rig: LoopRig, browser: webdriver.Chrome, tmp_path: Path) -> None:
    browser.get(f"{rig.api_url}/console/pipeline")
    processes = {row[0]: row[3] for row in cells(browser, "processes")}
    assert set(processes) == {"api", "exporter", *(f"{stage}/{lane}" for stage, lane in processes_of(
        ("critical", "bulk"), STAGES))}
    assert set(processes.values()) == {"ready"}  # every process of the rig answers its health check
    stages = {(row[0], row[1]): row for row in cells(browser, "stages")}
    assert stages[("sender", "critical")][2] != "-"  # the exporter's lag of the sender's group
    assert stages[("sender", "critical")][3] != "-"  # a rate from two scrapes
    screenshot(browser, "pipeline", tmp_path)


def test_the_providers_page_shows_breakers_success_rate_latency_and_cost_per_country(
        rig: LoopRig, browser: webdriver.Chrome, tmp_path: Path) -> None:
    browser.get(f"{rig.api_url}/console/providers")
    breakers = {row[0]: row[1] for row in cells(browser, "breakers")}
    assert set(breakers) == {"twilio", "termii", "sendgrid", "mailgun", "fcm", "apns"}
    rows = {(row[0], row[1]): row for row in cells(browser, "provider-figures")}
    assert int(rows[("twilio", "NG")][2]) >= 4 and int(rows[("twilio", "NANP")][2]) >= 4  # ok and failed calls
    # the shared database holds other tests' calls too: ours are 4 accepted (NG) and 4 transient (NANP) at least
    assert rows[("twilio", "NANP")][3].endswith(" %") and float(rows[("twilio", "NANP")][3][:-2]) < 100
    assert rows[("sendgrid", "none")][4].endswith(" ms") and float(rows[("twilio", "NG")][5]) > 0
    screenshot(browser, "providers", tmp_path)


def test_the_dlq_page_lists_the_dead_letter_and_its_detail_shows_headers_and_attempts(
        rig: LoopRig, seeded: dict[str, Any], browser: webdriver.Chrome, tmp_path: Path) -> None:
    browser.get(f"{rig.api_url}/console/dlq?notification_id={seeded['dead']}")
    [entry] = cells(browser, "entries")
    assert entry[3:6] == ["sms", "otp", "retries_exhausted"] and entry[6] == seeded["dead"]
    screenshot(browser, "dlq", tmp_path)
    click(browser, By.LINK_TEXT, entry[0])
    headers = {row[0]: row[1] for row in cells(browser, "headers")}
    assert headers["notify-reason"] == "retries_exhausted"
    assert '"attempt_history"' in browser.find_element(By.ID, "payload").text
    screenshot(browser, "dlq-entry", tmp_path)


def test_the_quarantine_page_lists_the_undecodable_record_and_shows_its_bytes(
        rig: LoopRig, browser: webdriver.Chrome, tmp_path: Path) -> None:
    browser.get(f"{rig.api_url}/console/quarantine?key=broken")
    [entry] = cells(browser, "entries")
    assert entry[2] == "sender" and entry[4].startswith(rig.settings.topic("send.sms.critical") + "/")
    screenshot(browser, "quarantine", tmp_path)
    click(browser, By.LINK_TEXT, entry[0])
    assert "garbage" in browser.find_element(By.ID, "payload").text


def test_the_notification_lookup_shows_a_users_notifications_and_one_timeline_in_order(
        rig: LoopRig, seeded: dict[str, Any], browser: webdriver.Chrome, tmp_path: Path) -> None:
    browser.get(f"{rig.api_url}/console/notifications")
    browser.find_element(By.ID, "q").send_keys(seeded["user"])
    click(browser, By.ID, "lookup")
    assert {row[0] for row in cells(browser, "found")} == {*seeded["delivered"], seeded["dead"]}
    browser.find_element(By.ID, "q").clear()
    browser.find_element(By.ID, "q").send_keys(seeded["delivered"][0])
    click(browser, By.ID, "lookup")
    states = [row[3] for row in cells(browser, "timeline") if row[1] == "state"]
    assert states == ["queued", "queued → sending", "sending → accepted", "accepted → delivered"]
    assert [row[3] for row in cells(browser, "attempts")] == ["accepted"]
    screenshot(browser, "notification", tmp_path)


def test_the_replay_planner_shows_each_partitions_move_without_moving_anything(
        rig: LoopRig, browser: webdriver.Chrome, tmp_path: Path) -> None:
    group, topic = rig.settings.topic("notify-sender-critical"), rig.settings.topic("send.sms.critical")
    browser.get(f"{rig.api_url}/console/replay")
    browser.find_element(By.CSS_SELECTOR, f"#group option[value='{group}']").click()
    browser.find_element(By.CSS_SELECTOR, f"#topic option[value='{topic}']").click()
    browser.find_element(By.ID, "at").send_keys("2020-01-01T00:00:00Z")
    click(browser, By.ID, "plan")
    moves = cells(browser, "moves")
    assert moves and all(row[2] == row[4] for row in moves)  # back to each partition's start
    assert "active member" in browser.find_element(By.ID, "plan-summary").text  # the sender runs
    screenshot(browser, "replay", tmp_path)


class _AttackerPage(http.server.BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:
        page = (f'<form method="post" action="{self.target}"><input name="confirm" value="yes">'
                '<input name="positions" value="0:0 1:0 2:0"></form><script>document.forms[0].submit()</script>')
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(page.encode())

    def log_message(self, *_args: Any) -> None:
        pass


def test_forged_form_posts_are_refused_and_redrive_nothing(
        rig: LoopRig, seeded: dict[str, Any], browser: webdriver.Chrome) -> None:
    # a confirmed redrive posted from a console page of this session, with a wrong token and with none
    for token in ("forged", None):
        browser.get(f"{rig.api_url}/console/replay")
        browser.execute_script(
            "const f = document.createElement('form'); f.method = 'post'; f.id = 'forged';"
            "f.action = '/console/dlq/redrive';"
            "for (const [k, v] of Object.entries(arguments[0])) { const i = document.createElement('input');"
            " i.name = k; i.value = v; f.appendChild(i); }"
            "const b = document.createElement('button'); b.id = 'forge'; f.appendChild(b);"
            "document.body.appendChild(f);",
            {"notification_id": seeded["dead"], "confirm": "yes", "positions": "0:0 1:0 2:0 3:0",
             **({"csrf": token} if token else {})})
        click(browser, By.ID, "forge")
        assert "403" in browser.title and "CSRF token" in browser.find_element(By.ID, "problem").text

    # another site's page posting to the console: the SameSite=Strict cookie stays home, the post is refused
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _AttackerPage.target = f"{rig.api_url}/console/dlq/redrive"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _AttackerPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://localhost:{port}/")  # localhost and 127.0.0.1 are different sites
        deadline = time.monotonic() + 10
        while "/console/dlq/redrive" not in browser.current_url and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "403" in browser.title and "no console session" in browser.find_element(By.ID, "problem").text
    finally:
        server.shutdown()
    assert rig.rows([seeded["dead"]])[seeded["dead"]]["state"] == "dead_lettered"
    assert rig.ledger_of([seeded["dead"]]) == []


def test_a_dlq_redrive_from_the_page_dry_runs_confirms_and_reaches_the_ledger_exactly_once(
        rig: LoopRig, seeded: dict[str, Any], browser: webdriver.Chrome, tmp_path: Path) -> None:
    dead = seeded["dead"]
    browser.get(f"{rig.api_url}/console/dlq?notification_id={dead}")
    click(browser, By.ID, "plan-redrive")
    assert browser.find_element(By.ID, "would-count").text == "1"
    assert rig.rows([dead])[dead]["state"] == "dead_lettered"  # a dry run changes nothing
    screenshot(browser, "dlq-redrive-dry-run", tmp_path)
    click(browser, By.ID, "confirm-redrive")
    assert browser.find_element(By.ID, "redriven-count").text == "1"
    assert rig.wait([dead], timeout_s=30) == {dead: "delivered"}
    time.sleep(2)
    assert len(rig.ledger_of([dead])) == 1
    browser.get(f"{rig.api_url}/console/dlq?notification_id={dead}")
    click(browser, By.ID, "plan-redrive")
    assert browser.find_element(By.ID, "would-count").text == "0"
    assert "delivery is delivered" in browser.find_element(By.ID, "skipped").text

