-- 0006_quarantine_redrives: which quarantined records `notify invalid redrive` put back, so a second redrive of
-- the same entries puts nothing back again. One row per quarantine entry (topic/partition:offset on `invalid`),
-- written in the transaction that commits only after Kafka acknowledged the redriven record.

CREATE TABLE quarantine_redrives (
    entry       text        PRIMARY KEY,
    source      text        NOT NULL,
    redriven_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE quarantine_redrives IS 'Quarantine entries put back on their source topic (notify invalid redrive).';
COMMENT ON COLUMN quarantine_redrives.entry IS 'The entry on the quarantine topic: <topic>/<partition>:<offset>.';
COMMENT ON COLUMN quarantine_redrives.source IS 'Where its bytes came from and went back to: <topic>/<partition>/<offset>.';
