-- 0001_initial: the delivery log and idempotency store.
--
-- Applied by pipeline/migrate.py inside one transaction, recorded in schema_migrations with its checksum.
-- Never edit this file once applied anywhere: write 0002_... instead.
--
-- Conventions:
--   * timestamps are timestamptz (UTC on the wire);
--   * enumerations are text + CHECK (adding a value is a one-line migration, no enum-type locking);
--   * updated_at is maintained by the set_updated_at() trigger, so no writer can forget it.

-- updated_at convention ----------------------------------------------------------------------------------------

CREATE FUNCTION set_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

COMMENT ON FUNCTION set_updated_at() IS
    'BEFORE UPDATE trigger: stamps updated_at with the transaction time on every update.';

-- notifications ------------------------------------------------------------------------------------------------

CREATE TABLE notifications (
    notification_id    uuid        PRIMARY KEY,
    user_id            text        NOT NULL CHECK (user_id <> ''),
    notification_type  text        NOT NULL CHECK (notification_type IN
                                       ('otp', 'transaction', 'security', 'price_alert', 'portfolio', 'marketing')),
    idempotency_key    text        NOT NULL CHECK (idempotency_key <> ''),
    -- The lane the request arrived on. Not tied to the type by a CHECK: which types are critical is routing
    -- policy (critical = otp, security, transaction today), and policy changes without a migration.
    lane               text        NOT NULL CHECK (lane IN ('critical', 'bulk')),
    source_service     text        NOT NULL,
    correlation_id     text,
    -- Channels named by the request; empty means "choose by the user's preference".
    requested_channels text[]      NOT NULL DEFAULT '{}'
                                   CHECK (requested_channels <@ ARRAY['sms', 'email', 'push']::text[]),
    created_at         timestamptz NOT NULL,
    expires_at         timestamptz,
    received_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT notifications_dedup_key UNIQUE (user_id, notification_type, idempotency_key)
);

CREATE INDEX notifications_user_created_idx ON notifications (user_id, created_at DESC);

COMMENT ON TABLE notifications IS
    'One row per accepted notification request. Immutable once written. The unique key '
    '(user_id, notification_type, idempotency_key) is the final guard against duplicates: intake inserts '
    'ON CONFLICT DO NOTHING and treats zero rows as "duplicate".';
COMMENT ON COLUMN notifications.created_at IS 'When the upstream service created the request.';
COMMENT ON COLUMN notifications.expires_at IS 'Past this instant the notification is never sent (a stale OTP).';
COMMENT ON COLUMN notifications.received_at IS 'When intake stored the request.';

-- deliveries ---------------------------------------------------------------------------------------------------

