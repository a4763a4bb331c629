//! [`FsckMeta`] on PostgreSQL.

use super::{PgMeta, db};
use crate::meta::{Dangling, FsckMeta, Fut, ImageRef, UploadRecord};

impl FsckMeta for PgMeta {
    fn blob_rows<'a>(
        &'a self,
        after: Option<&'a str>,
        n: usize,
    ) -> Fut<'a, Vec<(String, u64, bool)>> {
        let after = after.unwrap_or("").to_owned();
        Box::pin(async move {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT b.digest, b.size,
                            EXISTS (SELECT 1 FROM repo_blobs rb WHERE rb.digest = b.digest)
                            AND NOT EXISTS (SELECT 1 FROM gc_pending g WHERE g.digest = b.digest)
                     FROM blobs b WHERE b.digest > $1 ORDER BY b.digest LIMIT $2",
                    &[&after, &(n as i64)],
                )
                .await
                .map_err(db)?;
            Ok(rows
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64, r.get(2)))
                .collect())
        })
    }

    fn has_blob<'a>(&'a self, digest: &'a str) -> Fut<'a, bool> {
        Box::pin(async move {
            let c = self.client().await?;
            Ok(
                c.query_opt("SELECT 1 FROM blobs WHERE digest = $1", &[&digest])
                    .await
                    .map_err(db)?
                    .is_some(),
            )
        })
    }

    fn awaits_sweep<'a>(&'a self, digest: &'a str) -> Fut<'a, bool> {
        Box::pin(async move {
            let c = self.client().await?;
            Ok(
                c.query_opt("SELECT 1 FROM gc_pending WHERE digest = $1", &[&digest])
                    .await
                    .map_err(db)?
                    .is_some(),
            )
        })
    }

    fn dangling_references(&self, limit: usize) -> Fut<'_, Vec<Dangling>> {
        Box::pin(async move {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT r.name, m.manifest_digest, m.child_digest, m.kind
                     FROM manifest_refs m JOIN repos r ON r.id = m.repo_id
                     WHERE (m.kind = 'blob' AND NOT EXISTS (
                               SELECT 1 FROM repo_blobs rb JOIN blobs b ON b.digest = rb.digest
                               WHERE rb.repo_id = m.repo_id AND rb.digest = m.child_digest))
                        OR (m.kind = 'manifest' AND NOT EXISTS (
                               SELECT 1 FROM manifests x
                               WHERE x.repo_id = m.repo_id AND x.digest = m.child_digest))
                     ORDER BY r.name, m.manifest_digest, m.child_digest LIMIT $1",
                    &[&(limit as i64)],
                )
                .await
                .map_err(db)?;
            Ok(rows
                .iter()
                .map(|r| Dangling {
                    repo: r.get(0),
                    manifest: r.get(1),
                    child: r.get(2),
                    kind: r.get(3),
                })
                .collect())
        })
    }

    fn manifests_using(&self, digests: Vec<String>) -> Fut<'_, Vec<ImageRef>> {
        Box::pin(async move {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT DISTINCT r.name, m.manifest_digest,
                            (SELECT string_agg(t.name, ',' ORDER BY t.name) FROM tags t
                             WHERE t.repo_id = m.repo_id AND t.digest = m.manifest_digest)
                     FROM manifest_refs m JOIN repos r ON r.id = m.repo_id
                     WHERE m.kind = 'blob' AND m.child_digest = ANY($1)
                     ORDER BY 1, 2",
                    &[&digests],
                )
                .await
                .map_err(db)?;
            Ok(rows
                .iter()
                .map(|r| ImageRef {
                    repo: r.get(0),
                    digest: r.get(1),
                    tags: r
                        .get::<_, Option<String>>(2)
                        .map(|t| t.split(',').map(str::to_owned).collect())
                        .unwrap_or_default(),
                })
                .collect())
        })
    }

    fn drop_blobs(&self, digests: Vec<String>, untouched_since: i64) -> Fut<'_, Vec<String>> {
        Box::pin(self.tx(false, move |tx| {
            let digests = digests.clone();
            Box::pin(async move {
                // The rows, locked: a push protecting or re-linking one of them waits, then
                // finds it gone and uploads it again; or it went first, and the blob is kept.
                let rows = tx
                    .query(
                        "SELECT b.digest FROM blobs b WHERE b.digest = ANY($1)
                           AND b.last_access < $2
                           AND NOT EXISTS (SELECT 1 FROM repo_blobs rb
                                           WHERE rb.digest = b.digest AND rb.created_at >= $2)
                           AND NOT EXISTS (SELECT 1 FROM blob_review q
                                           WHERE q.digest = b.digest AND q.queued_at >= $2)
                         FOR UPDATE OF b",
                        &[&digests, &untouched_since],
                    )
                    .await
                    .map_err(db)?;
                let doomed: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                for table in ["repo_blobs", "gc_pending", "blob_review", "blobs"] {
                    tx.execute(
                        &format!("DELETE FROM {table} WHERE digest = ANY($1)"),
                        &[&doomed],
                    )
                    .await
                    .map_err(db)?;
                }
                Ok(doomed)
            })
        }))
    }

    fn adopt_objects(&self, objects: Vec<(String, u64)>, t: i64) -> Fut<'_, u64> {
        Box::pin(async move {
            let c = self.client().await?;
            let digests: Vec<&str> = objects.iter().map(|(d, _)| d.as_str()).collect();
            let sizes: Vec<i64> = objects.iter().map(|(_, s)| *s as i64).collect();
            c.execute(
                "INSERT INTO blobs (digest, size, created_at, last_access)
                 SELECT d, s, $3, $3 FROM unnest($1::text[], $2::bigint[]) AS o(d, s)
                 ON CONFLICT (digest) DO NOTHING",
                &[&digests, &sizes, &t],
            )
            .await
            .map_err(db)
        })
    }

    fn upload_records(&self) -> Fut<'_, Vec<UploadRecord>> {
        Box::pin(async move {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT u.id, u.size, p.key, p.size FROM uploads u
                     LEFT JOIN upload_parts p ON p.upload_id = u.id
                     ORDER BY u.id, p.\"offset\"",
                    &[],
                )
                .await
                .map_err(db)?;
            let mut out: Vec<UploadRecord> = Vec::new();
            for r in &rows {
                let id: String = r.get(0);
                if out.last().is_none_or(|u| u.id != id) {
                    out.push(UploadRecord {
                        id,
                        size: r.get::<_, i64>(1) as u64,
                        parts: Vec::new(),
                    });
                }
                if let (Some(k), Some(p), Some(u)) = (
                    r.get::<_, Option<String>>(2),
                    r.get::<_, Option<i64>>(3),
                    out.last_mut(),
                ) {
                    u.parts.push((k, p as u64));
                }
            }
            Ok(out)
        })
    }
}
