"""What every service of the local stack has in common: start what is ours, use what is given, stop only ours."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from pipeline.config import Settings
from pipeline.errors import StackError
from pipeline.stack.common import OwnedProcess, port_open, tail_file


class LocalService(ABC):
    name: str  # a class's, or (several instances of one service: Kafka's nodes) an instance's
    optional: ClassVar[bool] = False  # the pipeline works without it: `up` reports why it did not start, and goes on

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    # --- what each service says about itself ---------------------------------------------------------------
    @property
    @abstractmethod
    def external(self) -> bool:
        """Given through the environment (used as is, never started or stopped here)."""

    @property
    @abstractmethod
    def address(self) -> str: ...

    @property
    @abstractmethod
    def ports(self) -> tuple[int, ...]:
        """Loopback ports the local instance listens on."""

    @property
    @abstractmethod
    def log_path(self) -> Path: ...

    @abstractmethod
    def ready(self, timeout_s: float = 3.0) -> bool:
        """Really ready: answers a request of its own protocol."""

    @abstractmethod
    def install(self) -> None:
        """Make sure the binaries are on the machine (Debian packages, jars)."""

    @abstractmethod
    def start(self) -> OwnedProcess:
        """Start the local instance in the background; do not wait for readiness."""

    def ready_for_setup(self, timeout_s: float) -> bool:
        """Answers well enough for `after_ready` (by default: simply ready)."""
        return self.ready(timeout_s)

    def after_ready(self) -> None:  # noqa: B027 (optional hook, empty by default)
        """One-time set-up that needs the service running (e.g. create the database)."""

    def stop_process(self, process: OwnedProcess) -> None:
        process.terminate()

    def failure_log(self) -> str:
        return tail_file(self.log_path)

    # --- shared behaviour -----------------------------------------------------------------------------------
    @property
    def home(self) -> Path:
        path = self.settings.stack_dir / self.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def _owned_file(self) -> Path:
        return self.home / "owned.json"

    def owned(self) -> OwnedProcess | None:
        """The running process this stack started, if any."""
        process = OwnedProcess.load(self._owned_file)
        return process if process is not None and process.alive() else None

    def launch(self) -> str:
        """Start the local instance unless it runs already; say what happened. Does not wait."""
        if self.external:
            return "external"
        running = self.owned()
        if running is not None:
            return f"already running (pid {running.pid})"
        busy = [port for port in self.ports if port_open(port)]
        if busy:
            raise StackError(
                f"{self.name}: 127.0.0.1:{busy[0]} is taken by a process this stack did not start; stop it, "
                f"or choose another port (see `notify config`), or point the stack at it with its URL variable"
            )
        self.install()
        process = self.start()
        process.save(self._owned_file)
        return f"started (pid {process.pid})"

    def down(self) -> str:
        if self.external:
            return "external: left alone"
        running = self.owned()
        if running is None:
            self._owned_file.unlink(missing_ok=True)
            return "not running"
        self.stop_process(running)
        self._owned_file.unlink(missing_ok=True)
        return f"stopped (pid {running.pid})"

    def health(self) -> tuple[str, bool]:
        """(what to show, healthy) for `notify stack status`."""
        if self.external:
            ok = self.ready(2.0)
            return ("external, ready" if ok else "external, NOT ANSWERING"), ok
        running = self.owned()
        if running is None:
            return "not running", False
        ok = self.ready(2.0)
        return (f"running (pid {running.pid}), " + ("ready" if ok else "NOT READY")), ok
