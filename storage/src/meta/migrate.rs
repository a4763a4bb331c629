//! Moving a single-node install's metadata from SQLite to PostgreSQL (`berth
//! migrate-metadata`), so that the same content can be served by replicas.
//!
//! The copy reads one snapshot of the SQLite file (a read transaction: a server still running
//! on it keeps writing, and what it writes after the snapshot is not moved: stop it, or at least
//! stop pushes, for the copy), and writes every table into an empty PostgreSQL database in one
//! transaction with `COPY`, so the target holds all of it or none. Repository ids are kept, so
//! every reference between tables stays as it was. The garbage collector's review queues and
//! its pending deletions move as they are: what was garbage stays garbage, nothing else
//! becomes it. Upload sessions in progress do not move (their bytes live in the single node's
//! upload area); clients restart those uploads. Leases and the record of past GC runs stay
//! behind.
//!
//! Afterwards the copy is checked: row counts per table, a checksum over every tag (repository,
//! tag, digest) and every repository's manifests and blob links on both sides, and every
//! manifest body in the target against its digest.

use std::path::Path;

use futures_util::TryStreamExt as _;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use super::postgres::{PgConfig, PgMeta, pg};
use super::sqlite::SqliteMeta;
use crate::error::{Error, Result};

/// A column's kind, the same on both sides.
#[derive(Clone, Copy)]
enum Kind {
    Int,
    Text,
    Bytes,
}

/// The tables that move, in an order that satisfies their references.
const TABLES: &[(&str, &[(&str, Kind)])] = &[
    (
        "repos",
        &[
            ("id", Kind::Int),
            ("name", Kind::Text),
            ("created_at", Kind::Int),
        ],
    ),
    (
        "blobs",
        &[
            ("digest", Kind::Text),
            ("size", Kind::Int),
            ("created_at", Kind::Int),
            ("last_access", Kind::Int),
        ],
    ),
    (
        "repo_blobs",
        &[
            ("repo_id", Kind::Int),
            ("digest", Kind::Text),
            ("created_at", Kind::Int),
        ],
    ),
    (
        "manifest_bodies",
        &[
            ("digest", Kind::Text),
            ("content", Kind::Bytes),
            ("created_at", Kind::Int),
        ],
    ),
    (
        "manifests",
        &[
            ("repo_id", Kind::Int),
            ("digest", Kind::Text),
            ("media_type", Kind::Text),
            ("size", Kind::Int),
            ("subject", Kind::Text),
            ("artifact_type", Kind::Text),
            ("annotations", Kind::Text),
            ("created_at", Kind::Int),
            ("last_pulled", Kind::Int),
        ],
    ),
    (
        "manifest_refs",
        &[
            ("repo_id", Kind::Int),
            ("manifest_digest", Kind::Text),
            ("child_digest", Kind::Text),
            ("kind", Kind::Text),
        ],
    ),
    (
        "tags",
        &[
            ("repo_id", Kind::Int),
            ("name", Kind::Text),
            ("digest", Kind::Text),
            ("updated_at", Kind::Int),
        ],
    ),
    (
        "blob_review",
        &[("digest", Kind::Text), ("queued_at", Kind::Int)],
    ),
    (
        "manifest_review",
        &[
            ("repo_id", Kind::Int),
            ("digest", Kind::Text),
            ("queued_at", Kind::Int),
        ],
    ),
    (
        "body_review",
        &[("digest", Kind::Text), ("queued_at", Kind::Int)],
    ),
    (
        "gc_pending",
        &[
            ("digest", Kind::Text),
            ("size", Kind::Int),
            ("marked_at", Kind::Int),
            ("run", Kind::Text),
        ],
    ),
    (
        "confirmations",
        &[("key", Kind::Text), ("confirmed_at", Kind::Int)],
    ),
    ("settings", &[("name", Kind::Text), ("value", Kind::Text)]),
];

/// Queues the target's triggers fill while rows are copied; replaced by the source's.
const QUEUES: &[&str] = &["blob_review", "manifest_review", "body_review"];

/// Rows per message from the reading thread.
const BATCH: usize = 2_000;

/// One value.
#[derive(Debug)]
enum Cell {
    Int(Option<i64>),
    Text(Option<String>),
    Bytes(Option<Vec<u8>>),
}

impl Cell {
    fn sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Self::Int(v) => v,
            Self::Text(v) => v,
            Self::Bytes(v) => v,
        }
    }
}

