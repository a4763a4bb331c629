//! [`GcMeta`] on PostgreSQL: mark in batches of candidates, each locked before it is judged;
//! sweep batches under per-digest advisory locks; the run record; eviction.

use std::collections::BTreeSet;
use std::sync::Arc;

use deadpool_postgres::Transaction;

use super::{PgMeta, db};
use crate::error::{Error, Result};
use crate::meta::policy::{EvictPolicy, EvictReport, GcPolicy, GcReport, GcRun, RUNS_KEPT};
use crate::meta::{DeleteObjects, Fut, GcMeta, Swept};
use crate::names::Digest;

/// Candidates judged per transaction of a (real) mark.
const MARK_BATCH: i64 = 500;

fn secs(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn add(r: &mut GcReport, o: &GcReport) {
    r.blobs += o.blobs;
    r.blob_bytes += o.blob_bytes;
    r.manifests += o.manifests;
    r.manifest_bodies += o.manifest_bodies;
    r.manifest_body_bytes += o.manifest_body_bytes;
}

/// Where a phase of mark stopped.
#[derive(Clone, Debug, Default)]
struct Cursor {
    repo: i64,
    digest: String,
}

/// Judges up to `limit` manifest candidates after `after`; where it stopped, or `None` when
/// the queue is done.
async fn mark_manifests(
    tx: &Transaction<'_>,
    p: &GcPolicy,
    t: i64,
    after: &Cursor,
    limit: i64,
    r: &mut GcReport,
) -> Result<Option<Cursor>> {
    let grace_cutoff = t - secs(p.grace);
    let untagged_cutoff = p.untagged_after.map(|a| t - secs(a));
    let candidates: Vec<(i64, String)> = tx
        .query(
            "SELECT repo_id, digest FROM manifest_review WHERE (repo_id, digest) > ($1, $2)
             ORDER BY repo_id, digest LIMIT $3",
            &[&after.repo, &after.digest, &limit],
        )
        .await
        .map_err(db)?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    for (repo, digest) in &candidates {
        // The manifest's row first: a push or a read protecting it waits, or went first.
        let subject: Option<Option<String>> = tx
            .query_opt(
                "SELECT subject FROM manifests WHERE repo_id = $1 AND digest = $2 FOR UPDATE",
                &[repo, digest],
            )
            .await
            .map_err(db)?
            .map(|row| row.get(0));
        let queued: Option<i64> = tx
            .query_opt(
                "SELECT queued_at FROM manifest_review WHERE repo_id = $1 AND digest = $2",
                &[repo, digest],
            )
            .await
            .map_err(db)?
            .map(|row| row.get(0));
        let Some(queued) = queued else { continue };
        let forget = || async {
            tx.execute(
                "DELETE FROM manifest_review WHERE repo_id = $1 AND digest = $2 AND queued_at = $3",
                &[repo, digest, &queued],
            )
            .await
            .map_err(db)
        };
        let Some(subject) = subject else {
            forget().await?;
            continue;
        };
        let kept: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM tags WHERE repo_id = $1 AND digest = $2)
                     OR EXISTS (SELECT 1 FROM manifest_refs WHERE repo_id = $1
                                AND child_digest = $2 AND kind = 'manifest')",
                &[repo, digest],
            )
            .await
            .map_err(db)?
            .get(0);
        if kept {
            forget().await?;
            continue;
        }
        let delete = match subject {
            Some(s) => {
                let subject_exists: bool = tx
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM manifests WHERE repo_id = $1 AND digest = $2)",
                        &[repo, &s],
                    )
                    .await
                    .map_err(db)?
                    .get(0);
                if subject_exists {
                    forget().await?;
                    continue;
                }
                p.orphan_referrers && queued < grace_cutoff
            }
            None => untagged_cutoff.is_some_and(|c| queued < c),
        };
        if delete {
            tx.execute(
                "DELETE FROM manifests WHERE repo_id = $1 AND digest = $2",
                &[repo, digest],
            )
            .await
            .map_err(db)?;
            forget().await?;
            r.manifests += 1;
        }
    }
    Ok((candidates.len() as i64 == limit).then(|| {
        let (repo, digest) = candidates.last().cloned().unwrap_or_default();
        Cursor { repo, digest }
    }))
}

