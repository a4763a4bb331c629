//! SQLite metadata: one file, one writer connection and a small pool of readers, used from
//! `spawn_blocking` so no async task ever blocks on the database. The zero-configuration
//! default, and the single-node backend (its one writer serialises every change, which is what
//! makes garbage collection's mark and sweep safe against pushes).
//!
//! # Layout
//! - `schema.sql`, `gc.sql`, `runs.sql`, `cluster.sql`: migrations, numbered by SQLite's `user_version`.
//! - `blobs`, `uploads`, `manifests`, `gc`, `leases`, `cluster`: the statements of each concern
//!   of the seam (see [`crate::meta`]), each in one place.

mod blobs;
mod cluster;
mod fsck;
mod gc;
mod leases;
mod manifests;
mod uploads;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{
    Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params,
};

use crate::error::{Error, Result};
use crate::meta::now;

const MIGRATIONS: &[&str] = &[
    include_str!("schema.sql"),
    include_str!("gc.sql"),
    include_str!("runs.sql"),
    include_str!("cluster.sql"),
];
/// Read connections, and so reads running at once: more only adds memory and contention on a
/// few cores.
const READERS: usize = 4;

/// The metadata database.
#[derive(Clone)]
pub struct Db {
    path: PathBuf,
    writer: Arc<Mutex<Connection>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    read_permits: Arc<tokio::sync::Semaphore>,
    /// Writers queue here, not on blocking threads: a writer that holds the lock (GC's sweep
    /// deletes objects inside its transaction) must always find a blocking thread free.
    write_gate: Arc<tokio::sync::Mutex<()>>,
    /// With `fsync`: commits wait for the disk.
    sync: Option<Arc<GroupSync>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("path", &self.path).finish()
    }
}

/// Settings of every connection. `synchronous = NORMAL` in WAL mode survives a crash of the
/// process; what a power loss needs, the WAL on the disk after each commit, [`Db::write`] adds
/// itself, shared between concurrent commits (see [`GroupSync`]).
fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // Every statement of the hot paths stays prepared (the default keeps 16).
    conn.set_prepared_statement_cache_capacity(128);
    conn.pragma_update(None, "foreign_keys", true)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(())
}

/// Group commit: a write returns once the WAL, its commit included, is on the disk. SQLite's
/// `synchronous = FULL` would sync inside the write lock, once per commit, one commit after
/// another; here the sync happens after the lock is released, and one sync covers every commit
/// made before it started, so sixteen concurrent pushes share syncs instead of queueing for
/// sixteen. Syncing the WAL file through our own descriptor is what `FULL` does through
/// SQLite's: the file's frames carry checksums and commit marks, and SQLite itself syncs the
/// WAL header when it restarts the log.
struct GroupSync {
    wal: PathBuf,
    /// Commits made so far (counted under the write lock).
    committed: std::sync::atomic::AtomicU64,
    /// How many of them the last finished sync covers; held while a sync runs.
    synced: tokio::sync::Mutex<u64>,
    /// Syncs made (for tests and curiosity: how well commits share them).
    syncs: std::sync::atomic::AtomicU64,
}

impl GroupSync {
    /// Returns once commit number `seq` is on the disk.
    async fn wait(&self, seq: u64) -> Result<()> {
        let mut synced = self.synced.lock().await;
        if *synced >= seq {
            return Ok(()); // a sync that started after this commit has finished
        }
        let upto = self.committed.load(std::sync::atomic::Ordering::SeqCst);
        let wal = self.wal.clone();
        // Opened for each sync, not kept: SQLite removes the WAL file when its last connection
        // closes and starts a new one later, and a kept handle would sync the old file.
        run_blocking(move || Ok(std::fs::File::open(&wal)?.sync_data()?)).await?;
        self.syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *synced = upto;
        Ok(())
    }
}

