-- A player's resync (rows its feed no longer holds) reads the canon rows it took part in, in id order.
CREATE INDEX canon_participants ON canon USING gin (participants);