/// Manifest bodies no repository uses; database only, so no grace. One batch is judged with a
/// handful of statements, whatever its size.
async fn mark_bodies(
    tx: &Transaction<'_>,
    after: &str,
    limit: i64,
    r: &mut GcReport,
) -> Result<Option<String>> {
    let bodies: Vec<String> = tx
        .query(
            "SELECT digest FROM body_review WHERE digest > $1 ORDER BY digest LIMIT $2",
            &[&after, &limit],
        )
        .await
        .map_err(db)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if bodies.is_empty() {
        return Ok(None);
    }
    // The bodies' rows first, in one order: a push storing one of them waits, or went first.
    let locked: Vec<(String, i32)> = tx
        .query(
            "SELECT digest, length(content) FROM manifest_bodies WHERE digest = ANY($1)
             ORDER BY digest FOR UPDATE",
            &[&bodies],
        )
        .await
        .map_err(db)?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let used: BTreeSet<String> = tx
        .query(
            "SELECT DISTINCT digest FROM manifests WHERE digest = ANY($1)",
            &[&bodies],
        )
        .await
        .map_err(db)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let unused: Vec<&str> = locked
        .iter()
        .filter(|(d, _)| !used.contains(d))
        .map(|(d, bytes)| {
            r.manifest_bodies += 1;
            r.manifest_body_bytes += u64::try_from(*bytes).unwrap_or(0);
            d.as_str()
        })
        .collect();
    if !unused.is_empty() {
        tx.execute(
            "DELETE FROM manifest_bodies WHERE digest = ANY($1)",
            &[&unused],
        )
        .await
        .map_err(db)?;
    }
    tx.execute("DELETE FROM body_review WHERE digest = ANY($1)", &[&bodies])
        .await
        .map_err(db)?;
    Ok((bodies.len() as i64 == limit).then(|| bodies.last().cloned().unwrap_or_default()))
}

