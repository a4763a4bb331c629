//! [`ManifestMeta`] on PostgreSQL.

use std::collections::HashSet;

use super::{PgMeta, db, ensure_repo, link_blob, repo_id};
use crate::error::Error;
use crate::manifest::{Manifest, RefKind};
use crate::meta::{Fut, ManifestMeta, ManifestRow, Page, Referrer, Refs, TagRow};
use crate::names::{Reference, Tag};

/// Protects manifest `digest` of repository `repo` from the untagged and orphan-referrer
/// policies from `t` (locking its row, so a collection marking it waits); `false` when gone.
async fn protect_manifest(
    tx: &deadpool_postgres::Transaction<'_>,
    repo: i64,
    digest: &str,
    t: i64,
) -> crate::error::Result<bool> {
    let exists = tx
        .query_opt(
            "SELECT 1 FROM manifests WHERE repo_id = $1 AND digest = $2 FOR SHARE",
            &[&repo, &digest],
        )
        .await
        .map_err(db)?
        .is_some();
    if exists {
        tx.execute(
            "UPDATE manifest_review SET queued_at = GREATEST(queued_at, $3)
             WHERE repo_id = $1 AND digest = $2",
            &[&repo, &digest, &t],
        )
        .await
        .map_err(db)?;
    }
    Ok(exists)
}

fn manifest_row(r: &tokio_postgres::Row) -> ManifestRow {
    ManifestRow {
        digest: r.get(0),
        media_type: r.get(1),
        content: r.get(2),
        candidate: r.get(3),
    }
}

