//! [`ManifestMeta`] on SQLite.

use rusqlite::{OptionalExtension, params};

use super::{SqliteMeta, ensure_repo, link_blob, repo_id};
use crate::error::Error;
use crate::manifest::{Manifest, RefKind};
use crate::meta::{Fut, ManifestMeta, ManifestRow, Page, Referrer, Refs, TagRow};
use crate::names::{Reference, Tag};

/// Protects manifest `digest` of repository `repo` from the untagged and orphan-referrer
/// policies from `t`, when it is queued (an unqueued one is kept by a tag or an index);
/// `false` when it is gone.
fn protect_manifest(
    tx: &rusqlite::Transaction<'_>,
    repo: i64,
    digest: &str,
    t: i64,
) -> rusqlite::Result<bool> {
    let exists = tx
        .query_row(
            "SELECT 1 FROM manifests WHERE repo_id = ?1 AND digest = ?2",
            params![repo, digest],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    if exists {
        tx.execute(
            "UPDATE manifest_review SET queued_at = max(queued_at, ?3)
             WHERE repo_id = ?1 AND digest = ?2",
            params![repo, digest, t],
        )?;
    }
    Ok(exists)
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ManifestRow> {
    Ok(ManifestRow {
        digest: r.get(0)?,
        media_type: r.get(1)?,
        content: r.get(2)?,
        candidate: r.get(3)?,
    })
}

impl ManifestMeta for SqliteMeta {
    fn put_manifest<'a>(
        &'a self,
        repo: &'a str,
        m: &'a Manifest,
        tags: &'a [Tag],
        refs: &'a Refs,
        t: i64,
    ) -> Fut<'a, ()> {
        let name = repo.to_owned();
        let d = m.digest.to_string();
        let (media_type, bytes) = (m.media_type.clone(), m.bytes.clone());
        let subject = m.subject.as_ref().map(ToString::to_string);
        let (artifact_type, annotations) = (m.artifact_type.clone(), m.annotations.clone());
        let references: Vec<(String, RefKind, bool)> = m
            .references
            .iter()
            .map(|r| (r.digest.to_string(), r.kind, r.required))
            .collect();
        let tags: Vec<String> = tags.iter().map(|t| t.as_str().to_owned()).collect();
        let refs = refs.clone();
        Box::pin(self.db.write(move |tx| {
            let rid = ensure_repo(tx, &name)?;
            let lender = match &refs {
                Refs::CheckOrBorrow(l) => repo_id(tx, l)?,
                _ => None,
            };
            let mut missing = Vec::new();
            for (child, kind, required) in &references {
                if !required || refs == Refs::Trust {
                    continue;
                }
                let sql = match kind {
                    RefKind::Blob => "SELECT 1 FROM repo_blobs WHERE repo_id = ?1 AND digest = ?2",
                    RefKind::Manifest => {
                        "SELECT 1 FROM manifests WHERE repo_id = ?1 AND digest = ?2"
                    }
                };
                let has = |id: i64| -> rusqlite::Result<bool> {
                    Ok(tx
                        .query_row(sql, params![id, child], |_| Ok(()))
                        .optional()?
                        .is_some())
                };
                if has(rid)? {
                    continue;
                }
                match lender {
                    Some(l) if *kind == RefKind::Blob && has(l)? => link_blob(tx, rid, child, t)?,
                    _ => missing.push(child.clone()),
                }
            }
            if !missing.is_empty() {
                return Err(Error::ManifestBlobUnknown(missing));
            }
            tx.execute(
                "INSERT INTO manifest_bodies (digest, content, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (digest) DO NOTHING",
                params![d, bytes.as_ref(), t],
            )?;
            let inserted = tx.execute(
                "INSERT INTO manifests (repo_id, digest, media_type, size, subject,
                    artifact_type, annotations, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (repo_id, digest) DO NOTHING",
                params![
                    rid,
                    d,
                    media_type,
                    bytes.len() as i64,
                    subject,
                    artifact_type,
                    annotations,
                    t
                ],
            )?;
            if inserted == 0 {
                // Pushed again (buildx re-pushes platform manifests before their index).
                protect_manifest(tx, rid, &d, t)?;
            } else {
                let mut st = tx.prepare_cached(
                    "INSERT INTO manifest_refs (repo_id, manifest_digest, child_digest, kind)
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                )?;
                for (child, kind, _) in &references {
                    st.execute(params![rid, d, child, kind.as_str()])?;
                }
            }
            let mut st = tx.prepare_cached(
                "INSERT INTO tags (repo_id, name, digest, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (repo_id, name) DO UPDATE SET digest = excluded.digest,
                    updated_at = excluded.updated_at",
            )?;
            for tag in &tags {
                st.execute(params![rid, tag, d, t])?;
            }
            Ok(())
        }))
    }

    fn manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a Reference,
        now: i64,
    ) -> Fut<'a, Option<ManifestRow>> {
        let name = repo.to_owned();
        let reference = reference.clone();
        Box::pin(self.db.read(move |c| {
            Ok(match &reference {
                Reference::Tag(tag) => c
                    .query_row(
                        "SELECT m.digest, m.media_type, b.content, 0 FROM tags t
                         JOIN repos r ON r.id = t.repo_id
                         JOIN manifests m ON m.repo_id = t.repo_id AND m.digest = t.digest
                         JOIN manifest_bodies b ON b.digest = m.digest
                         WHERE r.name = ?1 AND t.name = ?2",
                        params![name, tag.as_str()],
                        row,
                    )
                    .optional()?,
                Reference::Digest(d) => c
                    .query_row(
                        "SELECT m.digest, m.media_type, b.content,
                            CASE WHEN q.queued_at < ?3 THEN NOT (
                                EXISTS (SELECT 1 FROM tags g WHERE g.repo_id = m.repo_id
                                        AND g.digest = m.digest)
                                OR EXISTS (SELECT 1 FROM manifest_refs x
                                        WHERE x.repo_id = m.repo_id AND x.child_digest = m.digest
                                        AND x.kind = 'manifest')) ELSE 0 END
                         FROM manifests m
                         JOIN repos r ON r.id = m.repo_id
                         JOIN manifest_bodies b ON b.digest = m.digest
                         LEFT JOIN manifest_review q ON q.repo_id = m.repo_id
                              AND q.digest = m.digest
                         WHERE r.name = ?1 AND m.digest = ?2",
                        params![name, d.to_string(), now],
                        row,
                    )
                    .optional()?,
            })
        }))
    }

    fn protect_manifest_read(&self, repo: &str, digest: &str, t: i64) -> Fut<'_, bool> {
        let (name, d) = (repo.to_owned(), digest.to_owned());
        Box::pin(self.db.write(move |tx| match repo_id(tx, &name)? {
            Some(rid) => Ok(protect_manifest(tx, rid, &d, t)?),
            None => Ok(false),
        }))
    }

    fn delete_manifest<'a>(&'a self, repo: &'a str, reference: &'a Reference) -> Fut<'a, ()> {
        let name = repo.to_owned();
        let reference = reference.clone();
        Box::pin(self.db.write(move |tx| {
            let rid = repo_id(tx, &name)?.ok_or_else(|| Error::NameUnknown(name.clone()))?;
            let n = match &reference {
                Reference::Tag(t) => tx.execute(
                    "DELETE FROM tags WHERE repo_id = ?1 AND name = ?2",
                    params![rid, t.as_str()],
                )?,
                Reference::Digest(d) => tx.execute(
                    "DELETE FROM manifests WHERE repo_id = ?1 AND digest = ?2",
                    params![rid, d.to_string()],
                )?,
            };
            if n == 0 {
                return Err(Error::ManifestUnknown(reference.to_string()));
            }
            Ok(())
        }))
    }

    fn tags<'a>(&'a self, repo: &'a str, last: Option<&'a str>, n: usize) -> Fut<'a, Page> {
        let (name, last) = (repo.to_owned(), last.unwrap_or("").to_owned());
        Box::pin(self.db.read(move |c| {
            let rid = repo_id(c, &name)?.ok_or_else(|| Error::NameUnknown(name.clone()))?;
            let mut st = c.prepare_cached(
                "SELECT name FROM tags WHERE repo_id = ?1 AND name > ?2 ORDER BY name LIMIT ?3",
            )?;
            let items = st
                .query_map(params![rid, last, (n as i64).saturating_add(1)], |r| {
                    r.get(0)
                })?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(Page::of(items, n))
        }))
    }

    fn repos<'a>(&'a self, needle: &'a str, last: Option<&'a str>, n: usize) -> Fut<'a, Page> {
        let (needle, last) = (needle.to_owned(), last.unwrap_or("").to_owned());
        Box::pin(self.db.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT name FROM repos r WHERE name > ?1 AND instr(name, ?2) > 0
                 AND EXISTS (SELECT 1 FROM manifests m WHERE m.repo_id = r.id)
                 ORDER BY name LIMIT ?3",
            )?;
            let items = st
                .query_map(params![last, needle, (n as i64).saturating_add(1)], |r| {
                    r.get(0)
                })?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(Page::of(items, n))
        }))
    }

    fn tag_rows<'a>(
        &'a self,
        repo: &'a str,
        last: Option<&'a str>,
        n: usize,
    ) -> Fut<'a, Vec<TagRow>> {
        let (name, last) = (repo.to_owned(), last.unwrap_or("").to_owned());
        Box::pin(self.db.read(move |c| {
            let rid = repo_id(c, &name)?.ok_or_else(|| Error::NameUnknown(name.clone()))?;
            let mut st = c.prepare_cached(
                "SELECT t.name, t.digest, m.media_type, b.content, t.updated_at, m.last_pulled
                 FROM tags t
                 JOIN manifests m ON m.repo_id = t.repo_id AND m.digest = t.digest
                 JOIN manifest_bodies b ON b.digest = t.digest
                 WHERE t.repo_id = ?1 AND t.name > ?2 ORDER BY t.name LIMIT ?3",
            )?;
            let rows = st
                .query_map(params![rid, last, n as i64], |r| {
                    Ok(TagRow {
                        tag: r.get(0)?,
                        digest: r.get(1)?,
                        media_type: r.get(2)?,
                        content: r.get(3)?,
                        pushed: r.get(4)?,
                        last_pulled: r.get(5)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        }))
    }

    fn count_tags<'a>(&'a self, repo: &'a str) -> Fut<'a, u64> {
        let name = repo.to_owned();
        Box::pin(self.db.read(move |c| {
            let n: i64 = c
                .prepare_cached(
                    "SELECT count(*) FROM tags t JOIN repos r ON r.id = t.repo_id
                     WHERE r.name = ?1",
                )?
                .query_row(params![name], |r| r.get(0))?;
            Ok(u64::try_from(n).unwrap_or(0))
        }))
    }

    fn referrers<'a>(
        &'a self,
        repo: &'a str,
        subject: &'a str,
        artifact_type: Option<&'a str>,
    ) -> Fut<'a, Vec<Referrer>> {
        let (name, s, at) = (
            repo.to_owned(),
            subject.to_owned(),
            artifact_type.map(str::to_owned),
        );
        Box::pin(self.db.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT m.digest, m.media_type, m.size, m.artifact_type, m.annotations
                 FROM manifests m JOIN repos r ON r.id = m.repo_id
                 WHERE r.name = ?1 AND m.subject = ?2
                   AND (?3 IS NULL OR m.artifact_type = ?3)
                 ORDER BY m.created_at, m.digest",
            )?;
            let rows = st
                .query_map(params![name, s, at], |r| {
                    Ok(Referrer {
                        digest: r.get(0)?,
                        media_type: r.get(1)?,
                        size: r.get::<_, i64>(2)? as u64,
                        artifact_type: r.get(3)?,
                        annotations: r.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        }))
    }

    fn route_facts(&self, repo: &str, twin: &str) -> Fut<'_, (bool, bool)> {
        let (name, twin) = (repo.to_owned(), twin.to_owned());
        Box::pin(self.db.read(move |c| {
            Ok(c.prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM repos WHERE name = ?1),
                        EXISTS (SELECT 1 FROM manifests m JOIN repos r ON r.id = m.repo_id
                                WHERE r.name = ?2)",
            )?
            .query_row(params![name, twin], |r| Ok((r.get(0)?, r.get(1)?)))?)
        }))
    }

    fn record_pulls(&self, pulls: Vec<(String, String, i64)>) -> Fut<'_, usize> {
        Box::pin(self.db.write(move |tx| {
            let mut n = 0;
            let mut m = tx.prepare_cached(
                "UPDATE manifests SET last_pulled = max(coalesce(last_pulled, 0), ?3)
                 WHERE digest = ?2 AND repo_id = (SELECT id FROM repos WHERE name = ?1)",
            )?;
            for (repo, digest, t) in &pulls {
                n += m.execute(params![repo, digest, t])?;
            }
            Ok(n)
        }))
    }
}
