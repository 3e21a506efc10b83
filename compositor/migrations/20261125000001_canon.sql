-- Canon: one row per composed dialog result, the active register of events and scenes, and the outbox the
-- relay drains into JetStream. Canon and outbox rows are written in one transaction by a compositor.

CREATE TABLE events (
    gm_event     text PRIMARY KEY,
    status       text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'completed')),
    opened_at    timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz
);

CREATE TABLE scenes (
    gm_event  text NOT NULL REFERENCES events (gm_event) ON DELETE CASCADE,
    district  text NOT NULL,
    scene     text NOT NULL,
    -- The last canon sequence number given out in this scene.
    last_seq  bigint NOT NULL,
    opened_at timestamptz NOT NULL DEFAULT now(),
    last_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gm_event, district, scene)
);

CREATE TABLE canon (
    id           bigserial PRIMARY KEY,
    -- `<gm_event>/<district>/<scene>/<seq>`: the JetStream message id and the players' idempotency key.
    canon_uid    text NOT NULL UNIQUE,
    -- The gateway's result id: a redelivered result finds its row and is a no-op.
    result_id    text NOT NULL UNIQUE,
    gm_event     text NOT NULL,
    district     text NOT NULL,
    scene        text NOT NULL,
    slot         text NOT NULL,
    -- Order within the scene.
    seq          bigint NOT NULL,
    zone         text NOT NULL,
    kind         text NOT NULL,
    tier         text NOT NULL,
    npc          text,
    text         text NOT NULL,
    participants text[] NOT NULL,
    faction      text,
    adapters     text[] NOT NULL,
    finished_at  timestamptz NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (gm_event, district, scene, seq)
);

-- One row per message to publish: the canon row on its scene subject, a copy per participant on the player's
-- subject and one on its faction's subject. `msg_id` is the JetStream Nats-Msg-Id (the canon UID;
-- `<canon UID>@<player>`, `<canon UID>#<faction>` for the copies).
CREATE TABLE outbox (
    id      bigserial PRIMARY KEY,
    msg_id  text NOT NULL,
    subject text NOT NULL,
    payload bytea NOT NULL
);

-- Wakes the relay. NOTIFY is delivered at commit: a rolled-back transaction wakes (and publishes) nothing.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nimmer_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