/// Blobs: unreferenced, and not queued, linked or acknowledged within the grace period. One
/// batch is judged with a handful of statements, whatever its size (a statement per blob made
/// a collection of 100,000 candidates take minutes).
async fn mark_blobs(
    tx: &Transaction<'_>,
    p: &GcPolicy,
    t: i64,
    run: &str,
    after: &str,
    limit: i64,
    r: &mut GcReport,
) -> Result<Option<String>> {
    let cutoff = t - secs(p.grace);
    let blobs: Vec<String> = tx
        .query(
            "SELECT digest FROM blob_review WHERE queued_at < $1 AND digest > $2
             ORDER BY digest LIMIT $3",
            &[&cutoff, &after, &limit],
        )
        .await
        .map_err(db)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if blobs.is_empty() {
        return Ok(None);
    }
    // The blobs' rows first, in one order: pushes naming them, mounts, protecting reads and
    // commits take them shared, so they either finished (and are seen below) or wait for this
    // decision.
    let info: std::collections::HashMap<String, (i64, i64)> = tx
        .query(
            "SELECT b.digest, b.size, GREATEST(b.created_at, b.last_access)
             FROM unnest($1::text[]) AS c(digest) JOIN blobs b ON b.digest = c.digest
             ORDER BY b.digest FOR UPDATE OF b",
            &[&blobs],
        )
        .await
        .map_err(db)?
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect();
    let facts = tx
        .query(
            // Driven by the batch (index lookups per digest), so a plan made while the queue's
            // statistics are stale (it just grew by 100,000) cannot turn into a scan per batch.
            "SELECT q.digest, q.queued_at,
                    EXISTS (SELECT 1 FROM manifest_refs m
                            WHERE m.child_digest = q.digest AND m.kind = 'blob'),
                    coalesce((SELECT max(l.created_at) FROM repo_blobs l
                              WHERE l.digest = q.digest), 0)
             FROM unnest($1::text[]) AS c(digest) JOIN blob_review q ON q.digest = c.digest",
            &[&blobs],
        )
        .await
        .map_err(db)?;
    // Forgotten: judged for what queued them (a later queueing keeps them in review).
    let (mut forget, mut forget_at) = (Vec::new(), Vec::new());
    let (mut doomed, mut sizes) = (Vec::new(), Vec::new());
    for row in &facts {
        let (d, queued, referenced, linked): (String, i64, bool, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        match info.get(&d) {
            None => {}
            Some(_) if referenced => {}
            Some((_, used)) if (*used).max(linked).max(queued) >= cutoff => {
                continue; // recently used: look again next time
            }
            Some((size, _)) => {
                doomed.push(d.clone());
                sizes.push(*size);
                r.blobs += 1;
                r.blob_bytes += u64::try_from(*size).unwrap_or(0);
            }
        }
        forget.push(d);
        forget_at.push(queued);
    }
    if !doomed.is_empty() {
        tx.execute("DELETE FROM repo_blobs WHERE digest = ANY($1)", &[&doomed])
            .await
            .map_err(db)?;
        tx.execute("DELETE FROM blobs WHERE digest = ANY($1)", &[&doomed])
            .await
            .map_err(db)?;
        tx.execute(
            "INSERT INTO gc_pending (digest, size, marked_at, run)
             SELECT d, s, $3, $4 FROM unnest($1::text[], $2::bigint[]) AS x(d, s)
             ON CONFLICT (digest) DO NOTHING",
            &[&doomed, &sizes, &t, &run],
        )
        .await
        .map_err(db)?;
    }
    tx.execute(
        "DELETE FROM blob_review q USING unnest($1::text[], $2::bigint[]) AS f(d, at)
         WHERE q.digest = f.d AND q.queued_at = f.at",
        &[&forget, &forget_at],
    )
    .await
    .map_err(db)?;
    Ok((blobs.len() as i64 == limit).then(|| blobs.last().cloned().unwrap_or_default()))
}

impl PgMeta {
    /// One batch of a phase in its own transaction; the report and where it stopped.
    async fn mark_all(&self, p: &GcPolicy, t: i64, run: &str) -> Result<GcReport> {
        let mut report = GcReport::default();
        let mut after = Some(Cursor::default());
        while let Some(a) = after {
            let (r, next) = self
                .tx(false, |tx| {
                    let (p, a) = (p.clone(), a.clone());
                    Box::pin(async move {
                        let mut r = GcReport::default();
                        let next = mark_manifests(tx, &p, t, &a, MARK_BATCH, &mut r).await?;
                        Ok((r, next))
                    })
                })
                .await?;
            add(&mut report, &r);
            after = next;
        }
        let mut after = Some(String::new());
        while let Some(a) = after {
            let (r, next) = self
                .tx(false, |tx| {
                    let a = a.clone();
                    Box::pin(async move {
                        let mut r = GcReport::default();
                        let next = mark_bodies(tx, &a, MARK_BATCH, &mut r).await?;
                        Ok((r, next))
                    })
                })
                .await?;
            add(&mut report, &r);
            after = next;
        }
        let mut after = Some(String::new());
        while let Some(a) = after {
            let (r, next) = self
                .tx(false, |tx| {
                    let (p, a, run) = (p.clone(), a.clone(), run.to_owned());
                    Box::pin(async move {
                        let mut r = GcReport::default();
                        let next = mark_blobs(tx, &p, t, &run, &a, MARK_BATCH, &mut r).await?;
                        Ok((r, next))
                    })
                })
                .await?;
            add(&mut report, &r);
            after = next;
        }
        Ok(report)
    }
}

impl GcMeta for PgMeta {
    fn mark<'a>(
        &'a self,
        policy: &'a GcPolicy,
        t: i64,
        run: &'a str,
        dry_run: bool,
    ) -> Fut<'a, GcReport> {
        if !dry_run {
            return Box::pin(self.mark_all(policy, t, run));
        }
        // A dry run judges everything in one transaction and rolls it back, so its figures
        // are exactly what a run would do now.
        Box::pin(self.tx(true, move |tx| {
            let (p, run) = (policy.clone(), run.to_owned());
            Box::pin(async move {
                let mut r = GcReport::default();
                let mut c = Some(Cursor::default());
                while let Some(a) = c {
                    c = mark_manifests(tx, &p, t, &a, i64::MAX, &mut r).await?;
                }
                let mut b = Some(String::new());
                while let Some(a) = b {
                    b = mark_bodies(tx, &a, i64::MAX, &mut r).await?;
                }
                let mut b = Some(String::new());
                while let Some(a) = b {
                    b = mark_blobs(tx, &p, t, &run, &a, i64::MAX, &mut r).await?;
                }
                Ok(r)
            })
        }))
    }

    fn pending_garbage(&self) -> Fut<'_, (u64, u64)> {
        Box::pin(async move {
            let c = self.client().await?;
            let r = c
                .query_one(
                    "SELECT count(*), coalesce(sum(size), 0)::BIGINT FROM gc_pending p
                     WHERE NOT EXISTS (SELECT 1 FROM blobs b WHERE b.digest = p.digest)",
                    &[],
                )
                .await
                .map_err(db)?;
            Ok((r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64))
        })
    }

    fn sweep_batch<'a>(
        &'a self,
        run: &'a str,
        limit: usize,
        delete: Arc<DeleteObjects>,
    ) -> Fut<'a, (Swept, bool)> {
        Box::pin(self.tx(false, move |tx| {
            let (run, delete) = (run.to_owned(), delete.clone());
            Box::pin(async move {
                let rows: Vec<(String, i64, String)> = tx
                    .query(
                        "SELECT digest, size, run FROM gc_pending ORDER BY digest LIMIT $1
                         FOR UPDATE",
                        &[&(limit as i64)],
                    )
                    .await
                    .map_err(db)?
                    .iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2)))
                    .collect();
                let digests: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
                // Exclusive per digest: no commit of these digests lands while their objects
                // go (see the module docs).
                tx.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(d, 0))
                     FROM unnest($1::text[]) AS d ORDER BY d",
                    &[&digests],
                )
                .await
                .map_err(db)?;
                let revived: BTreeSet<String> = tx
                    .query(
                        "SELECT digest FROM blobs WHERE digest = ANY($1)",
                        &[&digests],
                    )
                    .await
                    .map_err(db)?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let mut batch = Swept::default();
                let mut doomed = Vec::new();
                for (d, size, marked_by) in &rows {
                    if revived.contains(d) {
                        continue; // pushed again since it was marked: keep the bytes
                    }
                    let Ok(parsed) = d.parse::<Digest>() else {
                        continue;
                    };
                    doomed.push(parsed);
                    batch.blobs += 1;
                    batch.bytes += u64::try_from(*size).unwrap_or(0);
                    if *marked_by != run {
                        batch.resumed += 1;
                    }
                }
                batch.objects = delete(doomed).await?;
                tx.execute("DELETE FROM gc_pending WHERE digest = ANY($1)", &[&digests])
                    .await
                    .map_err(db)?;
                Ok((batch, rows.len() == limit))
            })
        }))
    }

    fn record_gc_run<'a>(&'a self, run: &'a GcRun) -> Fut<'a, ()> {
        Box::pin(async move {
            let report = serde_json::to_string(&run.report)
                .map_err(|e| Error::Internal(format!("gc report: {e}")))?;
            let c = self.client().await?;
            c.execute(
                "INSERT INTO gc_runs (started_at, finished_at, duration_ms, holder, report)
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &run.started_at,
                    &run.finished_at,
                    &i64::try_from(run.duration.as_millis()).unwrap_or(i64::MAX),
                    &run.holder,
                    &report,
                ],
            )
            .await
            .map_err(db)?;
            c.execute(
                "DELETE FROM gc_runs WHERE id <= (SELECT max(id) FROM gc_runs) - $1",
                &[&RUNS_KEPT],
            )
            .await
            .map_err(db)?;
            Ok(())
        })
    }

    fn last_gc_run(&self) -> Fut<'_, Option<GcRun>> {
        Box::pin(async move {
            let c = self.client().await?;
            let row = c
                .query_opt(
                    "SELECT started_at, finished_at, duration_ms, holder, report
                     FROM gc_runs ORDER BY id DESC LIMIT 1",
                    &[],
                )
                .await
                .map_err(db)?;
            Ok(row.map(|r| GcRun {
                started_at: r.get(0),
                finished_at: r.get(1),
                duration: std::time::Duration::from_millis(
                    u64::try_from(r.get::<_, i64>(2)).unwrap_or(0),
                ),
                holder: r.get(3),
                report: serde_json::from_str(r.get::<_, &str>(4)).unwrap_or_default(),
            }))
        })
    }

    fn referenced_blobs(&self) -> Fut<'_, BTreeSet<String>> {
        Box::pin(async move {
            let c = self.client().await?;
            Ok(c.query(
                "SELECT DISTINCT child_digest FROM manifest_refs WHERE kind = 'blob'",
                &[],
            )
            .await
            .map_err(db)?
            .iter()
            .map(|r| r.get(0))
            .collect())
        })
    }

    fn evict<'a>(&'a self, policy: &'a EvictPolicy, now: i64) -> Fut<'a, EvictReport> {
        Box::pin(self.tx(false, move |tx| {
            let p = policy.clone();
            Box::pin(async move { evict(tx, &p, now).await })
        }))
    }
}

