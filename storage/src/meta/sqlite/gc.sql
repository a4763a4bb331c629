-- Version 2: review queues for garbage collection, filled by triggers so that every code path
-- (and any future writer) keeps them right. GC examines only queued candidates, so its cost
-- grows with the garbage, not with the registry.
--
-- blob_review      digests that may have lost their last reference (or were just uploaded)
-- manifest_review  manifests that may have become unreachable (untagged, orphaned referrer)
-- body_review      manifest bodies that may no longer be used by any repository
-- gc_pending       blobs whose rows GC removed and whose objects it has yet to delete
CREATE TABLE blob_review (
    digest     TEXT PRIMARY KEY,
    queued_at  INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE manifest_review (
    repo_id    INTEGER NOT NULL,
    digest     TEXT NOT NULL,
    queued_at  INTEGER NOT NULL,
    PRIMARY KEY (repo_id, digest)
) STRICT, WITHOUT ROWID;

CREATE TABLE body_review (
    digest     TEXT PRIMARY KEY,
    queued_at  INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE gc_pending (
    digest     TEXT PRIMARY KEY,
    size       INTEGER NOT NULL,
    marked_at  INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TRIGGER blobs_inserted AFTER INSERT ON blobs BEGIN
    INSERT INTO blob_review (digest, queued_at) VALUES (NEW.digest, unixepoch())
        ON CONFLICT (digest) DO UPDATE SET queued_at = excluded.queued_at;
END;
CREATE TRIGGER repo_blob_unlinked AFTER DELETE ON repo_blobs BEGIN
    INSERT INTO blob_review (digest, queued_at) VALUES (OLD.digest, unixepoch())
        ON CONFLICT (digest) DO UPDATE SET queued_at = excluded.queued_at;
END;
CREATE TRIGGER repo_blob_linked AFTER INSERT ON repo_blobs BEGIN
    INSERT INTO blob_review (digest, queued_at) VALUES (NEW.digest, unixepoch())
        ON CONFLICT (digest) DO UPDATE SET queued_at = excluded.queued_at;
END;
CREATE TRIGGER manifest_ref_removed AFTER DELETE ON manifest_refs BEGIN
    INSERT INTO blob_review (digest, queued_at)
        SELECT OLD.child_digest, unixepoch() WHERE OLD.kind = 'blob'
        ON CONFLICT (digest) DO UPDATE SET queued_at = excluded.queued_at;
    INSERT INTO manifest_review (repo_id, digest, queued_at)
        SELECT OLD.repo_id, OLD.child_digest, unixepoch() WHERE OLD.kind = 'manifest'
        ON CONFLICT (repo_id, digest) DO UPDATE SET queued_at = excluded.queued_at;
END;
CREATE TRIGGER manifest_inserted AFTER INSERT ON manifests BEGIN
    INSERT INTO manifest_review (repo_id, digest, queued_at) VALUES (NEW.repo_id, NEW.digest, unixepoch())
        ON CONFLICT (repo_id, digest) DO UPDATE SET queued_at = excluded.queued_at;
END;
CREATE TRIGGER manifest_removed AFTER DELETE ON manifests BEGIN
    INSERT INTO body_review (digest, queued_at) VALUES (OLD.digest, unixepoch())
        ON CONFLICT (digest) DO UPDATE SET queued_at = excluded.queued_at;
    INSERT INTO manifest_review (repo_id, digest, queued_at)
        SELECT repo_id, digest, unixepoch() FROM manifests
        WHERE repo_id = OLD.repo_id AND subject = OLD.digest
        ON CONFLICT (repo_id, digest) DO UPDATE SET queued_at = excluded.queued_at;
END;
CREATE TRIGGER tag_removed AFTER DELETE ON tags BEGIN
    INSERT INTO manifest_review (repo_id, digest, queued_at) VALUES (OLD.repo_id, OLD.digest, unixepoch())
        ON CONFLICT (repo_id, digest) DO UPDATE SET queued_at = excluded.queued_at;
END;
CREATE TRIGGER tag_moved AFTER UPDATE OF digest ON tags WHEN OLD.digest <> NEW.digest BEGIN
    INSERT INTO manifest_review (repo_id, digest, queued_at) VALUES (OLD.repo_id, OLD.digest, unixepoch())
        ON CONFLICT (repo_id, digest) DO UPDATE SET queued_at = excluded.queued_at;
END;

-- Everything that exists today is a candidate once.
INSERT INTO blob_review (digest, queued_at) SELECT digest, unixepoch() FROM blobs;
INSERT INTO manifest_review (repo_id, digest, queued_at) SELECT repo_id, digest, unixepoch() FROM manifests;
