-- District-distribution fallback (transport.toml `[delivery] mode = "district"`): instead of a PLAYERS copy in the
-- outbox, each participant gets a delivery row, pushed by the district's distributor to the player when online
-- and kept until the player acknowledges it.

CREATE TABLE deliveries (
    id       bigserial PRIMARY KEY,
    player   text NOT NULL,
    district text NOT NULL,
    canon_id bigint NOT NULL REFERENCES canon (id) ON DELETE CASCADE,
    payload  bytea NOT NULL
);

CREATE INDEX deliveries_by_player ON deliveries (district, player, id);

CREATE FUNCTION deliveries_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nimmer_deliveries', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER deliveries_notify AFTER INSERT ON deliveries FOR EACH STATEMENT EXECUTE FUNCTION deliveries_notify();
