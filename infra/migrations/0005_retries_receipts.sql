-- 0005_retries_receipts: what retry tiers, receipts and reconciliation need on a delivery row.
--
-- task: the DeliveryTask (Avro, as on send.<channel>.<lane>) the routing stage queued. Reconciliation re-injects
--   it when a send never arrived, the receipts stage when a failure receipt triggers the one fallback, and the
--   DLQ redrive when a dead letter is gone; none of them has the original record otherwise. NULL for rows
--   written before this migration (they are resolved, never re-driven).
-- retry_tier: how many retry tiers this delivery went through since it was (re)queued; the next transient
--   failure goes to tier retry_tier + 1, or to the DLQ after the last. A redrive starts it again at 0.
-- fallback_from: the provider whose failure receipt made us re-send through another one. Set once: a second
--   failure receipt is final (a failure after acceptance falls back once).

ALTER TABLE deliveries
    ADD COLUMN task          bytea,
    ADD COLUMN retry_tier    integer NOT NULL DEFAULT 0 CHECK (retry_tier >= 0),
    ADD COLUMN fallback_from text;

COMMENT ON COLUMN deliveries.task IS 'The DeliveryTask record (Avro) routing queued; re-injected by reconciliation, '
    'receipt fallbacks and DLQ redrives.';
COMMENT ON COLUMN deliveries.retry_tier IS 'Retry tiers used since the delivery was (re)queued.';
COMMENT ON COLUMN deliveries.fallback_from IS 'Provider whose failure receipt triggered the one fallback.';


-- Reconciliation re-injects a queued row whose send record was lost (a crash between a receipt fallback or a DLQ
-- redrive and its produce); this keeps that sweep off the final rows.
CREATE INDEX deliveries_queued_idx ON deliveries (updated_at) WHERE state = 'queued';
