"""Operations: what an operator runs beside the stages: the DLQ and the quarantine with their redrives, replay,
reconciliation, the consumer-lag exporter, `notify events tail`, and the shadow report."""