/// From the reading thread.
enum Msg {
    /// A table begins, with this many rows.
    Table(&'static str, u64),
    Rows(Vec<Vec<Cell>>),
}

/// What a migration found and did.
#[derive(Debug, Default, Clone)]
pub struct MigrateReport {
    /// Rows per table: in the source, and copied (0 on a dry run).
    pub tables: Vec<(&'static str, u64, u64)>,
    /// Upload sessions in progress, not moved.
    pub uploads_left: u64,
    /// Manifest bodies checked against their digests in the target.
    pub bodies_verified: u64,
    /// Whether nothing was written.
    pub dry_run: bool,
}

impl std::fmt::Display for MigrateReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (t, source, copied) in &self.tables {
            if self.dry_run {
                writeln!(f, "{t:>16}: {source} rows")?;
            } else {
                writeln!(f, "{t:>16}: {copied} of {source} rows copied")?;
            }
        }
        if self.uploads_left > 0 {
            writeln!(
                f,
                "{} upload sessions in progress were not moved: their clients restart them",
                self.uploads_left
            )?;
        }
        if self.dry_run {
            write!(f, "dry run: nothing written")
        } else {
            write!(
                f,
                "verified: row counts, tags, manifests and blob links by checksum, {} manifest \
                 bodies against their digests",
                self.bodies_verified
            )
        }
    }
}

/// Progress: a table, rows done, rows in it.
pub type Progress<'a> = &'a (dyn Fn(&str, u64, u64) + Sync);

/// Copies the metadata in the SQLite file `from` into the empty PostgreSQL database at `to`
/// (see the module docs); with `dry_run`, only counts and checks the target is reachable and
/// empty.
pub async fn sqlite_to_postgres(
    from: &Path,
    to: &PgConfig,
    dry_run: bool,
    progress: Progress<'_>,
) -> Result<MigrateReport> {
    if !from.is_file() {
        return Err(Error::Migration(format!(
            "{}: no such SQLite file (the server's is <data>/berth.db)",
            from.display()
        )));
    }
    // Brings an older file's schema up to date (what the server does at start).
    drop(SqliteMeta::open(from).await?);
    let mut report = MigrateReport {
        dry_run,
        ..MigrateReport::default()
    };
    let source = from.to_owned();
    let (counts, uploads) = tokio::task::spawn_blocking(move || count_source(&source))
        .await
        .map_err(|e| Error::Internal(format!("reading task: {e}")))??;
    report.uploads_left = uploads;
    target_is_empty(to, dry_run).await?;
    if dry_run {
        report.tables = counts.iter().map(|(t, n)| (*t, *n, 0)).collect();
        return Ok(report);
    }

    let meta = PgMeta::connect(to).await?;
    let mut client = meta.client().await?;
    let tx = client.transaction().await.map_err(pg)?;
    let (sender, mut rx) = mpsc::channel::<Result<Msg>>(4);
    let source = from.to_owned();
    let reader = tokio::task::spawn_blocking(move || read_source(&source, &sender));
    let mut current: Option<(
        &'static str,
        u64,
        u64,
        std::pin::Pin<Box<BinaryCopyInWriter>>,
    )> = None;
    while let Some(msg) = rx.recv().await {
        match msg? {
            Msg::Table(name, total) => {
                if let Some((t, source_rows, done, w)) = current.take() {
                    finish_table(w).await?;
                    report.tables.push((t, source_rows, done));
                }
                if QUEUES.contains(&name) {
                    tx.execute(&format!("DELETE FROM {name}"), &[])
                        .await
                        .map_err(pg)?;
                }
                let cols = columns(name);
                let sink = tx
                    .copy_in(&format!(
                        "COPY {name} ({}) FROM STDIN BINARY",
                        cols.iter()
                            .map(|(c, _)| format!("\"{c}\""))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                    .await
                    .map_err(pg)?;
                let types: Vec<Type> = cols
                    .iter()
                    .map(|(_, k)| match k {
                        Kind::Int => Type::INT8,
                        Kind::Text => Type::TEXT,
                        Kind::Bytes => Type::BYTEA,
                    })
                    .collect();
                progress(name, 0, total);
                current = Some((
                    name,
                    total,
                    0,
                    Box::pin(BinaryCopyInWriter::new(sink, &types)),
                ));
            }
            Msg::Rows(rows) => {
                let Some((name, total, done, w)) = current.as_mut() else {
                    return Err(Error::Internal("rows before their table".into()));
                };
                for row in &rows {
                    let values: Vec<&(dyn ToSql + Sync)> = row.iter().map(Cell::sql).collect();
                    w.as_mut().write(&values).await.map_err(pg)?;
                }
                *done += rows.len() as u64;
                progress(name, *done, *total);
            }
        }
    }
    reader
        .await
        .map_err(|e| Error::Internal(format!("reading task: {e}")))??;
    if let Some((t, source_rows, done, w)) = current.take() {
        finish_table(w).await?;
        report.tables.push((t, source_rows, done));
    }
    tx.batch_execute("SELECT setval('repos_id_seq', GREATEST((SELECT max(id) FROM repos), 1))")
        .await
        .map_err(pg)?;
    tx.commit().await.map_err(pg)?;
    // Fresh statistics: the planner would otherwise take the tables for empty until
    // autovacuum comes by.
    client.batch_execute("ANALYZE").await.map_err(pg)?;

    verify(from, &meta, &mut report).await?;
    Ok(report)
}

async fn finish_table(w: std::pin::Pin<Box<BinaryCopyInWriter>>) -> Result<()> {
    let mut w = w;
    w.as_mut().finish().await.map_err(pg)?;
    Ok(())
}

fn columns(table: &str) -> &'static [(&'static str, Kind)] {
    TABLES
        .iter()
        .find(|(t, _)| *t == table)
        .map_or(&[], |(_, c)| *c)
}

