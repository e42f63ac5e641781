"""The Kafka broker SIGKILLed mid-burst and started again, every stage running, receipts through the API's webhooks.

The broker is one of this module's own (a second KRaft node from the same jars, on ports and in a folder of its
own), so killing it leaves the broker the rest of the suite shares alone. SIGKILL gives the broker no chance to
flush or to tell anyone: producers see their requests time out, consumers lose their group coordinator, the
API answers webhooks 503 and the simulator gives up on some receipts. When the broker is back, the stages resume
from their committed offsets (a batch whose commit was lost is handled again, and the sender's claim holds), and
the reconciler asks the provider about each delivery whose receipt never came. Then, as in the fault matrix: the
simulator's ledger holds each notification once, every row is delivered, the delivery-events topic ends each one
once, and nothing went to quarantine.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.loop_rig import LoopRig, assert_each_once, delivered, produce_requests, start_loop, wait_until
from support.loop_rig import mixed_requests as requests

from pipeline.bench.rig import free_port_block
from pipeline.bench.sender_rig import states
from pipeline.config import Settings
from pipeline.kafka import clients
from pipeline.stack.common import OwnedProcess
from pipeline.stack.kafka import KafkaService

STAGES = ("intake", "preferences", "routing", "sender", "retry", "receipts")
BROKER_DOWN_S = 15
BURST = 2000


class OwnBroker:
    """A single-node Kafka of this module's own, which the test may SIGKILL and start again."""

    def __init__(self, settings: Settings, home: Path) -> None:
        port = free_port_block(2)
        self.settings = dataclasses.replace(settings, kafka_bootstrap_servers=None, kafka_port=port,
                                            kafka_controller_port=port + 1, stack_dir=home)
        self.service = KafkaService(self.settings)
        self.process: OwnedProcess | None = None
        self.bootstrap = f"127.0.0.1:{port}"

    def start(self, timeout_s: float = 90) -> float:
        """Start the broker; seconds until it answered a metadata request."""
        started = time.monotonic()
        self.process = self.service.start()
        while not clients.cluster_ready(self.settings, 2.0):
            assert self.process.alive(), f"the broker exited:\n{self.service.failure_log()}"
            assert time.monotonic() - started < timeout_s, f"the broker did not answer:\n{self.service.failure_log()}"
            time.sleep(0.5)
        return time.monotonic() - started

    def kill(self) -> None:
        assert self.process is not None and self.process.alive()
        os.kill(self.process.pid, signal.SIGKILL)
        wait_until("the broker gone", lambda: not self.process or not self.process.alive(), 10)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()


@pytest.fixture(scope="module")
def broker(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnBroker]:
    own = OwnBroker(settings, tmp_path_factory.mktemp("broker"))
    own.start()
    try:
        yield own
    finally:
        own.stop()


@pytest.fixture(scope="module")
def rig(settings: Settings, broker: OwnBroker) -> Iterator[LoopRig]:
    on_it = dataclasses.replace(settings, kafka_bootstrap_servers=broker.bootstrap)
    yield from start_loop(on_it, "tbroker", STAGES, {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap})


def test_the_broker_sigkilled_mid_burst_and_restarted_loses_nothing_and_repeats_nothing(
        rig: LoopRig, broker: OwnBroker) -> None:
    for provider in ("twilio", "termii", "sendgrid", "mailgun"):
        rig.sim.configure(provider, delivery_delay_ms=100)
    ids = produce_requests(rig.settings, requests(BURST, "fault-kafka"))
    wait_until("the first sends", lambda: len(rig.ledger_of(ids)) >= 1, 90)
    broker.kill()  # mid-burst: requests queued, sends in flight, receipts arriving
    ledger_at_kill = len(rig.ledger_of(ids))
    time.sleep(BROKER_DOWN_S)
    ledger_down = len(rig.ledger_of(ids))
    restart_s = broker.start()
    # Everything the sender holds reaches an answer; receipts the simulator gave up on during the outage are
    # what the reconciler is for (the provider's status API says delivered).
    settled_s = wait_until("every delivery sent and answered",
                           lambda: set(states(rig.settings, ids).values()) <= {"delivered", "accepted"}
                           and len(states(rig.settings, ids)) == len(ids), 180)
    time.sleep(3)  # past the simulated delivery of the last ones sent, and the receipts still coming
    waiting = [nid for nid, state in states(rig.settings, ids).items() if state == "accepted"]
    resolved = rig.reconcile(waiting)["resolved"] if waiting else {}
    try:
        recovery_s = wait_until("every notification delivered", lambda: delivered(rig, ids) == len(ids), 60)
    except AssertionError:
        left = {nid: state for nid, state in states(rig.settings, ids).items() if state != "delivered"}
        pytest.fail(f"not delivered after the reconciler ({resolved}, {len(waiting)} were waiting): "
                    f"{collections.Counter(left.values())}; e.g. {list(left.items())[:3]}")
    print(f"broker SIGKILLed for {BROKER_DOWN_S} s mid-burst of {BURST}: {ledger_at_kill} sent at the kill, "
          f"{ledger_down} by the restart; the broker answered {restart_s:.1f} s after its start; every delivery "
          f"answered {settled_s:.1f} s later, {len(waiting)} waiting for a lost receipt, resolved by the reconciler "
          f"{resolved}; all delivered {recovery_s:.1f} s after that")
    # Only the provider's word moved them (a receipt may still have overtaken the reconciler: never a re-send)
    assert set(resolved) <= {"accepted:delivered"} and sum(resolved.values()) <= len(waiting)
    assert_each_once(rig, ids)
