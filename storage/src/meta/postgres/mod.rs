//! PostgreSQL metadata: for several Berth replicas over one database.
//!
//! The same tables as the SQLite backend, and the same review-queue triggers (stamped with
//! the database's clock, which every replica shares). Where SQLite's one writer serialises
//! everything, here transactions run side by side, so what must not interleave is locked
//! explicitly:
//!
//! - **Garbage collection against pushes.** Mark takes each candidate blob's row `FOR UPDATE`
//!   and only then reads its references and its protection time; everything that relies on a
//!   blob existing — a manifest push naming it, a mount, a read that protects it, a re-upload
//!   linking it — takes the row `FOR SHARE` (or updates it) first. Either mark waits and then
//!   sees the push, or the push waits and then finds the blob gone (and the client uploads it
//!   again). Rows are always locked in digest order, so the two never deadlock; a transaction
//!   that does hit a deadlock or a serialisation failure is retried.
//! - **Sweep against blob commits.** A sweep batch holds a transaction-level advisory lock per
//!   digest (exclusive) while it deletes the objects; a blob commit holds the same lock shared
//!   while it writes the row. A commit either lands first (the sweep sees the row and keeps the
//!   object) or waits (and then finds its object gone and puts it back, see
//!   `Store::finish_upload`).
//! - **Manifest bodies.** A push locks an existing body row (a no-op update) before its
//!   manifest row refers to it; mark locks a body before it checks that nothing uses it.
//! - **Schema migrations** run under a session advisory lock, so replicas starting together
//!   migrate once.
//!
//! # Layout
//! - `schema.sql`: migration 1. `blobs`, `uploads`, `manifests`, `gc`, `leases`, `cluster`: the
//!   statements of each concern of the seam (see [`crate::meta`]).

mod blobs;
mod cluster;
mod fsck;
mod gc;
mod leases;
mod manifests;
mod uploads;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::future::BoxFuture;
use tokio_postgres::error::SqlState;

use crate::error::{Error, Result};
use crate::meta::Fut;

const MIGRATIONS: &[&str] = &[include_str!("schema.sql")];
/// The session advisory lock key migrations run under ("berth" in ASCII).
const MIGRATION_LOCK: i64 = 0x62_65_72_74_68;
/// Attempts of a transaction that keeps hitting deadlocks or serialisation failures.
const ATTEMPTS: usize = 5;

/// Where and how to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgConfig {
    /// `postgres://user:password@host:port/database` (or key=value form).
    pub url: String,
    /// Connections kept per process.
    pub pool_size: usize,
}

/// The PostgreSQL backend of the metadata seam.
#[derive(Clone)]
pub struct PgMeta {
    pool: Pool,
}

impl std::fmt::Debug for PgMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgMeta")
            .field("pool", &self.pool.status())
            .finish()
    }
}

pub(crate) fn pg(e: tokio_postgres::Error) -> Error {
    Error::Postgres(e.to_string())
}

fn pool_err(e: deadpool_postgres::PoolError) -> Error {
    Error::MetadataUnavailable(format!("no PostgreSQL connection: {e}"))
}

/// Whether `e` is worth retrying the transaction for.
fn transient(e: &Error) -> bool {
    matches!(e, Error::PostgresRetry(_))
}

/// Maps a database error, marking those a retry can cure.
pub(crate) fn db(e: tokio_postgres::Error) -> Error {
    match e.code() {
        Some(c)
            if *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::T_R_SERIALIZATION_FAILURE =>
        {
            Error::PostgresRetry(e.to_string())
        }
        _ => pg(e),
    }
}

impl PgMeta {
    /// Connects (a pool of `pool_size`), checks the server answers, and brings the schema up to
    /// date.
    pub async fn connect(config: &PgConfig) -> Result<Self> {
        let pg_config: tokio_postgres::Config = config
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| Error::Postgres(format!("metadata url: {e}")))?;
        let manager = Manager::from_config(
            pg_config,
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .wait_timeout(Some(Duration::from_secs(30)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Postgres(format!("connection pool: {e}")))?;
        let meta = Self { pool };
        meta.migrate().await?;
        Ok(meta)
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_err)
    }

