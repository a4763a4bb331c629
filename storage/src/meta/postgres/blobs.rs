//! [`BlobMeta`] on PostgreSQL.

use super::{PgMeta, db, ensure_repo, link_blob, protect_blob};
use crate::meta::{BlobFacts, BlobMeta, Fut};

impl BlobMeta for PgMeta {
    fn blob_in_repo(&self, repo: &str, digest: &str, now: i64) -> Fut<'_, Option<BlobFacts>> {
        let (name, d) = (repo.to_owned(), digest.to_owned());
        Box::pin(async move {
            let c = self.client().await?;
            let st = c
                .prepare_cached(
                    "SELECT b.size,
                            CASE WHEN q.queued_at < $3 THEN NOT EXISTS (SELECT 1 FROM manifest_refs m
                                 WHERE m.child_digest = rb.digest AND m.kind = 'blob') ELSE false END
                     FROM repo_blobs rb JOIN repos r ON r.id = rb.repo_id
                     JOIN blobs b ON b.digest = rb.digest
                     LEFT JOIN blob_review q ON q.digest = rb.digest
                     WHERE r.name = $1 AND rb.digest = $2",
                )
                .await
                .map_err(db)?;
            let row = c.query_opt(&st, &[&name, &d, &now]).await.map_err(db)?;
            Ok(row.map(|r| BlobFacts {
                size: r.get::<_, i64>(0) as u64,
                candidate: r.get(1),
            }))
        })
    }

    fn protect_blob_read(&self, repo: &str, digest: &str, t: i64) -> Fut<'_, bool> {
        let (name, d) = (repo.to_owned(), digest.to_owned());
        Box::pin(self.tx(false, move |tx| {
            let (name, d) = (name.clone(), d.clone());
            Box::pin(async move {
                // The blob's row, shared: a collection marking it waits for this, then sees
                // the protection; or it went first, and there is no row to lock.
                let linked = tx
                    .query_opt(
                        "SELECT 1 FROM repo_blobs rb JOIN repos r ON r.id = rb.repo_id
                         JOIN blobs b ON b.digest = rb.digest
                         WHERE r.name = $1 AND rb.digest = $2 FOR SHARE OF b",
                        &[&name, &d],
                    )
                    .await
                    .map_err(db)?
                    .is_some();
                if linked {
                    protect_blob(tx, &d, t).await?;
                }
                Ok(linked)
            })
        }))
    }

    fn unlink_blob(&self, repo: &str, digest: &str) -> Fut<'_, bool> {
        let (name, d) = (repo.to_owned(), digest.to_owned());
        Box::pin(async move {
            let c = self.client().await?;
            let n = c
                .execute(
                    "DELETE FROM repo_blobs WHERE digest = $2
                     AND repo_id = (SELECT id FROM repos WHERE name = $1)",
                    &[&name, &d],
                )
                .await
                .map_err(db)?;
            Ok(n > 0)
        })
    }

    fn mount_blob(&self, repo: &str, digest: &str, from: Option<&str>, t: i64) -> Fut<'_, bool> {
        let (name, d, from) = (repo.to_owned(), digest.to_owned(), from.map(str::to_owned));
        Box::pin(self.tx(false, move |tx| {
            let (name, d, from) = (name.clone(), d.clone(), from.clone());
            Box::pin(async move {
                let found = match &from {
                    Some(f) => tx
                        .query_opt(
                            "SELECT 1 FROM repo_blobs rb JOIN repos r ON r.id = rb.repo_id
                             JOIN blobs b ON b.digest = rb.digest
                             WHERE r.name = $1 AND rb.digest = $2 FOR SHARE OF b",
                            &[f, &d],
                        )
                        .await
                        .map_err(db)?,
                    // Linked somewhere: a row alone may be a commit still placing its
                    // object (see `reserve_blob`).
                    None => tx
                        .query_opt(
                            "SELECT 1 FROM blobs b WHERE b.digest = $1
                             AND EXISTS (SELECT 1 FROM repo_blobs rb WHERE rb.digest = b.digest)
                             FOR SHARE OF b",
                            &[&d],
                        )
                        .await
                        .map_err(db)?,
                };
                if found.is_none() {
                    return Ok(false);
                }
                let id = ensure_repo(tx, &name, t).await?;
                link_blob(tx, id, &d, t).await?;
                Ok(true)
            })
        }))
    }

    fn link_cached_blob(&self, repo: &str, digest: &str, t: i64) -> Fut<'_, bool> {
        let (name, d) = (repo.to_owned(), digest.to_owned());
        Box::pin(self.tx(false, move |tx| {
            let (name, d) = (name.clone(), d.clone());
            Box::pin(async move {
                let Some(rid) = tx
                    .query_opt("SELECT id FROM repos WHERE name = $1", &[&name])
                    .await
                    .map_err(db)?
                    .map(|r| r.get::<_, i64>(0))
                else {
                    return Ok(false);
                };
                let held = tx
                    .query_opt(
                        "SELECT 1 FROM blobs b WHERE b.digest = $1
                         AND EXISTS (SELECT 1 FROM repo_blobs rb WHERE rb.digest = b.digest)
                         FOR SHARE OF b",
                        &[&d],
                    )
                    .await
                    .map_err(db)?
                    .is_some();
                let named: bool = tx
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM manifest_refs WHERE repo_id = $1
                                        AND child_digest = $2 AND kind = 'blob')",
                        &[&rid, &d],
                    )
                    .await
                    .map_err(db)?
                    .get(0);
                if held && named {
                    link_blob(tx, rid, &d, t).await?;
                }
                Ok(held && named)
            })
        }))
    }
}