impl Db {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date,
    /// with durable commits.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, true)
    }

    /// [`Db::open`], with commits that wait for the disk or not (see [`GroupSync`]).
    pub fn open_with(path: &Path, fsync: bool) -> Result<Self> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        configure(&conn)?;
        migrate(&mut conn)?;
        Ok(Self {
            path: path.to_owned(),
            writer: Arc::new(Mutex::new(conn)),
            readers: Arc::new(Mutex::new(Vec::new())),
            read_permits: Arc::new(tokio::sync::Semaphore::new(READERS)),
            write_gate: Arc::new(tokio::sync::Mutex::new(())),
            sync: fsync.then(|| {
                let mut wal = path.as_os_str().to_owned();
                wal.push("-wal");
                Arc::new(GroupSync {
                    wal: wal.into(),
                    committed: std::sync::atomic::AtomicU64::new(0),
                    synced: tokio::sync::Mutex::new(0),
                    syncs: std::sync::atomic::AtomicU64::new(0),
                })
            }),
        })
    }

    fn reader(&self) -> Result<Connection> {
        if let Some(c) = self.readers.lock().map_err(poisoned)?.pop() {
            return Ok(c);
        }
        let c = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        configure(&c)?;
        Ok(c)
    }

    /// Runs `f` on a read connection.
    pub async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        // Waiting here, not on a blocking thread, keeps threads and connections bounded.
        let _permit = self
            .read_permits
            .acquire()
            .await
            .map_err(|_| Error::Internal("database closed".into()))?;
        let db = self.clone();
        run_blocking(move || {
            let conn = db.reader()?;
            let out = f(&conn);
            db.readers.lock().map_err(poisoned)?.push(conn);
            out
        })
        .await
    }

    /// Runs `f` in one immediate (write-locked) transaction, committed when `f` succeeds;
    /// returns once the commit is on the disk (with `fsync`).
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    {
        self.run(false, true, f).await
    }

    /// Like [`Db::write`], but returns without waiting for the disk: for rows whose loss in a
    /// power cut loses nothing that was promised, such as the progress of an upload session
    /// (its chunk bytes are not synced either, and the digest check at the end rejects a
    /// session that lost some). The next synced commit carries the row to the disk with it,
    /// as the WAL is synced in order.
    pub async fn write_unsynced<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    {
        self.run(false, false, f).await
    }

    /// Like [`Db::write`], but rolls back instead of committing when `rollback` is set (dry runs).
    pub async fn transaction<T, F>(&self, rollback: bool, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    {
        self.run(rollback, true, f).await
    }

    async fn run<T, F>(&self, rollback: bool, durable: bool, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    {
        let turn = self.write_gate.lock().await;
        let writer = self.writer.clone();
        let sync = self.sync.clone();
        let (out, seq) = run_blocking(move || {
            let mut conn = writer.lock().map_err(poisoned)?;
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            if rollback {
                tx.rollback()?;
                return Ok((out, None));
            }
            tx.commit()?;
            let seq = sync.map(|s| {
                s.committed
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                    + 1
            });
            Ok((out, seq))
        })
        .await?;
        drop(turn);
        if let (Some(sync), Some(seq), true) = (&self.sync, seq, durable) {
            sync.wait(seq).await?;
        }
        Ok(out)
    }

    /// Checks that the database answers (for readiness probes).
    pub async fn ping(&self) -> Result<()> {
        self.read(|c| Ok(c.query_row("SELECT 1", [], |_| Ok(()))?))
            .await
    }
}

async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("database task failed: {e}")))?
}