fn read_only(path: &Path) -> Result<rusqlite::Connection> {
    let c = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    c.busy_timeout(std::time::Duration::from_secs(30))?;
    Ok(c)
}

/// Rows per table, and upload sessions in progress.
fn count_source(path: &Path) -> Result<(Vec<(&'static str, u64)>, u64)> {
    let c = read_only(path)?;
    let mut out = Vec::new();
    for (t, _) in TABLES {
        let n: i64 = c.query_row(&format!("SELECT count(*) FROM {t}"), [], |r| r.get(0))?;
        out.push((*t, n as u64));
    }
    let uploads: i64 = c.query_row("SELECT count(*) FROM uploads", [], |r| r.get(0))?;
    Ok((out, uploads as u64))
}

/// Sends every table, in one read transaction.
fn read_source(path: &Path, tx: &mpsc::Sender<Result<Msg>>) -> Result<()> {
    let mut c = read_only(path)?;
    let snapshot = c.transaction()?;
    for (table, cols) in TABLES {
        let n: i64 =
            snapshot.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?;
        if tx.blocking_send(Ok(Msg::Table(table, n as u64))).is_err() {
            return Ok(()); // the writer failed; it reports why
        }
        let sql = format!(
            "SELECT {} FROM {table}",
            cols.iter()
                .map(|(c, _)| format!("\"{c}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut stmt = snapshot.prepare(&sql)?;
        let mut rows = stmt.query([])?;
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(r) = rows.next()? {
            let mut row = Vec::with_capacity(cols.len());
            for (i, (_, kind)) in cols.iter().enumerate() {
                row.push(match kind {
                    Kind::Int => Cell::Int(r.get(i)?),
                    Kind::Text => Cell::Text(r.get(i)?),
                    Kind::Bytes => Cell::Bytes(r.get(i)?),
                });
            }
            batch.push(row);
            if batch.len() == BATCH
                && tx
                    .blocking_send(Ok(Msg::Rows(std::mem::take(&mut batch))))
                    .is_err()
            {
                return Ok(());
            }
        }
        if !batch.is_empty() && tx.blocking_send(Ok(Msg::Rows(batch))).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Refuses a target that already holds registry content.
async fn target_is_empty(to: &PgConfig, dry_run: bool) -> Result<()> {
    let (client, conn) = tokio_postgres::connect(&to.url, tokio_postgres::NoTls)
        .await
        .map_err(|e| Error::MetadataUnavailable(format!("connecting to the target: {e}")))?;
    let task = tokio::spawn(conn);
    let has_schema = client
        .query_one("SELECT to_regclass('public.repos') IS NOT NULL", &[])
        .await
        .map_err(pg)?
        .get::<_, bool>(0);
    let n: i64 = if has_schema {
        client
            .query_one(
                "SELECT (SELECT count(*) FROM repos) + (SELECT count(*) FROM blobs)",
                &[],
            )
            .await
            .map_err(pg)?
            .get(0)
    } else {
        0
    };
    drop(client);
    task.abort();
    if n > 0 {
        return Err(Error::Migration(format!(
            "the target database already holds registry content ({n} repositories and blobs); \
             migrate into an empty database{}",
            if dry_run {
                ""
            } else {
                " (nothing was written)"
            }
        )));
    }
    Ok(())
}

/// Checksums that must agree between the two sides, each over rows in a fixed order.
const CHECKS: &[(&str, &str)] = &[
    (
        "tags",
        "SELECT r.name, t.name, t.digest FROM tags t JOIN repos r ON r.id = t.repo_id",
    ),
    (
        "manifests",
        "SELECT r.name, m.digest, m.media_type, m.size FROM manifests m \
         JOIN repos r ON r.id = m.repo_id",
    ),
    (
        "blob links",
        "SELECT r.name, b.digest, b.size FROM repo_blobs l JOIN repos r ON r.id = l.repo_id \
         JOIN blobs b ON b.digest = l.digest",
    ),
];

/// A checksum over rows of text and numbers, sorted so that both databases agree whatever
/// order they return them in.
fn checksum(mut rows: Vec<String>) -> String {
    rows.sort_unstable();
    let mut h = Sha256::new();
    for r in rows {
        h.update(r.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

async fn verify(from: &Path, meta: &PgMeta, report: &mut MigrateReport) -> Result<()> {
    for (t, source, copied) in &report.tables {
        if source != copied {
            return Err(Error::Migration(format!(
                "{t}: {copied} rows copied of {source}"
            )));
        }
    }
    let c = meta.client().await?;
    for (t, ..) in &report.tables {
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM {t}"), &[])
            .await
            .map_err(pg)?
            .get(0);
        let want = report
            .tables
            .iter()
            .find(|(x, ..)| x == t)
            .map_or(0, |(_, s, _)| *s);
        if n as u64 != want {
            return Err(Error::Migration(format!(
                "{t}: the target holds {n} rows, the source {want}"
            )));
        }
    }
    for (what, sql) in CHECKS {
        let source = from.to_owned();
        let sql_owned = (*sql).to_owned();
        let left = tokio::task::spawn_blocking(move || -> Result<String> {
            let c = read_only(&source)?;
            let mut stmt = c.prepare(&sql_owned)?;
            let n = stmt.column_count();
            let rows = stmt
                .query_map([], |r| {
                    let mut s = String::new();
                    for i in 0..n {
                        let v: rusqlite::types::Value = r.get(i)?;
                        match v {
                            rusqlite::types::Value::Integer(x) => s += &x.to_string(),
                            rusqlite::types::Value::Text(x) => s += &x,
                            _ => s += "?",
                        }
                        s.push('\t');
                    }
                    Ok(s)
                })?
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Ok(checksum(rows))
        })
        .await
        .map_err(|e| Error::Internal(format!("checking task: {e}")))??;
        let rows = c.query(*sql, &[]).await.map_err(pg)?;
        let right = checksum(
            rows.iter()
                .map(|r| {
                    let mut s = String::new();
                    for i in 0..r.len() {
                        match r.columns()[i].type_() {
                            &Type::INT8 => s += &r.get::<_, i64>(i).to_string(),
                            _ => s += &r.get::<_, String>(i),
                        }
                        s.push('\t');
                    }
                    s
                })
                .collect(),
        );
        if left != right {
            return Err(Error::Migration(format!(
                "{what} differ between the source and the target after the copy"
            )));
        }
    }
    let bodies = c
        .query_raw(
            "SELECT digest, content FROM manifest_bodies",
            std::iter::empty::<&(dyn ToSql + Sync)>(),
        )
        .await
        .map_err(pg)?;
    futures_util::pin_mut!(bodies);
    while let Some(r) = bodies.try_next().await.map_err(pg)? {
        let digest: String = r.get(0);
        let content: Vec<u8> = r.get(1);
        if let Some(hex) = digest.strip_prefix("sha256:")
            && hex::encode(Sha256::digest(&content)) != hex
        {
            return Err(Error::Migration(format!(
                "the manifest body of {digest} does not match its digest in the target"
            )));
        }
        report.bodies_verified += 1;
    }
    Ok(())
}
