-- API keys of the ingest API: one row per key, looked up by its public id, verified by the hash of its secret.
-- A key is shown once, as nk_<key_id>_<secret>; the secret is 32 random bytes, so a fast hash (sha256) is as
-- strong as a slow one would be, and the secret itself is never stored.

CREATE TABLE api_keys (
    key_id     text        PRIMARY KEY CHECK (key_id ~ '^[0-9a-f]{12}$'),
    service    text        NOT NULL CHECK (service ~ '^[A-Za-z0-9._-]{1,100}$'),
    key_hash   text        NOT NULL CHECK (key_hash ~ '^[0-9a-f]{64}$'),
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    CONSTRAINT api_keys_revoked_after_created CHECK (revoked_at IS NULL OR revoked_at >= created_at)
);

CREATE INDEX api_keys_service_idx ON api_keys (service);

COMMENT ON TABLE api_keys IS
    'Keys of the services that call the ingest API. Revoking sets revoked_at (rows are kept for the audit '
    'trail); API processes cache a valid key for a few seconds, so a revocation takes effect within that time.';
COMMENT ON COLUMN api_keys.key_id IS 'Public part of the key (12 hex digits), safe to show in lists and logs.';
COMMENT ON COLUMN api_keys.service IS 'The calling service; the default source_service of what it posts.';
COMMENT ON COLUMN api_keys.key_hash IS 'sha256 (hex) of the secret part of the key; never the key itself.';
COMMENT ON COLUMN api_keys.revoked_at IS 'When the key was revoked; NULL while it is valid.';