/// Bytes of blobs the manifests of `repos` reference.
async fn usage(tx: &Transaction<'_>, repos: &[i64]) -> Result<u64> {
    let n: i64 = tx
        .query_one(
            "SELECT coalesce(sum(b.size), 0)::BIGINT FROM blobs b WHERE b.digest IN
                (SELECT r.child_digest FROM manifest_refs r WHERE r.repo_id = ANY($1)
                 AND r.kind = 'blob')",
            &[&repos],
        )
        .await
        .map_err(db)?
        .get(0);
    Ok(n as u64)
}

/// Removes one manifest, the children only it kept, and its referrers.
async fn remove_image(tx: &Transaction<'_>, repo: i64, digest: &str) -> Result<u64> {
    let mut removed = 0;
    let mut pending = vec![digest.to_owned()];
    while let Some(d) = pending.pop() {
        let children: Vec<String> = tx
            .query(
                "SELECT child_digest FROM manifest_refs
                 WHERE repo_id = $1 AND manifest_digest = $2 AND kind = 'manifest'",
                &[&repo, &d],
            )
            .await
            .map_err(db)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let referrers: Vec<String> = tx
            .query(
                "SELECT digest FROM manifests WHERE repo_id = $1 AND subject = $2",
                &[&repo, &d],
            )
            .await
            .map_err(db)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        removed += tx
            .execute(
                "DELETE FROM manifests WHERE repo_id = $1 AND digest = $2",
                &[&repo, &d],
            )
            .await
            .map_err(db)?;
        pending.extend(referrers);
        for c in children {
            let kept: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM tags WHERE repo_id = $1 AND digest = $2)
                         OR EXISTS (SELECT 1 FROM manifest_refs WHERE repo_id = $1
                                    AND child_digest = $2 AND kind = 'manifest')",
                    &[&repo, &c],
                )
                .await
                .map_err(db)?
                .get(0);
            if !kept {
                pending.push(c);
            }
        }
    }
    Ok(removed)
}

