"""Provider simulator: Twilio, Termii, SendGrid, Mailgun, FCM and APNs wire APIs with programmable faults and a
ledger.

`notify simulator` calls `run_simulator_cli`; tests mount `create_simulator_app` on a free port.
"""

from connectors.simulator.app import create_simulator_app, run_simulator, run_simulator_cli

__all__ = ["create_simulator_app", "run_simulator", "run_simulator_cli"]
