"""The notification pipeline: stages, state, API and the one CLI (`notify`, or `python -m pipeline`)."""