CREATE TABLE deliveries (
    notification_id     uuid        NOT NULL REFERENCES notifications (notification_id) ON DELETE CASCADE,
    channel             text        NOT NULL CHECK (channel IN ('sms', 'email', 'push')),
    -- Working states: queued, sending (claimed under a lease), retry_scheduled, accepted (by the provider,
    -- awaiting its receipt), unknown (ambiguous outcome: reconciliation asks the provider before any re-send).
    -- Final states: delivered, failed, dead_lettered, suppressed, expired.
    --   suppressed: the preferences stage records its per-channel decision (opt-out) as a final row, so every
    --     notification ends with a row per channel considered, a missing row always means "lost", and a replay
    --     finds the decision final instead of re-evaluating it into a send.
    --   expired: a row that is queued or retry_scheduled when its notification's expires_at passes must still
    --     reach a final state; folding it into failed would hide why (nothing was wrong with the provider).
    -- deferred and rate_limited are events, not row states: the row stays queued (with next_attempt_at).
    state               text        NOT NULL DEFAULT 'queued' CHECK (state IN (
                                        'queued', 'sending', 'accepted', 'delivered', 'failed',
                                        'retry_scheduled', 'unknown', 'dead_lettered', 'suppressed', 'expired')),
    attempt_count       integer     NOT NULL DEFAULT 0 CHECK (attempt_count >= 0),
    provider            text,
    provider_message_id text,
    lease_owner         text,
    claimed_at          timestamptz,
    lease_expires_at    timestamptz,
    next_attempt_at     timestamptz,
    last_error_code     text,
    last_error_message  text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    accepted_at         timestamptz,
    final_at            timestamptz,
    PRIMARY KEY (notification_id, channel),
    -- A sending row without a lease could never be found by the stuck-lease sweep below.
    CONSTRAINT deliveries_sending_has_lease
        CHECK (state <> 'sending' OR (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CONSTRAINT deliveries_retry_has_due_time CHECK (state <> 'retry_scheduled' OR next_attempt_at IS NOT NULL),
    -- Receipts and reconciliation of accepted rows go to the provider that took the request. (unknown may lack
    -- one: a worker can die after its claim and before it recorded which provider it tried.)
    CONSTRAINT deliveries_sent_has_provider
        CHECK (state NOT IN ('accepted', 'delivered') OR provider IS NOT NULL),
    CONSTRAINT deliveries_final_has_final_at
        CHECK (state NOT IN ('delivered', 'failed', 'dead_lettered', 'suppressed', 'expired') OR final_at IS NOT NULL)
);

CREATE TRIGGER deliveries_set_updated_at BEFORE UPDATE ON deliveries
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

-- Partial indexes: each holds only the rows in the state its sweep looks for, so it stays small however
-- many final rows accumulate.
CREATE INDEX deliveries_sending_lease_idx ON deliveries (lease_expires_at) WHERE state = 'sending';
CREATE INDEX deliveries_accepted_idx ON deliveries (accepted_at) WHERE state = 'accepted';
CREATE INDEX deliveries_unknown_idx ON deliveries (updated_at) WHERE state = 'unknown';
CREATE INDEX deliveries_retry_due_idx ON deliveries (next_attempt_at) WHERE state = 'retry_scheduled';
-- Receipts (webhooks) name the provider's message id; it identifies one delivery.
CREATE UNIQUE INDEX deliveries_provider_message_uq ON deliveries (provider, provider_message_id)
    WHERE provider_message_id IS NOT NULL;

COMMENT ON TABLE deliveries IS
    'One row per notification and channel: the delivery state machine. The sender claims a row before '
    'sending (queued|retry_scheduled -> sending, atomically, with a lease); a re-read after a crash, a '
    'rebalance or a replay finds it claimed or final, and final rows are never re-sent.';
COMMENT ON COLUMN deliveries.attempt_count IS 'Claims so far (the attempt number of the current or last send).';
COMMENT ON COLUMN deliveries.lease_owner IS 'Worker that holds the claim while state = sending.';
COMMENT ON COLUMN deliveries.lease_expires_at IS
    'A sending row past its lease had a worker die mid-send: the outcome is ambiguous (-> unknown), not failed.';
COMMENT ON COLUMN deliveries.next_attempt_at IS 'When a retry_scheduled (or held) row is due.';
COMMENT ON COLUMN deliveries.final_at IS 'When the row reached a final state.';

-- notification_attempts ----------------------------------------------------------------------------------------

CREATE TABLE notification_attempts (
    attempt_id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    notification_id     uuid        NOT NULL,
    channel             text        NOT NULL,
    attempt_no          integer     NOT NULL CHECK (attempt_no >= 1),
    provider            text        NOT NULL CHECK (provider <> ''),
    outcome             text        NOT NULL CHECK (outcome IN ('accepted', 'permanent', 'transient', 'ambiguous')),
    response_status     integer,
    provider_message_id text,
    error_code          text,
    error_payload       jsonb,
    started_at          timestamptz NOT NULL,
    finished_at         timestamptz NOT NULL,
    latency_ms          integer     CHECK (latency_ms >= 0),
    cost_micros         bigint      CHECK (cost_micros >= 0),
    currency            text        CHECK (currency ~ '^[A-Z]{3}$'),
    CONSTRAINT notification_attempts_delivery_fk FOREIGN KEY (notification_id, channel)
        REFERENCES deliveries (notification_id, channel) ON DELETE CASCADE,
    CONSTRAINT notification_attempts_finished_after_start CHECK (finished_at >= started_at)
);

CREATE INDEX notification_attempts_delivery_idx ON notification_attempts (notification_id, channel, attempt_no);

COMMENT ON TABLE notification_attempts IS
    'Append-only log of every provider attempt, successful or not: the evidence when something goes wrong. '
    'A fallback within one claim is a second row with the same attempt_no and another provider.';
COMMENT ON COLUMN notification_attempts.attempt_no IS 'deliveries.attempt_count at the claim (1 = first try).';
COMMENT ON COLUMN notification_attempts.outcome IS
    'accepted; permanent (no retry); transient (fall back or retry); ambiguous (timed out after the request '
    'left: never re-sent before reconciliation).';
COMMENT ON COLUMN notification_attempts.response_status IS 'HTTP status, NULL when no response came back.';
COMMENT ON COLUMN notification_attempts.error_payload IS 'The provider''s error body, as returned.';
COMMENT ON COLUMN notification_attempts.cost_micros IS 'Price the provider charged, in millionths of currency.';

-- user_notification_settings -----------------------------------------------------------------------------------

CREATE TABLE user_notification_settings (
    user_id            text        PRIMARY KEY CHECK (user_id <> ''),
    -- An IANA zone name; validated by the settings API (zoneinfo), which is what the preferences stage uses.
    timezone           text        NOT NULL DEFAULT 'UTC' CHECK (timezone <> ''),
    channel_preference text[]      NOT NULL DEFAULT '{}'
                                   CHECK (channel_preference <@ ARRAY['sms', 'email', 'push']::text[]),
    category_settings  jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(category_settings) = 'object'),
    quiet_hours_start  time,
    quiet_hours_end    time,
    digest             text        NOT NULL DEFAULT 'none' CHECK (digest IN ('none', 'daily', 'weekly')),
    phone_e164         text        CHECK (phone_e164 ~ '^\+[1-9][0-9]{1,14}$'),
    email              text        CHECK (email LIKE '_%@_%'),
    device_tokens      jsonb       NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(device_tokens) = 'array'),
    version            bigint      NOT NULL DEFAULT 1 CHECK (version >= 0),
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    -- Both ends or neither: one end alone is no interval.
    CONSTRAINT user_notification_settings_quiet_hours
        CHECK ((quiet_hours_start IS NULL) = (quiet_hours_end IS NULL))
);

