"""`notify bench`: the whole pipeline measured on topics and a database of its own, beside a raw Kafka chain doing
the same hops (pipeline/bench/baseline.py); the rigs the end-to-end tests share with it (rig, sender_rig)."""
