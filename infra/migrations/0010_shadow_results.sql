-- 0010_shadow_results: shadow mode you can read. For each message the sender mirrored to a candidate provider (in
-- its test mode, NOTIFY_SHADOW), one row: the live provider's call and the candidate's side by side (outcome, error
-- code, latency) and how each would format it (SMS encoding and segments, length). `notify shadow report` reads a
-- window of rows by created_at. Senders write them in one statement per flush (about a second), never per message.
--
-- Retention: the rows are for deciding about a candidate, not an audit trail; nothing refers to them. Keep a few
-- weeks and delete older ones in chunks on the created_at index, e.g. from cron:
--     DELETE FROM shadow_results WHERE created_at < now() - interval '30 days';
-- No foreign key to notifications on purpose: the sender's write stays one cheap INSERT that a pruned or missing
-- notification row can never fail.

CREATE TABLE shadow_results (
    shadow_id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at           timestamptz NOT NULL DEFAULT now(),
    notification_id      uuid NOT NULL,
    channel              text NOT NULL CHECK (channel IN ('sms', 'email', 'push')),
    lane                 text NOT NULL CHECK (lane IN ('critical', 'bulk')),
    primary_provider     text NOT NULL,
    primary_outcome      text NOT NULL,
    primary_code         text,
    primary_latency_ms   double precision NOT NULL CHECK (primary_latency_ms >= 0),
    primary_encoding     text CHECK (primary_encoding IN ('GSM-7', 'UCS-2')),
    primary_segments     int CHECK (primary_segments > 0),
    primary_length       int NOT NULL CHECK (primary_length >= 0),
    candidate_provider   text NOT NULL,
    candidate_outcome    text NOT NULL,
    candidate_code       text,
    candidate_latency_ms double precision NOT NULL CHECK (candidate_latency_ms >= 0),
    candidate_encoding   text CHECK (candidate_encoding IN ('GSM-7', 'UCS-2')),
    candidate_segments   int CHECK (candidate_segments > 0),
    candidate_length     int NOT NULL CHECK (candidate_length >= 0)
);

CREATE INDEX shadow_results_by_created_at ON shadow_results (created_at);

COMMENT ON TABLE shadow_results IS
    'One row per message mirrored to a shadow candidate: the live provider''s call and the candidate''s test-mode '
    'call side by side, and how each formats it. Read by `notify shadow report`; keep a few weeks (see 0010).';
COMMENT ON COLUMN shadow_results.primary_outcome IS
    'accepted, permanent, transient or ambiguous (the connector''s outcome kind); the candidate''s may also be '
    'error: its call raised.';
COMMENT ON COLUMN shadow_results.primary_code IS
    'The provider''s error code (else our reason) when not accepted.';
COMMENT ON COLUMN shadow_results.primary_segments IS
    'SMS segments of the text as this provider sends it (160/153 GSM-7 septets, 70/67 UCS-2 units); NULL for '
    'email and push.';
COMMENT ON COLUMN shadow_results.primary_length IS
    'SMS: GSM-7 septets or UTF-16 units of the text as sent; email and push: characters of the body.';
