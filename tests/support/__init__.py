"""What the tests share beyond conftest.py's fixtures: rigs of real processes, the simulator's ledger, topic readers."""