/// Of `digests`, those repository `repo` links, their blob rows locked (shared, in digest
/// order).
async fn linked_blobs(
    tx: &deadpool_postgres::Transaction<'_>,
    repo: i64,
    digests: &[String],
) -> crate::error::Result<HashSet<String>> {
    Ok(tx
        .query(
            "SELECT rb.digest FROM repo_blobs rb JOIN blobs b ON b.digest = rb.digest
             WHERE rb.repo_id = $1 AND rb.digest = ANY($2)
             ORDER BY rb.digest FOR SHARE OF b",
            &[&repo, &digests],
        )
        .await
        .map_err(db)?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

impl ManifestMeta for PgMeta {
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
        Box::pin(self.tx(false, move |tx| {
            let (name, d, media_type, bytes) =
                (name.clone(), d.clone(), media_type.clone(), bytes.clone());
            let (subject, artifact_type, annotations) =
                (subject.clone(), artifact_type.clone(), annotations.clone());
            let (references, tags, refs) = (references.clone(), tags.clone(), refs.clone());
            Box::pin(async move {
                let rid = ensure_repo(tx, &name, t).await?;
                if refs != Refs::Trust {
                    let wanted = |kind: RefKind| -> Vec<String> {
                        let mut v: Vec<String> = references
                            .iter()
                            .filter(|(_, k, required)| *k == kind && *required)
                            .map(|(c, ..)| c.clone())
                            .collect();
                        v.sort();
                        v.dedup();
                        v
                    };
                    let blobs = wanted(RefKind::Blob);
                    let children = wanted(RefKind::Manifest);
                    let have = linked_blobs(tx, rid, &blobs).await?;
                    let mut missing: Vec<String> =
                        blobs.iter().filter(|b| !have.contains(*b)).cloned().collect();
                    if let (Refs::CheckOrBorrow(lender), false) = (&refs, missing.is_empty())
                        && let Some(l) = repo_id(tx, lender).await?
                    {
                        let lent = linked_blobs(tx, l, &missing).await?;
                        for b in &lent {
                            link_blob(tx, rid, b, t).await?;
                        }
                        missing.retain(|b| !lent.contains(b));
                    }
                    let present: HashSet<String> = tx
                        .query(
                            "SELECT digest FROM manifests WHERE repo_id = $1 AND digest = ANY($2)
                             ORDER BY digest FOR SHARE",
                            &[&rid, &children],
                        )
                        .await
                        .map_err(db)?
                        .iter()
                        .map(|r| r.get(0))
                        .collect();
                    missing.extend(children.into_iter().filter(|c| !present.contains(c)));
                    if !missing.is_empty() {
                        return Err(Error::ManifestBlobUnknown(missing));
                    }
                }
                // Locks an existing body (a collection checking it waits, then sees this
                // manifest), or inserts it.
                tx.execute(
                    "INSERT INTO manifest_bodies (digest, content, created_at) VALUES ($1, $2, $3)
                     ON CONFLICT (digest) DO UPDATE SET created_at = manifest_bodies.created_at",
                    &[&d, &bytes.as_ref(), &t],
                )
                .await
                .map_err(db)?;
                let inserted = tx
                    .execute(
                        "INSERT INTO manifests (repo_id, digest, media_type, size, subject,
                            artifact_type, annotations, created_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                         ON CONFLICT (repo_id, digest) DO NOTHING",
                        &[
                            &rid,
                            &d,
                            &media_type,
                            &(bytes.len() as i64),
                            &subject,
                            &artifact_type,
                            &annotations,
                            &t,
                        ],
                    )
                    .await
                    .map_err(db)?;
                if inserted == 0 {
                    // Pushed again (buildx re-pushes platform manifests before their index).
                    protect_manifest(tx, rid, &d, t).await?;
                } else {
                    let children: Vec<String> = references.iter().map(|(c, ..)| c.clone()).collect();
                    let kinds: Vec<&str> = references.iter().map(|(_, k, _)| k.as_str()).collect();
                    tx.execute(
                        "INSERT INTO manifest_refs (repo_id, manifest_digest, child_digest, kind)
                         SELECT $1, $2, c, k FROM unnest($3::text[], $4::text[]) AS x(c, k)
                         ON CONFLICT DO NOTHING",
                        &[&rid, &d, &children, &kinds],
                    )
                    .await
                    .map_err(db)?;
                }
                for tag in &tags {
                    tx.execute(
                        "INSERT INTO tags (repo_id, name, digest, updated_at) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (repo_id, name) DO UPDATE SET digest = excluded.digest,
                            updated_at = excluded.updated_at",
                        &[&rid, tag, &d, &t],
                    )
                    .await
                    .map_err(db)?;
                }
                Ok(())
            })
        }))
    }

    fn manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a Reference,
        now: i64,
    ) -> Fut<'a, Option<ManifestRow>> {
        Box::pin(async move {
            let c = self.client().await?;
            let row = match reference {
                Reference::Tag(tag) => {
                    let st = c
                        .prepare_cached(
                            "SELECT m.digest, m.media_type, b.content, false FROM tags t
                             JOIN repos r ON r.id = t.repo_id
                             JOIN manifests m ON m.repo_id = t.repo_id AND m.digest = t.digest
                             JOIN manifest_bodies b ON b.digest = m.digest
                             WHERE r.name = $1 AND t.name = $2",
                        )
                        .await
                        .map_err(db)?;
                    c.query_opt(&st, &[&repo, &tag.as_str()])
                        .await
                        .map_err(db)?
                }
                Reference::Digest(d) => {
                    let st = c
                        .prepare_cached(
                            "SELECT m.digest, m.media_type, b.content,
                                CASE WHEN q.queued_at < $3 THEN NOT (
                                    EXISTS (SELECT 1 FROM tags g WHERE g.repo_id = m.repo_id
                                            AND g.digest = m.digest)
                                    OR EXISTS (SELECT 1 FROM manifest_refs x
                                            WHERE x.repo_id = m.repo_id
                                            AND x.child_digest = m.digest
                                            AND x.kind = 'manifest')) ELSE false END
                             FROM manifests m
                             JOIN repos r ON r.id = m.repo_id
                             JOIN manifest_bodies b ON b.digest = m.digest
                             LEFT JOIN manifest_review q ON q.repo_id = m.repo_id
                                  AND q.digest = m.digest
                             WHERE r.name = $1 AND m.digest = $2",
                        )
                        .await
                        .map_err(db)?;
                    c.query_opt(&st, &[&repo, &d.to_string(), &now])
                        .await
                        .map_err(db)?
                }
            };
            Ok(row.as_ref().map(manifest_row))
        })
    }

    fn protect_manifest_read(&self, repo: &str, digest: &str, t: i64) -> Fut<'_, bool> {
        let (name, d) = (repo.to_owned(), digest.to_owned());
        Box::pin(self.tx(false, move |tx| {
            let (name, d) = (name.clone(), d.clone());
            Box::pin(async move {
                match repo_id(tx, &name).await? {
                    Some(rid) => protect_manifest(tx, rid, &d, t).await,
                    None => Ok(false),
                }
            })
        }))
    }

    fn delete_manifest<'a>(&'a self, repo: &'a str, reference: &'a Reference) -> Fut<'a, ()> {
        let name = repo.to_owned();
        let reference = reference.clone();
        Box::pin(self.tx(false, move |tx| {
            let (name, reference) = (name.clone(), reference.clone());
            Box::pin(async move {
                let rid = repo_id(tx, &name)
                    .await?
                    .ok_or_else(|| Error::NameUnknown(name.clone()))?;
                let n = match &reference {
                    Reference::Tag(t) => tx
                        .execute(
                            "DELETE FROM tags WHERE repo_id = $1 AND name = $2",
                            &[&rid, &t.as_str()],
                        )
                        .await
                        .map_err(db)?,
                    Reference::Digest(d) => tx
                        .execute(
                            "DELETE FROM manifests WHERE repo_id = $1 AND digest = $2",
                            &[&rid, &d.to_string()],
                        )
                        .await
                        .map_err(db)?,
                };
                if n == 0 {
                    return Err(Error::ManifestUnknown(reference.to_string()));
                }
                Ok(())
            })
        }))
    }

    fn tags<'a>(&'a self, repo: &'a str, last: Option<&'a str>, n: usize) -> Fut<'a, Page> {
        Box::pin(async move {
            let c = self.client().await?;
            let rid = repo_id(&c, repo)
                .await?
                .ok_or_else(|| Error::NameUnknown(repo.to_owned()))?;
            let st = c
                .prepare_cached(
                    "SELECT name FROM tags WHERE repo_id = $1 AND name > $2
                     ORDER BY name LIMIT $3",
                )
                .await
                .map_err(db)?;
            let items = c
                .query(
                    &st,
                    &[&rid, &last.unwrap_or(""), &(n as i64).saturating_add(1)],
                )
                .await
                .map_err(db)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            Ok(Page::of(items, n))
        })
    }

    fn repos<'a>(&'a self, needle: &'a str, last: Option<&'a str>, n: usize) -> Fut<'a, Page> {
        Box::pin(async move {
            let c = self.client().await?;
            let st = c
                .prepare_cached(
                    "SELECT name FROM repos r WHERE name > $1 AND strpos(name, $2) > 0
                     AND EXISTS (SELECT 1 FROM manifests m WHERE m.repo_id = r.id)
                     ORDER BY name LIMIT $3",
                )
                .await
                .map_err(db)?;
            let items = c
                .query(
                    &st,
                    &[&last.unwrap_or(""), &needle, &(n as i64).saturating_add(1)],
                )
                .await
                .map_err(db)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            Ok(Page::of(items, n))
        })
    }

    fn tag_rows<'a>(
        &'a self,
        repo: &'a str,
        last: Option<&'a str>,
        n: usize,
    ) -> Fut<'a, Vec<TagRow>> {
        Box::pin(async move {
            let c = self.client().await?;
            let rid = repo_id(&c, repo)
                .await?
                .ok_or_else(|| Error::NameUnknown(repo.to_owned()))?;
            let st = c
                .prepare_cached(
                    "SELECT t.name, t.digest, m.media_type, b.content, t.updated_at, m.last_pulled
                     FROM tags t
                     JOIN manifests m ON m.repo_id = t.repo_id AND m.digest = t.digest
                     JOIN manifest_bodies b ON b.digest = t.digest
                     WHERE t.repo_id = $1 AND t.name > $2 ORDER BY t.name LIMIT $3",
                )
                .await
                .map_err(db)?;
            Ok(c.query(&st, &[&rid, &last.unwrap_or(""), &(n as i64)])
                .await
                .map_err(db)?
                .iter()
                .map(|r| TagRow {
                    tag: r.get(0),
                    digest: r.get(1),
                    media_type: r.get(2),
                    content: r.get(3),
                    pushed: r.get(4),
                    last_pulled: r.get(5),
                })
                .collect())
        })
    }

    fn count_tags<'a>(&'a self, repo: &'a str) -> Fut<'a, u64> {
        Box::pin(async move {
            let c = self.client().await?;
            let row = c
                .query_one(
                    "SELECT count(*) FROM tags t JOIN repos r ON r.id = t.repo_id
                     WHERE r.name = $1",
                    &[&repo],
                )
                .await
                .map_err(db)?;
            Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
        })
    }

    fn referrers<'a>(
        &'a self,
        repo: &'a str,
        subject: &'a str,
        artifact_type: Option<&'a str>,
    ) -> Fut<'a, Vec<Referrer>> {
        Box::pin(async move {
            let c = self.client().await?;
            Ok(c.query(
                "SELECT m.digest, m.media_type, m.size, m.artifact_type, m.annotations
                 FROM manifests m JOIN repos r ON r.id = m.repo_id
                 WHERE r.name = $1 AND m.subject = $2
                   AND ($3::text IS NULL OR m.artifact_type = $3)
                 ORDER BY m.created_at, m.digest",
                &[&repo, &subject, &artifact_type],
            )
            .await
            .map_err(db)?
            .iter()
            .map(|r| Referrer {
                digest: r.get(0),
                media_type: r.get(1),
                size: r.get::<_, i64>(2) as u64,
                artifact_type: r.get(3),
                annotations: r.get(4),
            })
            .collect())
        })
    }

    fn route_facts(&self, repo: &str, twin: &str) -> Fut<'_, (bool, bool)> {
        let (name, twin) = (repo.to_owned(), twin.to_owned());
        Box::pin(async move {
            let c = self.client().await?;
            let st = c
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM repos WHERE name = $1),
                            EXISTS (SELECT 1 FROM manifests m JOIN repos r ON r.id = m.repo_id
                                    WHERE r.name = $2)",
                )
                .await
                .map_err(db)?;
            let r = c.query_one(&st, &[&name, &twin]).await.map_err(db)?;
            Ok((r.get(0), r.get(1)))
        })
    }

    fn record_pulls(&self, pulls: Vec<(String, String, i64)>) -> Fut<'_, usize> {
        Box::pin(async move {
            let c = self.client().await?;
            let repos: Vec<&str> = pulls.iter().map(|p| p.0.as_str()).collect();
            let digests: Vec<&str> = pulls.iter().map(|p| p.1.as_str()).collect();
            let times: Vec<i64> = pulls.iter().map(|p| p.2).collect();
            let n = c
                .execute(
                    "UPDATE manifests m SET last_pulled = GREATEST(coalesce(m.last_pulled, 0), v.t)
                     FROM unnest($1::text[], $2::text[], $3::bigint[]) AS v(repo, digest, t)
                     JOIN repos r ON r.name = v.repo
                     WHERE m.repo_id = r.id AND m.digest = v.digest",
                    &[&repos, &digests, &times],
                )
                .await
                .map_err(db)?;
            Ok(n as usize)
        })
    }
}
