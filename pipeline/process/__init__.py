"""What every long-running process shares: its event loop (aio) and its health and metrics endpoints (health)."""
