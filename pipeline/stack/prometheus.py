"""Prometheus from Debian's packages, scraping the pipeline's processes with the rules of infra/prometheus/.

The stack runs it from a copy of infra/prometheus/ under the stack folder: prometheus.yml and the rules as they
are, and the file-discovery targets written for the ports in force (`targets(settings)`). The copy is refreshed
on every `up`; Prometheus itself re-reads target files when they change, so `write_targets` adds processes (a
test's workers on ports of their own) to a running Prometheus without a restart.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import REPO_ROOT, Settings
from pipeline.domain import LANES, STAGES
from pipeline.errors import StackError
from pipeline.stack.common import OwnedProcess, ensure_debian_packages, find_binary
from pipeline.stack.service import LocalService

INFRA = REPO_ROOT / "infra" / "prometheus"
JOBS = ("api", "workers", "exporter")
RETENTION = "2d"
Target = tuple[int, Mapping[str, str]]  # (port on 127.0.0.1, extra labels)


def targets(settings: Settings) -> dict[str, list[Target]]:
    """The pipeline's scrape targets per job, from the ports in force (as `notify run` starts them)."""
    from pipeline.stages.worker import exporter_port, metrics_port, processes

    return {
        "api": [(settings.api_port, {})],
        "workers": [(metrics_port(settings, stage, lane), {"stage": stage, "lane": lane})
                    for stage, lane in processes(LANES, STAGES)],
        "exporter": [(exporter_port(settings), {})],
    }


def file_sd(entries: Sequence[Target]) -> list[dict[str, Any]]:
    """Prometheus's file-discovery document for `entries`."""
    return [{"targets": [f"127.0.0.1:{port}"], "labels": dict(labels)} for port, labels in entries]


def config_dir(settings: Settings) -> Path:
    return settings.stack_dir / "prometheus" / "config"


def write_targets(settings: Settings, job: str, name: str, entries: Sequence[Target]) -> Path:
    """Write (atomically: Prometheus watches the folder) the targets file `<job>-<name>.json`."""
    if job not in JOBS:
        raise ValueError(f"unknown scrape job {job!r}; known: {', '.join(JOBS)}")
    folder = config_dir(settings) / "targets"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{job}-{name}.json"
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(file_sd(entries), indent=2) + "\n")
    partial.replace(path)
    return path


def remove_targets(settings: Settings, job: str, name: str) -> None:
    (config_dir(settings) / "targets" / f"{job}-{name}.json").unlink(missing_ok=True)


def prepare_config(settings: Settings) -> Path:
    """Copy infra/prometheus/ (config, rules) to the stack folder and write the local targets; the config path."""
    folder = config_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    config = (INFRA / "prometheus.yml").read_text().replace(
        "127.0.0.1:59090", f"127.0.0.1:{settings.prometheus_port}")
    (folder / "prometheus.yml").write_text(config)
    shutil.rmtree(folder / "rules", ignore_errors=True)
    shutil.copytree(INFRA / "rules", folder / "rules")
    for job, entries in targets(settings).items():
        write_targets(settings, job, "local", entries)
    return folder / "prometheus.yml"


class PrometheusService(LocalService):
    name = "prometheus"
    optional = True  # the pipeline runs without it; `up` says so when it cannot be installed

    @property
    def external(self) -> bool:
        return self.settings.prometheus_url is not None

    @property
    def address(self) -> str:
        return self.url

    @property
    def url(self) -> str:
        return self.settings.prometheus_url or f"http://127.0.0.1:{self.settings.prometheus_port}"

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.settings.prometheus_port,)

    @property
    def log_path(self) -> Path:
        return self.home / "prometheus.log"

    def ready(self, timeout_s: float = 3.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=timeout_s) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def install(self) -> None:
        ensure_debian_packages({"prometheus": "prometheus", "promtool": "prometheus"})

    def after_ready(self) -> None:
        """Refresh the copied config and rules (they may have changed since it started) and have it re-read them."""
        if self.external:  # its configuration is its owner's
            return
        prepare_config(self.settings)
        request = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def start(self) -> OwnedProcess:
        binary = find_binary("prometheus")
        if binary is None:
            raise StackError("prometheus not found after install")
        config = prepare_config(self.settings)
        with self.log_path.open("ab") as log:
            process = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={self.home / 'data'}",
                 f"--storage.tsdb.retention.time={RETENTION}",
                 f"--web.listen-address=127.0.0.1:{self.settings.prometheus_port}", "--web.enable-lifecycle"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=config.parent,
                start_new_session=True)
        owned = OwnedProcess.of(process.pid)
        if owned is None:
            raise StackError(f"prometheus exited at once:\n{self.failure_log()}")
        return owned