    async fn migrate(&self) -> Result<()> {
        let mut c = self.client().await?;
        c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg)?;
        let result = async {
            c.batch_execute("CREATE TABLE IF NOT EXISTS berth_schema (version INTEGER NOT NULL)")
                .await
                .map_err(pg)?;
            let version: i32 = c
                .query_opt("SELECT version FROM berth_schema", &[])
                .await
                .map_err(pg)?
                .map_or(0, |r| r.get(0));
            let version = usize::try_from(version).unwrap_or(usize::MAX);
            if version > MIGRATIONS.len() {
                return Err(Error::Internal(format!(
                    "metadata schema version {version} is newer than this build knows ({})",
                    MIGRATIONS.len()
                )));
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
                let tx = c.transaction().await.map_err(pg)?;
                tx.batch_execute(sql).await.map_err(pg)?;
                tx.execute("DELETE FROM berth_schema", &[])
                    .await
                    .map_err(pg)?;
                tx.execute(
                    "INSERT INTO berth_schema (version) VALUES ($1)",
                    &[&((i + 1) as i32)],
                )
                .await
                .map_err(pg)?;
                tx.commit().await.map_err(pg)?;
            }
            Ok(())
        }
        .await;
        c.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg)?;
        result
    }

    /// Runs `f` in one transaction, committed when it succeeds (rolled back when `rollback`);
    /// retried from the start on a deadlock or a serialisation failure.
    pub(crate) async fn tx<T, F>(&self, rollback: bool, f: F) -> Result<T>
    where
        T: Send,
        F: for<'t> Fn(&'t deadpool_postgres::Transaction<'t>) -> BoxFuture<'t, Result<T>>
            + Send
            + Sync,
    {
        let mut c = self.client().await?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let tx = c.transaction().await.map_err(pg)?;
            let out = f(&tx).await;
            let out = match out {
                Ok(v) if rollback => tx.rollback().await.map_err(db).map(|()| v),
                Ok(v) => tx.commit().await.map_err(db).map(|()| v),
                Err(e) => {
                    let _ = tx.rollback().await;
                    Err(e)
                }
            };
            match out {
                Err(e) if transient(&e) && attempt < ATTEMPTS => {
                    tracing::debug!(attempt, error = %e, "retrying a metadata transaction");
                    tokio::time::sleep(Duration::from_millis(5 * attempt as u64)).await;
                }
                other => return other,
            }
        }
    }
}

impl crate::meta::Metadata for PgMeta {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn ping(&self) -> Fut<'_, ()> {
        Box::pin(async {
            let c = self.client().await?;
            c.query_one("SELECT 1", &[]).await.map_err(pg)?;
            Ok(())
        })
    }

    fn age_for_tests(&self, secs: i64) -> Fut<'_, ()> {
        Box::pin(async move {
            let c = self.client().await?;
            c.batch_execute(&format!(
                "UPDATE blobs SET created_at = created_at - {secs}, last_access = last_access - {secs};
                 UPDATE repo_blobs SET created_at = created_at - {secs};
                 UPDATE blob_review SET queued_at = queued_at - {secs};
                 UPDATE manifest_review SET queued_at = queued_at - {secs};
                 UPDATE uploads SET created_at = created_at - {secs}, updated_at = updated_at - {secs};
                 UPDATE manifests SET created_at = created_at - {secs};"
            ))
            .await
            .map_err(pg)?;
            Ok(())
        })
    }
}

/// The id of repository `name`, creating it when absent (race-free across replicas).
pub(crate) async fn ensure_repo(
    tx: &deadpool_postgres::Transaction<'_>,
    name: &str,
    t: i64,
) -> Result<i64> {
    let row = tx
        .query_one(
            "INSERT INTO repos (name, created_at) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET name = excluded.name RETURNING id",
            &[&name, &t],
        )
        .await
        .map_err(db)?;
    Ok(row.get(0))
}

/// The id of repository `name`, if it exists.
pub(crate) async fn repo_id<C: deadpool_postgres::GenericClient>(
    c: &C,
    name: &str,
) -> Result<Option<i64>> {
    Ok(
        c.query_opt("SELECT id FROM repos WHERE name = $1", &[&name])
            .await
            .map_err(db)?
            .map(|r| r.get(0)),
    )
}

/// Links `digest` into repository `repo_id` and protects it from `t` (see the SQLite twin).
/// The blob's row must be locked by the caller.
pub(crate) async fn link_blob(
    tx: &deadpool_postgres::Transaction<'_>,
    repo_id: i64,
    digest: &str,
    t: i64,
) -> Result<()> {
    tx.execute(
        "INSERT INTO repo_blobs (repo_id, digest, created_at) VALUES ($1, $2, $3)
         ON CONFLICT (repo_id, digest) DO UPDATE SET created_at = excluded.created_at",
        &[&repo_id, &digest, &t],
    )
    .await
    .map_err(db)?;
    protect_blob(tx, digest, t).await
}

/// Protects blob `digest` from collection for the grace period from `t`.
pub(crate) async fn protect_blob(
    tx: &deadpool_postgres::Transaction<'_>,
    digest: &str,
    t: i64,
) -> Result<()> {
    tx.execute(
        "INSERT INTO blob_review (digest, queued_at) VALUES ($1, $2)
         ON CONFLICT (digest) DO UPDATE SET queued_at = GREATEST(blob_review.queued_at, excluded.queued_at)",
        &[&digest, &t],
    )
    .await
    .map_err(db)?;
    Ok(())
}
