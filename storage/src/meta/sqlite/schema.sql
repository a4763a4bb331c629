-- Berth metadata, version 1. Object store keys are derived from digests (see blob.rs); this
-- database is the source of truth for what exists and who references it.
--
-- repos          one row per repository, created on first upload, mount or manifest push
-- blobs          one row per stored blob object (global, content-addressed), written after the
--                object itself; last_access feeds cache eviction
-- repo_blobs     a blob is visible through a repository only when linked here (upload or mount)
-- manifest_bodies the exact pushed bytes of each manifest digest, shared by repositories
-- manifests      a manifest in a repository, with what referrers and GC need to know
-- manifest_refs  manifest -> blob and index -> child manifest edges (GC's mark phase)
-- tags           tag -> manifest digest, per repository
-- uploads        open upload sessions; size is the committed length, parts hold the bytes
-- upload_parts   the committed chunks of each session, in order
CREATE TABLE repos (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE blobs (
    digest      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    last_access INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE repo_blobs (
    repo_id     INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    digest      TEXT NOT NULL REFERENCES blobs(digest),
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (repo_id, digest)
) STRICT, WITHOUT ROWID;
CREATE INDEX repo_blobs_digest ON repo_blobs(digest);

CREATE TABLE manifest_bodies (
    digest      TEXT PRIMARY KEY,
    content     BLOB NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE manifests (
    repo_id       INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    digest        TEXT NOT NULL REFERENCES manifest_bodies(digest),
    media_type    TEXT NOT NULL,
    size          INTEGER NOT NULL,
    subject       TEXT,
    artifact_type TEXT,
    annotations   TEXT,
    created_at    INTEGER NOT NULL,
    last_pulled   INTEGER,
    PRIMARY KEY (repo_id, digest)
) STRICT, WITHOUT ROWID;
CREATE INDEX manifests_subject ON manifests(repo_id, subject) WHERE subject IS NOT NULL;
CREATE INDEX manifests_digest ON manifests(digest);

CREATE TABLE manifest_refs (
    repo_id         INTEGER NOT NULL,
    manifest_digest TEXT NOT NULL,
    child_digest    TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('blob', 'manifest')),
    PRIMARY KEY (repo_id, manifest_digest, child_digest, kind),
    FOREIGN KEY (repo_id, manifest_digest) REFERENCES manifests(repo_id, digest) ON DELETE CASCADE
) STRICT, WITHOUT ROWID;
CREATE INDEX manifest_refs_child ON manifest_refs(child_digest);

CREATE TABLE tags (
    repo_id     INTEGER NOT NULL,
    name        TEXT NOT NULL,
    digest      TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (repo_id, name),
    FOREIGN KEY (repo_id, digest) REFERENCES manifests(repo_id, digest) ON DELETE CASCADE
) STRICT, WITHOUT ROWID;
CREATE INDEX tags_digest ON tags(repo_id, digest);

CREATE TABLE uploads (
    id          TEXT PRIMARY KEY,
    repo_id     INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    size        INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE upload_parts (
    upload_id   TEXT NOT NULL REFERENCES uploads(id) ON DELETE CASCADE,
    offset      INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    key         TEXT NOT NULL,
    PRIMARY KEY (upload_id, offset)
) STRICT, WITHOUT ROWID;
