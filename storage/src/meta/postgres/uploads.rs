//! [`UploadMeta`] on PostgreSQL.

use std::collections::HashSet;

use super::{PgMeta, db, ensure_repo, link_blob};
use crate::meta::{Fut, UploadMeta};

/// Makes the transaction's commit return before its WAL record is flushed: for upload progress,
/// whose loss in a crash of the database loses nothing promised (see `Db::write_unsynced` in
/// the SQLite backend). The next synchronous commit flushes it with its own.
async fn unsynced(tx: &deadpool_postgres::Transaction<'_>) -> crate::error::Result<()> {
    tx.batch_execute("SET LOCAL synchronous_commit TO OFF")
        .await
        .map_err(db)
}

const SIZE: &str = "SELECT u.size FROM uploads u JOIN repos r ON r.id = u.repo_id
                    WHERE u.id = $1 AND r.name = $2";

impl UploadMeta for PgMeta {
    fn start_upload(&self, repo: &str, id: &str, t: i64) -> Fut<'_, ()> {
        let (name, sid) = (repo.to_owned(), id.to_owned());
        Box::pin(self.tx(false, move |tx| {
            let (name, sid) = (name.clone(), sid.clone());
            Box::pin(async move {
                unsynced(tx).await?;
                let rid = ensure_repo(tx, &name, t).await?;
                tx.execute(
                    "INSERT INTO uploads (id, repo_id, size, created_at, updated_at)
                     VALUES ($1, $2, 0, $3, $3)",
                    &[&sid, &rid, &t],
                )
                .await
                .map_err(db)?;
                Ok(())
            })
        }))
    }

    fn upload_size(&self, repo: &str, id: &str) -> Fut<'_, Option<u64>> {
        let (name, sid) = (repo.to_owned(), id.to_owned());
        Box::pin(async move {
            let c = self.client().await?;
            let row = c.query_opt(SIZE, &[&sid, &name]).await.map_err(db)?;
            Ok(row.map(|r| r.get::<_, i64>(0) as u64))
        })
    }

    fn commit_chunk(
        &self,
        repo: &str,
        id: &str,
        at: u64,
        len: u64,
        key: &str,
        t: i64,
    ) -> Fut<'_, bool> {
        let (name, sid, k) = (repo.to_owned(), id.to_owned(), key.to_owned());
        Box::pin(self.tx(false, move |tx| {
            let (name, sid, k) = (name.clone(), sid.clone(), k.clone());
            Box::pin(async move {
                unsynced(tx).await?;
                // Only if the session still ends where the chunk starts: the row's lock orders
                // chunks that race from different replicas.
                let rows = tx
                    .execute(
                        "UPDATE uploads SET size = size + $1, updated_at = $2
                         WHERE id = $3 AND size = $4
                           AND repo_id = (SELECT id FROM repos WHERE name = $5)",
                        &[&(len as i64), &t, &sid, &(at as i64), &name],
                    )
                    .await
                    .map_err(db)?;
                if rows == 0 {
                    return Ok(false);
                }
                tx.execute(
                    "INSERT INTO upload_parts (upload_id, \"offset\", size, key)
                     VALUES ($1, $2, $3, $4)",
                    &[&sid, &(at as i64), &(len as i64), &k],
                )
                .await
                .map_err(db)?;
                Ok(true)
            })
        }))
    }

    fn upload_parts(&self, repo: &str, id: &str) -> Fut<'_, Option<(u64, Vec<String>)>> {
        let (name, sid) = (repo.to_owned(), id.to_owned());
        Box::pin(async move {
            let c = self.client().await?;
            let Some(size) = c.query_opt(SIZE, &[&sid, &name]).await.map_err(db)? else {
                return Ok(None);
            };
            let parts = c
                .query(
                    "SELECT key FROM upload_parts WHERE upload_id = $1 ORDER BY \"offset\"",
                    &[&sid],
                )
                .await
                .map_err(db)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            Ok(Some((size.get::<_, i64>(0) as u64, parts)))
        })
    }

    fn reserve_blob(&self, digest: &str, size: u64, t: i64) -> Fut<'_, ()> {
        let d = digest.to_owned();
        Box::pin(self.tx(false, move |tx| {
            let d = d.clone();
            Box::pin(async move {
                // As a commit: shared with commits, exclusive to a sweep of this digest.
                lock_digest_shared(tx, &d).await?;
                tx.execute(
                    "INSERT INTO blobs (digest, size, created_at, last_access) VALUES ($1, $2, $3, $3)
                     ON CONFLICT (digest) DO NOTHING",
                    &[&d, &(size as i64), &t],
                )
                .await
                .map_err(db)?;
                Ok(())
            })
        }))
    }

    fn commit_blob(&self, repo: &str, id: &str, digest: &str, size: u64, t: i64) -> Fut<'_, ()> {
        let (name, sid, d) = (repo.to_owned(), id.to_owned(), digest.to_owned());
        Box::pin(self.tx(false, move |tx| {
            let (name, sid, d) = (name.clone(), sid.clone(), d.clone());
            Box::pin(async move {
                lock_digest_shared(tx, &d).await?;
                let rid = ensure_repo(tx, &name, t).await?;
                // Locks an existing row (a collection marking it waits, then sees the link), or
                // inserts one (after a collection that removed it).
                tx.execute(
                    "INSERT INTO blobs (digest, size, created_at, last_access) VALUES ($1, $2, $3, $3)
                     ON CONFLICT (digest) DO UPDATE SET size = blobs.size",
                    &[&d, &(size as i64), &t],
                )
                .await
                .map_err(db)?;
                link_blob(tx, rid, &d, t).await?;
                tx.execute("DELETE FROM uploads WHERE id = $1", &[&sid])
                    .await
                    .map_err(db)?;
                Ok(())
            })
        }))
    }

    fn end_upload(&self, id: &str) -> Fut<'_, Vec<String>> {
        let sid = id.to_owned();
        Box::pin(self.tx(false, move |tx| {
            let sid = sid.clone();
            Box::pin(async move {
                let parts = tx
                    .query("SELECT key FROM upload_parts WHERE upload_id = $1", &[&sid])
                    .await
                    .map_err(db)?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                tx.execute("DELETE FROM uploads WHERE id = $1", &[&sid])
                    .await
                    .map_err(db)?;
                Ok(parts)
            })
        }))
    }

    fn count_uploads(&self) -> Fut<'_, u64> {
        Box::pin(async move {
            let c = self.client().await?;
            let n: i64 = c
                .query_one("SELECT count(*) FROM uploads", &[])
                .await
                .map_err(db)?
                .get(0);
            Ok(n as u64)
        })
    }

    fn uploads_untouched_since(&self, cutoff: i64) -> Fut<'_, Vec<String>> {
        Box::pin(async move {
            let c = self.client().await?;
            Ok(
                c.query("SELECT id FROM uploads WHERE updated_at < $1", &[&cutoff])
                    .await
                    .map_err(db)?
                    .iter()
                    .map(|r| r.get(0))
                    .collect(),
            )
        })
    }

    fn live_uploads(&self, ids: Vec<String>) -> Fut<'_, HashSet<String>> {
        Box::pin(async move {
            let c = self.client().await?;
            Ok(
                c.query("SELECT id FROM uploads WHERE id = ANY($1)", &[&ids])
                    .await
                    .map_err(db)?
                    .iter()
                    .map(|r| r.get(0))
                    .collect(),
            )
        })
    }
}

/// Takes digest `d`'s advisory lock for this transaction, shared with other commits and
/// exclusive to a sweep deleting its object (see the module docs).
async fn lock_digest_shared(tx: &deadpool_postgres::Transaction<'_>, d: &str) -> crate::Result<()> {
    tx.execute(
        "SELECT pg_advisory_xact_lock_shared(hashtextextended($1, 0))",
        &[&d],
    )
    .await
    .map_err(db)?;
    Ok(())
}
