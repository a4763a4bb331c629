-- Version 3: coordination between processes sharing this database (the server, `berth gc`,
-- replicas) and a record of garbage collections.
--
-- leases    named leases: one holder at a time until `expires_at` (unix seconds); GC takes "gc"
-- gc_pending.run   which run marked the blob, so a run can tell what an interrupted one left
-- gc_runs   finished collections, newest last: what each freed, who ran it; the server's
--           metrics and the web UI read the latest, whichever process ran it
CREATE TABLE leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_at  INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE gc_runs (
    id           INTEGER PRIMARY KEY,
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER NOT NULL,
    duration_ms  INTEGER NOT NULL,
    holder       TEXT NOT NULL,
    report       TEXT NOT NULL
) STRICT;

ALTER TABLE gc_pending ADD COLUMN run TEXT NOT NULL DEFAULT '';
