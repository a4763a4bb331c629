-- Berth metadata on PostgreSQL, version 1: the same tables as on SQLite (see
-- ../sqlite/schema.sql, gc.sql, runs.sql and cluster.sql for what each holds), with the review queues kept
-- by triggers stamped with the database's clock, which every replica shares.
CREATE TABLE repos (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT COLLATE "C" NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

CREATE TABLE blobs (
    digest      TEXT PRIMARY KEY,
    size        BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    last_access BIGINT NOT NULL
);

CREATE TABLE repo_blobs (
    repo_id     BIGINT NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    digest      TEXT NOT NULL REFERENCES blobs(digest),
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (repo_id, digest)
);
CREATE INDEX repo_blobs_digest ON repo_blobs(digest);

CREATE TABLE manifest_bodies (
    digest      TEXT PRIMARY KEY,
    content     BYTEA NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE manifests (
    repo_id       BIGINT NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    digest        TEXT NOT NULL REFERENCES manifest_bodies(digest),
    media_type    TEXT NOT NULL,
    size          BIGINT NOT NULL,
    subject       TEXT,
    artifact_type TEXT,
    annotations   TEXT,
    created_at    BIGINT NOT NULL,
    last_pulled   BIGINT,
    PRIMARY KEY (repo_id, digest)
);
CREATE INDEX manifests_subject ON manifests(repo_id, subject) WHERE subject IS NOT NULL;
CREATE INDEX manifests_digest ON manifests(digest);

CREATE TABLE manifest_refs (
    repo_id         BIGINT NOT NULL,
    manifest_digest TEXT NOT NULL,
    child_digest    TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('blob', 'manifest')),
    PRIMARY KEY (repo_id, manifest_digest, child_digest, kind),
    FOREIGN KEY (repo_id, manifest_digest) REFERENCES manifests(repo_id, digest) ON DELETE CASCADE
);
CREATE INDEX manifest_refs_child ON manifest_refs(child_digest);

CREATE TABLE tags (
    repo_id     BIGINT NOT NULL,
    name        TEXT COLLATE "C" NOT NULL,
    digest      TEXT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (repo_id, name),
    FOREIGN KEY (repo_id, digest) REFERENCES manifests(repo_id, digest) ON DELETE CASCADE
);
CREATE INDEX tags_digest ON tags(repo_id, digest);

CREATE TABLE uploads (
    id          TEXT PRIMARY KEY,
    repo_id     BIGINT NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    size        BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

CREATE TABLE upload_parts (
    upload_id   TEXT NOT NULL REFERENCES uploads(id) ON DELETE CASCADE,
    "offset"    BIGINT NOT NULL,
    size        BIGINT NOT NULL,
    key         TEXT NOT NULL,
    PRIMARY KEY (upload_id, "offset")
);

CREATE TABLE blob_review (
    digest     TEXT PRIMARY KEY,
    queued_at  BIGINT NOT NULL
);

CREATE TABLE manifest_review (
    repo_id    BIGINT NOT NULL,
    digest     TEXT NOT NULL,
    queued_at  BIGINT NOT NULL,
    PRIMARY KEY (repo_id, digest)
);

CREATE TABLE body_review (
    digest     TEXT PRIMARY KEY,
    queued_at  BIGINT NOT NULL
);

CREATE TABLE gc_pending (
    digest     TEXT PRIMARY KEY,
    size       BIGINT NOT NULL,
    marked_at  BIGINT NOT NULL,
    run        TEXT NOT NULL DEFAULT ''
);

CREATE TABLE leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_at  BIGINT NOT NULL
);

CREATE TABLE gc_runs (
    id           BIGSERIAL PRIMARY KEY,
    started_at   BIGINT NOT NULL,
    finished_at  BIGINT NOT NULL,
    duration_ms  BIGINT NOT NULL,
    holder       TEXT NOT NULL,
    report       TEXT NOT NULL
);

CREATE TABLE confirmations (
    key           TEXT PRIMARY KEY,
    confirmed_at  BIGINT NOT NULL   -- unix milliseconds
);

CREATE TABLE settings (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);

CREATE FUNCTION berth_now() RETURNS BIGINT LANGUAGE SQL STABLE AS
    $$ SELECT extract(epoch FROM now())::BIGINT $$;

CREATE FUNCTION berth_queue_blob(d TEXT) RETURNS VOID LANGUAGE SQL AS $$
    INSERT INTO blob_review (digest, queued_at) VALUES (d, berth_now())
        ON CONFLICT (digest) DO UPDATE SET queued_at = excluded.queued_at
$$;

CREATE FUNCTION berth_queue_manifest(r BIGINT, d TEXT) RETURNS VOID LANGUAGE SQL AS $$
    INSERT INTO manifest_review (repo_id, digest, queued_at) VALUES (r, d, berth_now())
        ON CONFLICT (repo_id, digest) DO UPDATE SET queued_at = excluded.queued_at
$$;

CREATE FUNCTION berth_blob_inserted() RETURNS TRIGGER LANGUAGE plpgsql AS $$
BEGIN PERFORM berth_queue_blob(NEW.digest); RETURN NULL; END $$;
CREATE TRIGGER blobs_inserted AFTER INSERT ON blobs
    FOR EACH ROW EXECUTE FUNCTION berth_blob_inserted();

CREATE FUNCTION berth_repo_blob_changed() RETURNS TRIGGER LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN PERFORM berth_queue_blob(OLD.digest);
    ELSE PERFORM berth_queue_blob(NEW.digest); END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER repo_blob_linked AFTER INSERT ON repo_blobs
    FOR EACH ROW EXECUTE FUNCTION berth_repo_blob_changed();
CREATE TRIGGER repo_blob_unlinked AFTER DELETE ON repo_blobs
    FOR EACH ROW EXECUTE FUNCTION berth_repo_blob_changed();

CREATE FUNCTION berth_manifest_ref_removed() RETURNS TRIGGER LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.kind = 'blob' THEN PERFORM berth_queue_blob(OLD.child_digest);
    ELSE PERFORM berth_queue_manifest(OLD.repo_id, OLD.child_digest); END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER manifest_ref_removed AFTER DELETE ON manifest_refs
    FOR EACH ROW EXECUTE FUNCTION berth_manifest_ref_removed();

CREATE FUNCTION berth_manifest_inserted() RETURNS TRIGGER LANGUAGE plpgsql AS $$
BEGIN PERFORM berth_queue_manifest(NEW.repo_id, NEW.digest); RETURN NULL; END $$;
CREATE TRIGGER manifest_inserted AFTER INSERT ON manifests
    FOR EACH ROW EXECUTE FUNCTION berth_manifest_inserted();

CREATE FUNCTION berth_manifest_removed() RETURNS TRIGGER LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO body_review (digest, queued_at) VALUES (OLD.digest, berth_now())
        ON CONFLICT (digest) DO UPDATE SET queued_at = excluded.queued_at;
    INSERT INTO manifest_review (repo_id, digest, queued_at)
        SELECT repo_id, digest, berth_now() FROM manifests
        WHERE repo_id = OLD.repo_id AND subject = OLD.digest
        ON CONFLICT (repo_id, digest) DO UPDATE SET queued_at = excluded.queued_at;
    RETURN NULL;
END $$;
CREATE TRIGGER manifest_removed AFTER DELETE ON manifests
    FOR EACH ROW EXECUTE FUNCTION berth_manifest_removed();

CREATE FUNCTION berth_tag_changed() RETURNS TRIGGER LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' OR OLD.digest <> NEW.digest THEN
        PERFORM berth_queue_manifest(OLD.repo_id, OLD.digest);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER tag_removed AFTER DELETE ON tags
    FOR EACH ROW EXECUTE FUNCTION berth_tag_changed();
CREATE TRIGGER tag_moved AFTER UPDATE OF digest ON tags
    FOR EACH ROW EXECUTE FUNCTION berth_tag_changed();
