"""The stream stages on one at-least-once runtime (runtime), one module per stage, and the worker supervisor that
runs them as processes (worker)."""