CREATE TRIGGER user_notification_settings_set_updated_at BEFORE UPDATE ON user_notification_settings
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

COMMENT ON TABLE user_notification_settings IS
    'Per-user notification preferences and contacts: channel order, per-category opt-outs, quiet hours in '
    'the user''s time zone, digest choice. Published to the compacted user-settings topic, read by the '
    'preferences stage.';
COMMENT ON COLUMN user_notification_settings.channel_preference IS 'Channels in order of preference.';
COMMENT ON COLUMN user_notification_settings.category_settings IS
    'UserSettings.categories: per notification type, {"marketing": {"opted_in_channels": ["email"], '
    '"opted_out_channels": ["sms"]}, ...}; a missing type means no choice made.';
COMMENT ON COLUMN user_notification_settings.quiet_hours_start IS
    'Local time (in timezone) from which non-critical notifications are held until quiet_hours_end '
    '(exclusive); an end before the start spans midnight (22:00-07:00).';
COMMENT ON COLUMN user_notification_settings.device_tokens IS
    'Push targets: [{"platform": "android"|"ios"|"web", "token": "..."}].';
COMMENT ON COLUMN user_notification_settings.version IS
    'Writer-supplied, increases with every change (UserSettings.version): an update whose version is not '
    'above the stored one is stale and ignored (upsert ... WHERE stored.version < EXCLUDED.version).';
