-- 0013_retention: what the retention sweep (pipeline/state/retention.py) needs to find old rows cheaply.
--
-- notifications are appended in received_at order, so a BRIN index (a few pages for millions of rows, next to no
-- cost per insert) takes the sweep straight to the oldest block ranges instead of reading the whole table.
-- shadow_results already has its created_at index; settings_outbox is swept in id order (published rows are the
-- oldest ids), quarantine_redrives is small.

CREATE INDEX notifications_received_at_brin ON notifications USING brin (received_at);

COMMENT ON INDEX notifications_received_at_brin IS
    'The retention sweep: notifications received before the cut-off, oldest block ranges first.';
