-- 0011_key_scopes: the delivery log you can read. Three parts:
--
-- 1. API key scopes. A key carries what it may do: `ingest` (POST notifications, the settings API: everything a
--    key could do before this migration, so every existing key gets it and keeps working), `read` (the read API:
--    GET /v1/notifications..., only notifications whose source_service is the key's own service) and `admin`
--    (everything, every service's notifications, and the ops console).
-- 2. delivery_transitions: every state change of a deliveries row, in order, recorded by statement-level triggers
--    on deliveries (one INSERT ... SELECT per writing statement over its transition tables, whatever wrote it:
--    routing, preferences, the sender's batch statements, receipts, reconciliation, a DLQ redrive), so no writer
--    can forget one and none pays a per-row trigger call. Before this, state changes were only on the
--    delivery-events topic. Changes made before this migration are not here: the read API derives those rows'
--    timelines from the deliveries timestamps and the attempts instead. No foreign key (a writer's statement must
--    never fail on it); retention: delete in chunks by changed_at (BRIN index), e.g. from cron:
--        DELETE FROM delivery_transitions WHERE changed_at < now() - interval '90 days';
-- 3. Indexes of the read API's keyset pages (created_at DESC, notification_id DESC): every notification (admin),
--    one source service's (a read key), one user's (the existing notifications_user_created_idx serves it).

-- 1. scopes -----------------------------------------------------------------------------------------------------

ALTER TABLE api_keys
    ADD COLUMN scopes text[] NOT NULL DEFAULT ARRAY['ingest']::text[]
        CONSTRAINT api_keys_scopes_known CHECK (scopes <@ ARRAY['ingest', 'read', 'admin']::text[]
                                                AND cardinality(scopes) >= 1);

COMMENT ON COLUMN api_keys.scopes IS
    'What the key may do: ingest (submit notifications, user settings), read (read API, own service only), admin '
    '(everything, every service, the ops console). Keys made before scopes existed have ingest.';

-- 2. delivery_transitions ---------------------------------------------------------------------------------------

CREATE TABLE delivery_transitions (
    transition_id   bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    notification_id uuid        NOT NULL,
    channel         text        NOT NULL,
    from_state      text,
    to_state        text        NOT NULL,
    attempt_count   integer     NOT NULL,
    provider        text,
    error_code      text,
    error_message   text,
    changed_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX delivery_transitions_by_delivery ON delivery_transitions (notification_id, channel, transition_id);
CREATE INDEX delivery_transitions_by_changed_at ON delivery_transitions USING brin (changed_at);

COMMENT ON TABLE delivery_transitions IS
    'Every state change of a deliveries row (from_state NULL: the row was written), in transition_id order per '
    'delivery, recorded by the deliveries_record_* triggers. Read by GET /v1/notifications/{id} and the console.';
COMMENT ON COLUMN delivery_transitions.error_code IS 'deliveries.last_error_code as the change left it.';

CREATE FUNCTION record_delivery_inserts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO delivery_transitions (notification_id, channel, from_state, to_state, attempt_count, provider,
                                      error_code, error_message)
    SELECT n.notification_id, n.channel, NULL, n.state, n.attempt_count, n.provider, n.last_error_code,
           left(n.last_error_message, 1000)
    FROM new_rows n;
    RETURN NULL;
END;
$$;

CREATE FUNCTION record_delivery_updates() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO delivery_transitions (notification_id, channel, from_state, to_state, attempt_count, provider,
                                      error_code, error_message)
    SELECT n.notification_id, n.channel, o.state, n.state, n.attempt_count, n.provider, n.last_error_code,
           left(n.last_error_message, 1000)
    FROM new_rows n JOIN old_rows o ON o.notification_id = n.notification_id AND o.channel = n.channel
    WHERE o.state IS DISTINCT FROM n.state;
    RETURN NULL;
END;
$$;

CREATE TRIGGER deliveries_record_inserts AFTER INSERT ON deliveries
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION record_delivery_inserts();

CREATE TRIGGER deliveries_record_updates AFTER UPDATE ON deliveries
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION record_delivery_updates();

COMMENT ON FUNCTION record_delivery_updates() IS
    'Statement-level AFTER UPDATE trigger of deliveries: one delivery_transitions row per row whose state changed.';

-- 3. read API indexes -------------------------------------------------------------------------------------------

CREATE INDEX notifications_created_idx ON notifications (created_at DESC, notification_id DESC);
CREATE INDEX notifications_source_created_idx
    ON notifications (source_service, created_at DESC, notification_id DESC);
