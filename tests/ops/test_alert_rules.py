"""Prometheus rules of infra/prometheus: promtool accepts them, their unit tests pass, and every alert says how bad
it is and what to do."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.stack.common import ensure_debian_packages, find_binary

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "infra" / "prometheus" / "rules"
RULE_TESTS = REPO / "infra" / "prometheus" / "tests"
SEVERITIES = {"page", "ticket"}
RECORDING_NAME = re.compile(r"^[a-z_]+:[a-z0-9_]+:[a-z0-9_]+$")  # level:metric:operations


@pytest.fixture(scope="module")
def promtool() -> str:
    """promtool from Debian's `prometheus` package, installed when missing."""
    ensure_debian_packages({"promtool": "prometheus"})
    found = find_binary("promtool")
    assert found, "promtool is still not on PATH after installing Debian's prometheus package"
    return found


def relative(paths: list[Path]) -> list[str]:
    return [str(path.relative_to(REPO)) for path in paths]


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def rule_files() -> list[Path]:
    found = sorted(RULES.glob("*.yml"))
    assert found, f"no rule files in {RULES}"
    return found


def rules_of(kind: str) -> list[dict[str, Any]]:
    """Every rule of the rule files that has `kind` (alert or record), with its group's name under `group`."""
    found = []
    for path in rule_files():
        for group in yaml.safe_load(path.read_text())["groups"]:
            found += [{**rule, "group": group["name"]} for rule in group["rules"] if kind in rule]
    return found


def test_promtool_accepts_every_rule_file(promtool: str) -> None:
    done = run_promtool(promtool, "check", "rules", *relative(rule_files()))
    assert done.returncode == 0, done.stdout + done.stderr


def test_rule_unit_tests_pass(promtool: str) -> None:
    tests = sorted(RULE_TESTS.glob("*.yml"))
    assert tests, f"no promtool unit tests in {RULE_TESTS}"
    done = run_promtool(promtool, "test", "rules", *relative(tests))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_severity_a_summary_and_a_one_line_runbook() -> None:
    alerts = rules_of("alert")
    assert alerts
    for alert in alerts:
        name = alert["alert"]
        assert alert.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity must be one of {SEVERITIES}"
        annotations = alert.get("annotations", {})
        assert annotations.get("summary", "").strip(), f"{name}: no summary annotation"
        runbook = annotations.get("runbook", "").strip()
        assert runbook, f"{name}: no runbook annotation"
        assert "\n" not in runbook, f"{name}: the runbook is one line"


def test_recording_rules_are_named_level_metric_operations_in_the_notify_recording_group() -> None:
    records = rules_of("record")
    assert records
    for rule in records:
        assert RECORDING_NAME.match(rule["record"]), f"{rule['record']}: not level:metric:operations"
        assert rule["group"] == "notify-recording", f"{rule['record']}: outside the notify-recording group"
