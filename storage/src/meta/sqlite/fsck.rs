//! [`FsckMeta`] on SQLite.

use rusqlite::{OptionalExtension, params};

use super::SqliteMeta;
use crate::meta::{Dangling, FsckMeta, Fut, ImageRef, UploadRecord};

impl FsckMeta for SqliteMeta {
    fn blob_rows<'a>(
        &'a self,
        after: Option<&'a str>,
        n: usize,
    ) -> Fut<'a, Vec<(String, u64, bool)>> {
        let after = after.unwrap_or("").to_owned();
        Box::pin(self.db.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT b.digest, b.size,
                        EXISTS (SELECT 1 FROM repo_blobs rb WHERE rb.digest = b.digest)
                        AND NOT EXISTS (SELECT 1 FROM gc_pending g WHERE g.digest = b.digest)
                 FROM blobs b WHERE b.digest > ?1 ORDER BY b.digest LIMIT ?2",
            )?;
            let rows = st
                .query_map(params![after, n as i64], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)? as u64,
                        r.get::<_, bool>(2)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        }))
    }

    fn has_blob<'a>(&'a self, digest: &'a str) -> Fut<'a, bool> {
        let d = digest.to_owned();
        Box::pin(self.db.read(move |c| {
            Ok(
                c.query_row("SELECT 1 FROM blobs WHERE digest = ?1", [d], |_| Ok(()))
                    .optional()?
                    .is_some(),
            )
        }))
    }

    fn awaits_sweep<'a>(&'a self, digest: &'a str) -> Fut<'a, bool> {
        let d = digest.to_owned();
        Box::pin(self.db.read(move |c| {
            Ok(c.query_row(
                "SELECT 1 FROM gc_pending WHERE digest = ?1",
                [d],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
        }))
    }

    fn dangling_references(&self, limit: usize) -> Fut<'_, Vec<Dangling>> {
        Box::pin(self.db.read(move |c| {
            let mut st = c.prepare(
                "SELECT r.name, m.manifest_digest, m.child_digest, m.kind
                 FROM manifest_refs m JOIN repos r ON r.id = m.repo_id
                 WHERE (m.kind = 'blob' AND NOT EXISTS (
                           SELECT 1 FROM repo_blobs rb JOIN blobs b ON b.digest = rb.digest
                           WHERE rb.repo_id = m.repo_id AND rb.digest = m.child_digest))
                    OR (m.kind = 'manifest' AND NOT EXISTS (
                           SELECT 1 FROM manifests x
                           WHERE x.repo_id = m.repo_id AND x.digest = m.child_digest))
                 ORDER BY r.name, m.manifest_digest, m.child_digest LIMIT ?1",
            )?;
            let rows = st
                .query_map([limit as i64], |r| {
                    Ok(Dangling {
                        repo: r.get(0)?,
                        manifest: r.get(1)?,
                        child: r.get(2)?,
                        kind: r.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        }))
    }

    fn manifests_using(&self, digests: Vec<String>) -> Fut<'_, Vec<ImageRef>> {
        Box::pin(self.db.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT r.name, m.manifest_digest,
                        (SELECT group_concat(t.name, ',') FROM tags t
                         WHERE t.repo_id = m.repo_id AND t.digest = m.manifest_digest)
                 FROM manifest_refs m JOIN repos r ON r.id = m.repo_id
                 WHERE m.kind = 'blob' AND m.child_digest = ?1",
            )?;
            let mut out = Vec::new();
            for d in &digests {
                for row in st.query_map([d], |r| {
                    Ok(ImageRef {
                        repo: r.get(0)?,
                        digest: r.get(1)?,
                        tags: r
                            .get::<_, Option<String>>(2)?
                            .map(|t| t.split(',').map(str::to_owned).collect())
                            .unwrap_or_default(),
                    })
                })? {
                    out.push(row?);
                }
            }
            out.sort_by(|a, b| (&a.repo, &a.digest).cmp(&(&b.repo, &b.digest)));
            out.dedup();
            Ok(out)
        }))
    }

    fn drop_blobs(&self, digests: Vec<String>, untouched_since: i64) -> Fut<'_, Vec<String>> {
        Box::pin(self.db.write(move |tx| {
            let mut dropped = Vec::new();
            for d in &digests {
                let touched: bool = tx.query_row(
                    "SELECT EXISTS (SELECT 1 FROM blobs WHERE digest = ?1 AND last_access >= ?2)
                         OR EXISTS (SELECT 1 FROM repo_blobs WHERE digest = ?1 AND created_at >= ?2)
                         OR EXISTS (SELECT 1 FROM blob_review WHERE digest = ?1 AND queued_at >= ?2)",
                    params![d, untouched_since],
                    |r| r.get(0),
                )?;
                if touched {
                    continue;
                }
                tx.execute("DELETE FROM repo_blobs WHERE digest = ?1", [d])?;
                tx.execute("DELETE FROM gc_pending WHERE digest = ?1", [d])?;
                tx.execute("DELETE FROM blob_review WHERE digest = ?1", [d])?;
                if tx.execute("DELETE FROM blobs WHERE digest = ?1", [d])? > 0 {
                    dropped.push(d.clone());
                }
            }
            Ok(dropped)
        }))
    }

    fn adopt_objects(&self, objects: Vec<(String, u64)>, t: i64) -> Fut<'_, u64> {
        Box::pin(self.db.write(move |tx| {
            let mut st = tx.prepare_cached(
                "INSERT INTO blobs (digest, size, created_at, last_access) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (digest) DO NOTHING",
            )?;
            let mut n = 0;
            for (d, size) in &objects {
                n += st.execute(params![d, *size as i64, t])? as u64;
            }
            Ok(n)
        }))
    }

    fn upload_records(&self) -> Fut<'_, Vec<UploadRecord>> {
        Box::pin(self.db.read(move |c| {
            let mut st = c.prepare(
                "SELECT u.id, u.size, p.key, p.size FROM uploads u
                 LEFT JOIN upload_parts p ON p.upload_id = u.id ORDER BY u.id, p.offset",
            )?;
            let mut out: Vec<UploadRecord> = Vec::new();
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                ))
            })?;
            for row in rows {
                let (id, size, key, part) = row?;
                if out.last().is_none_or(|u| u.id != id) {
                    out.push(UploadRecord {
                        id,
                        size,
                        parts: Vec::new(),
                    });
                }
                if let (Some(k), Some(p), Some(u)) = (key, part, out.last_mut()) {
                    u.parts.push((k, p as u64));
                }
            }
            Ok(out)
        }))
    }
}
