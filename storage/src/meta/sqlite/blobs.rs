//! [`BlobMeta`] on SQLite.

use rusqlite::{OptionalExtension, params};

use super::{SqliteMeta, ensure_repo, link_blob, protect_blob, repo_id};
use crate::meta::{BlobFacts, BlobMeta, Fut};

impl BlobMeta for SqliteMeta {
    fn blob_in_repo(&self, repo: &str, digest: &str, now: i64) -> Fut<'_, Option<BlobFacts>> {
        let (name, d) = (repo.to_owned(), digest.to_owned());
        Box::pin(self.db.read(move |c| {
            Ok(c.prepare_cached(
                "SELECT b.size,
                        CASE WHEN q.queued_at < ?3 THEN NOT EXISTS (SELECT 1 FROM manifest_refs m
                             WHERE m.child_digest = rb.digest AND m.kind = 'blob') ELSE 0 END
                 FROM repo_blobs rb JOIN repos r ON r.id = rb.repo_id
                 JOIN blobs b ON b.digest = rb.digest
                 LEFT JOIN blob_review q ON q.digest = rb.digest
                 WHERE r.name = ?1 AND rb.digest = ?2",
            )?
            .query_row(params![name, d, now], |r| {
                Ok(BlobFacts {
                    size: r.get::<_, i64>(0)? as u64,
                    candidate: r.get(1)?,
                })
            })
            .optional()?)
        }))
    }

    fn protect_blob_read(&self, repo: &str, digest: &str, t: i64) -> Fut<'_, bool> {
        let (name, d) = (repo.to_owned(), digest.to_owned());
        Box::pin(self.db.write(move |tx| {
            // Serialised with GC's mark: either it removed the link first (the client then
            // hears 404 and uploads), or it will see this read.
            let linked = tx
                .query_row(
                    "SELECT 1 FROM repo_blobs rb JOIN repos r ON r.id = rb.repo_id
                     WHERE r.name = ?1 AND rb.digest = ?2",
                    params![name, d],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if linked {
                protect_blob(tx, &d, t)?;
            }
            Ok(linked)
        }))
    }

    fn unlink_blob(&self, repo: &str, digest: &str) -> Fut<'_, bool> {
        let (name, d) = (repo.to_owned(), digest.to_owned());
        Box::pin(self.db.write(move |tx| {
            let n = tx.execute(
                "DELETE FROM repo_blobs WHERE digest = ?2
                 AND repo_id = (SELECT id FROM repos WHERE name = ?1)",
                params![name, d],
            )?;
            Ok(n > 0)
        }))
    }

    fn mount_blob(&self, repo: &str, digest: &str, from: Option<&str>, t: i64) -> Fut<'_, bool> {
        let (name, d, from) = (repo.to_owned(), digest.to_owned(), from.map(str::to_owned));
        Box::pin(self.db.write(move |tx| {
            let found = match &from {
                Some(f) => tx
                    .query_row(
                        "SELECT 1 FROM repo_blobs rb JOIN repos r ON r.id = rb.repo_id
                         WHERE r.name = ?1 AND rb.digest = ?2",
                        params![f, d],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some(),
                // Linked somewhere: a row alone may be a commit still placing its object
                // (see `reserve_blob`).
                None => tx
                    .query_row(
                        "SELECT 1 FROM repo_blobs rb JOIN blobs b ON b.digest = rb.digest
                         WHERE rb.digest = ?1 LIMIT 1",
                        [&d],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some(),
            };
            if !found {
                return Ok(false);
            }
            let id = ensure_repo(tx, &name)?;
            link_blob(tx, id, &d, t)?;
            Ok(true)
        }))
    }

    fn link_cached_blob(&self, repo: &str, digest: &str, t: i64) -> Fut<'_, bool> {
        let (name, d) = (repo.to_owned(), digest.to_owned());
        Box::pin(async move {
            // Most calls are misses (a blob about to be fetched, asked three times on the way):
            // a read connection answers those, leaving the one writer to writes.
            let (n, dd) = (name.clone(), d.clone());
            let possible = self
                .db
                .read(move |c| match repo_id(c, &n)? {
                    Some(rid) => linkable(c, rid, &dd),
                    None => Ok(false),
                })
                .await?;
            if !possible {
                return Ok(false);
            }
            self.db
                .write(move |tx| {
                    let Some(rid) = repo_id(tx, &name)? else {
                        return Ok(false);
                    };
                    let ok = linkable(tx, rid, &d)?;
                    if ok {
                        link_blob(tx, rid, &d, t)?;
                    }
                    Ok(ok)
                })
                .await
        })
    }
}

/// Whether cache repository `rid` may link blob `d`: some repository holds the blob and a
/// manifest of `rid` names it.
fn linkable(c: &rusqlite::Connection, rid: i64, d: &str) -> crate::error::Result<bool> {
    Ok(c.query_row(
        "SELECT EXISTS (SELECT 1 FROM repo_blobs rb JOIN blobs b ON b.digest = rb.digest
                        WHERE rb.digest = ?2)
            AND EXISTS (SELECT 1 FROM manifest_refs WHERE repo_id = ?1
                        AND child_digest = ?2 AND kind = 'blob')",
        params![rid, d],
        |r| r.get(0),
    )?)
}
