-- Version 4: what the processes sharing this database agree on besides leases.
--
-- confirmations   when each cached tag (and each subject's referrers) was last confirmed
--                 upstream (unix ms), by any process: a tag is revalidated once per TTL, not once per
--                 process per TTL, and a restart does not forget it
-- settings        named values shared by every process (the relay secret of replicas)
CREATE TABLE confirmations (
    key           TEXT PRIMARY KEY,
    confirmed_at  INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE settings (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
) STRICT, WITHOUT ROWID;