async fn evict(tx: &Transaction<'_>, p: &EvictPolicy, now: i64) -> Result<EvictReport> {
    let mut repos: Vec<i64> = Vec::new();
    for prefix in &p.prefixes {
        repos.extend(
            tx.query(
                "SELECT id FROM repos WHERE starts_with(name, $1 || '/')",
                &[prefix],
            )
            .await
            .map_err(db)?
            .iter()
            .map(|r| r.get::<_, i64>(0)),
        );
    }
    let mut r = EvictReport {
        bytes_before: usage(tx, &repos).await?,
        ..EvictReport::default()
    };
    let mut current = r.bytes_before;
    let age_cutoff = p.max_age.map(|a| now - a.as_secs() as i64);
    // Images: manifests no index lists and that refer to nothing.
    let roots: Vec<(i64, String, i64)> = tx
        .query(
            "SELECT m.repo_id, m.digest, coalesce(m.last_pulled, m.created_at) AS used
             FROM manifests m
             WHERE m.repo_id = ANY($1) AND m.subject IS NULL
               AND NOT EXISTS (SELECT 1 FROM manifest_refs r WHERE r.repo_id = m.repo_id
                               AND r.child_digest = m.digest AND r.kind = 'manifest')
             ORDER BY used",
            &[&repos],
        )
        .await
        .map_err(db)?
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    for (repo, digest, used) in roots {
        let too_old = age_cutoff.is_some_and(|c| used < c);
        let too_big = p.max_bytes.is_some_and(|m| current > m);
        if !too_old && !too_big {
            break;
        }
        r.manifests += remove_image(tx, repo, &digest).await?;
        current = usage(tx, &repos).await?;
    }
    r.bytes_after = current;
    Ok(r)
}