fn poisoned<T>(_: T) -> Error {
    Error::Internal("database lock poisoned".into())
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        return Err(Error::Internal(format!(
            "database schema version {version} is newer than this build knows ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

/// The id of repository `name`, if it exists.
pub(crate) fn repo_id(conn: &Connection, name: &str) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached("SELECT id FROM repos WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?)
}

/// The id of repository `name`, creating it when absent.
pub(crate) fn ensure_repo(tx: &Transaction<'_>, name: &str) -> Result<i64> {
    if let Some(id) = repo_id(tx, name)? {
        return Ok(id);
    }
    tx.execute(
        "INSERT INTO repos (name, created_at) VALUES (?1, ?2)",
        params![name, now()],
    )?;
    Ok(tx.last_insert_rowid())
}

/// The SQLite backend of the metadata seam.
#[derive(Debug, Clone)]
pub struct SqliteMeta {
    pub(crate) db: Db,
}

impl SqliteMeta {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date,
    /// with durable commits.
    pub async fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, true).await
    }

    /// [`SqliteMeta::open`], with commits that wait for the disk or not (`fsync`).
    pub async fn open_with(path: &Path, fsync: bool) -> Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let path = path.to_owned();
        let db = tokio::task::spawn_blocking(move || Db::open_with(&path, fsync))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        Ok(Self { db })
    }
}

impl crate::meta::Metadata for SqliteMeta {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn ping(&self) -> crate::meta::Fut<'_, ()> {
        Box::pin(self.db.ping())
    }

    fn age_for_tests(&self, secs: i64) -> crate::meta::Fut<'_, ()> {
        Box::pin(self.db.write(move |tx| {
            tx.execute_batch(&format!(
                "UPDATE blobs SET created_at = created_at - {secs}, last_access = last_access - {secs};
                 UPDATE repo_blobs SET created_at = created_at - {secs};
                 UPDATE blob_review SET queued_at = queued_at - {secs};
                 UPDATE manifest_review SET queued_at = queued_at - {secs};
                 UPDATE uploads SET created_at = created_at - {secs}, updated_at = updated_at - {secs};
                 UPDATE manifests SET created_at = created_at - {secs};"
            ))?;
            Ok(())
        }))
    }
}

/// Links `digest` into repository `repo_id` and protects it from `t`: an upload's commit or a
/// mount told the client the blob is there, even when the link already existed.
pub(crate) fn link_blob(tx: &Transaction<'_>, repo_id: i64, digest: &str, t: i64) -> Result<()> {
    tx.execute(
        "INSERT INTO repo_blobs (repo_id, digest, created_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (repo_id, digest) DO UPDATE SET created_at = excluded.created_at",
        params![repo_id, digest, t],
    )?;
    protect_blob(tx, digest, t)?;
    Ok(())
}

/// Protects blob `digest` from collection for the grace period from `t`: the review queue's
/// `queued_at` is the one durable "last acknowledged" time every collector reads.
pub(crate) fn protect_blob(tx: &Transaction<'_>, digest: &str, t: i64) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO blob_review (digest, queued_at) VALUES (?1, ?2)
         ON CONFLICT (digest) DO UPDATE SET queued_at = max(queued_at, excluded.queued_at)",
        params![digest, t],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.db");
        drop(Db::open(&p).unwrap());
        let db = Db::open(&p).unwrap();
        let v: i64 = db
            .writer
            .lock()
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v as usize, MIGRATIONS.len());
    }

    /// Commits made while a sync runs wait for the next one, and that one sync covers them all.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commits_made_during_a_sync_share_the_next_one() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("g.db")).unwrap();
        let sync = db.sync.clone().expect("durable by default");
        db.write(|tx| Ok(tx.execute_batch("CREATE TABLE t (x INTEGER)")?))
            .await
            .unwrap();
        assert_eq!(sync.syncs.load(SeqCst), 1, "a lone commit is synced");

        // A sync in progress, as far as the writers can tell.
        let running = sync.synced.lock().await;
        let writers: Vec<_> = (0..8)
            .map(|i| {
                let db = db.clone();
                tokio::spawn(async move {
                    db.write(move |tx| Ok(tx.execute("INSERT INTO t VALUES (?1)", [i])?))
                        .await
                })
            })
            .collect();
        while sync.committed.load(SeqCst) < 9 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(
            writers.iter().all(|w| !w.is_finished()),
            "a commit returned before its sync"
        );
        drop(running);
        for w in writers {
            w.await.unwrap().unwrap();
        }
        assert_eq!(
            sync.syncs.load(SeqCst),
            2,
            "eight waiting commits took one sync"
        );
    }
}
