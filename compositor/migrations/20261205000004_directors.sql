-- The GM shards' register of open events: one row per event a director walks, with its progress (the walk's
-- state as JSON) and its lease. A shard process renews all its leases at once; a lease past `expires_at` is
-- taken by another process of the same shard, which bumps `epoch`. Every progress write names the owner and
-- epoch it holds, so a process that lost its lease cannot record anything (fencing).
CREATE TABLE directors (
    gm_event   text PRIMARY KEY REFERENCES events (gm_event) ON DELETE CASCADE,
    template   text NOT NULL,
    shard      text NOT NULL,
    district   text NOT NULL,
    vals       jsonb NOT NULL,
    progress   jsonb NOT NULL,
    owner      text NOT NULL,
    epoch      bigint NOT NULL DEFAULT 1,
    expires_at timestamptz NOT NULL,
    opened_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX directors_shard_expiry ON directors (shard, expires_at);
CREATE INDEX directors_owner ON directors (owner);
