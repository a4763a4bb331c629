//! [`GcMeta`] on SQLite: mark in one write transaction, sweep batches under the write lock
//! (SQLite's one writer serialises them with every blob commit), the run record, eviction.

use std::collections::BTreeSet;
use std::sync::Arc;

use rusqlite::{OptionalExtension, Transaction, params};

use super::SqliteMeta;
use crate::error::{Error, Result};
use crate::meta::policy::{EvictPolicy, EvictReport, GcPolicy, GcReport, GcRun, RUNS_KEPT};
use crate::meta::{DeleteObjects, Fut, GcMeta, Swept};
use crate::names::Digest;

fn secs(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

impl GcMeta for SqliteMeta {
    fn mark<'a>(
        &'a self,
        policy: &'a GcPolicy,
        t: i64,
        run: &'a str,
        dry_run: bool,
    ) -> Fut<'a, GcReport> {
        let (p, run) = (policy.clone(), run.to_owned());
        Box::pin(
            self.db
                .transaction(dry_run, move |tx| mark(tx, &p, t, &run)),
        )
    }

    fn pending_garbage(&self) -> Fut<'_, (u64, u64)> {
        Box::pin(self.db.read(|c| {
            Ok(c.query_row(
                "SELECT count(*), coalesce(sum(size), 0) FROM gc_pending p
                 WHERE NOT EXISTS (SELECT 1 FROM blobs b WHERE b.digest = p.digest)",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )?)
        }))
    }

    fn sweep_batch<'a>(
        &'a self,
        run: &'a str,
        limit: usize,
        delete: Arc<DeleteObjects>,
    ) -> Fut<'a, (Swept, bool)> {
        let run = run.to_owned();
        let handle = tokio::runtime::Handle::current();
        Box::pin(self.db.write(move |tx| {
            let mut st = tx.prepare(
                "SELECT p.digest, p.size, p.run,
                        EXISTS (SELECT 1 FROM blobs b WHERE b.digest = p.digest)
                 FROM gc_pending p LIMIT ?1",
            )?;
            let rows = st
                .query_map([limit as i64], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, bool>(3)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut batch = Swept::default();
            let mut digests = Vec::new();
            for (d, size, marked_by, revived) in &rows {
                if *revived {
                    continue; // pushed again since it was marked: keep the bytes
                }
                let Ok(d) = d.parse::<Digest>() else { continue };
                digests.push(d);
                batch.blobs += 1;
                batch.bytes += u64::try_from(*size).unwrap_or(0);
                if *marked_by != run {
                    batch.resumed += 1;
                }
            }
            // This runs on a blocking thread: wait for the objects' deletion here, holding the
            // write lock, so that no push can commit a row for these digests meanwhile.
            batch.objects = handle.block_on(delete(digests))?;
            let mut del = tx.prepare_cached("DELETE FROM gc_pending WHERE digest = ?1")?;
            for (d, ..) in &rows {
                del.execute([d])?;
            }
            Ok((batch, rows.len() == limit))
        }))
    }

    fn record_gc_run<'a>(&'a self, run: &'a GcRun) -> Fut<'a, ()> {
        let run = run.clone();
        Box::pin(async move {
            let report = serde_json::to_string(&run.report)
                .map_err(|e| Error::Internal(format!("gc report: {e}")))?;
            self.db
                .write(move |tx| {
                    tx.execute(
                        "INSERT INTO gc_runs (started_at, finished_at, duration_ms, holder, report)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![
                            run.started_at,
                            run.finished_at,
                            i64::try_from(run.duration.as_millis()).unwrap_or(i64::MAX),
                            run.holder,
                            report
                        ],
                    )?;
                    tx.execute(
                        "DELETE FROM gc_runs WHERE id <= (SELECT max(id) FROM gc_runs) - ?1",
                        [RUNS_KEPT],
                    )?;
                    Ok(())
                })
                .await
        })
    }

    fn last_gc_run(&self) -> Fut<'_, Option<GcRun>> {
        Box::pin(self.db.read(|c| {
            let row: Option<(i64, i64, i64, String, String)> = c
                .query_row(
                    "SELECT started_at, finished_at, duration_ms, holder, report
                     FROM gc_runs ORDER BY id DESC LIMIT 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                )
                .optional()?;
            Ok(
                row.map(|(started_at, finished_at, ms, holder, report)| GcRun {
                    started_at,
                    finished_at,
                    duration: std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0)),
                    holder,
                    report: serde_json::from_str(&report).unwrap_or_default(),
                }),
            )
        }))
    }

    fn referenced_blobs(&self) -> Fut<'_, BTreeSet<String>> {
        Box::pin(self.db.read(|c| {
            let mut st =
                c.prepare("SELECT DISTINCT child_digest FROM manifest_refs WHERE kind = 'blob'")?;
            let ds = st
                .query_map([], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<BTreeSet<_>>>()?;
            Ok(ds)
        }))
    }

    fn evict<'a>(&'a self, policy: &'a EvictPolicy, now: i64) -> Fut<'a, EvictReport> {
        let p = policy.clone();
        Box::pin(self.db.write(move |tx| {
            tx.execute_batch(
                "CREATE TEMP TABLE IF NOT EXISTS evict_repos (id INTEGER PRIMARY KEY);
                     DELETE FROM temp.evict_repos;",
            )?;
            {
                let mut ins = tx.prepare_cached(
                    "INSERT INTO temp.evict_repos (id)
                         SELECT id FROM repos WHERE substr(name, 1, length(?1) + 1) = ?1 || '/'",
                )?;
                for prefix in &p.prefixes {
                    ins.execute([prefix])?;
                }
            }
            let mut r = EvictReport {
                bytes_before: usage(tx)?,
                ..EvictReport::default()
            };
            let mut current = r.bytes_before;
            let age_cutoff = p.max_age.map(|a| now - a.as_secs() as i64);
            // Images: manifests no index lists and that refer to nothing.
            let roots: Vec<(i64, String, i64)> = {
                let mut st = tx.prepare(
                    "SELECT m.repo_id, m.digest, coalesce(m.last_pulled, m.created_at) AS used
                         FROM manifests m JOIN temp.evict_repos e ON e.id = m.repo_id
                         WHERE m.subject IS NULL
                           AND NOT EXISTS (SELECT 1 FROM manifest_refs r WHERE r.repo_id = m.repo_id
                                           AND r.child_digest = m.digest AND r.kind = 'manifest')
                         ORDER BY used",
                )?;
                st.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                    .collect::<rusqlite::Result<_>>()?
            };
            for (repo, digest, used) in roots {
                let too_old = age_cutoff.is_some_and(|c| used < c);
                let too_big = p.max_bytes.is_some_and(|m| current > m);
                if !too_old && !too_big {
                    break;
                }
                r.manifests += remove_image(tx, repo, &digest)?;
                current = usage(tx)?;
            }
            r.bytes_after = current;
            Ok(r)
        }))
    }
}

/// The mark phase: one pass over the review queues.
fn mark(tx: &Transaction<'_>, p: &GcPolicy, t: i64, run: &str) -> Result<GcReport> {
    let mut r = GcReport::default();
    let grace_cutoff = t - secs(p.grace);

    // Manifests that may have become unreachable.
    let untagged_cutoff = p.untagged_after.map(|a| t - secs(a));
    let candidates: Vec<(i64, String, i64)> = {
        let mut st = tx.prepare("SELECT repo_id, digest, queued_at FROM manifest_review")?;
        st.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?
    };
    for (repo, digest, queued) in candidates {
        let subject: Option<Option<String>> = tx
            .query_row(
                "SELECT subject FROM manifests WHERE repo_id = ?1 AND digest = ?2",
                params![repo, digest],
                |row| row.get(0),
            )
            .optional()?;
        let Some(subject) = subject else {
            forget_manifest(tx, repo, &digest)?;
            continue;
        };
        if kept_by_tag_or_index(tx, repo, &digest)? {
            forget_manifest(tx, repo, &digest)?;
            continue;
        }
        let delete = match subject {
            Some(s) => {
                let subject_exists: bool = tx.query_row(
                    "SELECT EXISTS (SELECT 1 FROM manifests WHERE repo_id = ?1 AND digest = ?2)",
                    params![repo, s],
                    |row| row.get(0),
                )?;
                if subject_exists {
                    // A live referrer (signature, SBOM): referrers are untagged by nature.
                    forget_manifest(tx, repo, &digest)?;
                    continue;
                }
                p.orphan_referrers && queued < grace_cutoff
            }
            None => untagged_cutoff.is_some_and(|c| queued < c),
        };
        if delete {
            tx.execute(
                "DELETE FROM manifests WHERE repo_id = ?1 AND digest = ?2",
                params![repo, digest],
            )?;
            forget_manifest(tx, repo, &digest)?;
            r.manifests += 1;
        }
        // Otherwise it stays queued until it is old enough or the policy changes.
    }

    // Manifest bodies: database only, so no grace is needed (a concurrent push re-inserts).
    let bodies: Vec<String> = {
        let mut st = tx.prepare("SELECT digest FROM body_review")?;
        st.query_map([], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    for d in bodies {
        let bytes: Option<i64> = tx
            .query_row(
                "SELECT length(content) FROM manifest_bodies b WHERE digest = ?1
                 AND NOT EXISTS (SELECT 1 FROM manifests m WHERE m.digest = b.digest)",
                [&d],
                |row| row.get(0),
            )
            .optional()?;
        if let Some(bytes) = bytes {
            tx.execute("DELETE FROM manifest_bodies WHERE digest = ?1", [&d])?;
            r.manifest_bodies += 1;
            r.manifest_body_bytes += bytes as u64;
        }
        tx.execute("DELETE FROM body_review WHERE digest = ?1", [&d])?;
    }

    // Blobs: unreferenced, and not queued, linked or read within the grace period.
    let blobs: Vec<String> = {
        let mut st = tx.prepare("SELECT digest FROM blob_review WHERE queued_at < ?1")?;
        st.query_map([grace_cutoff], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    for d in blobs {
        let referenced: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM manifest_refs WHERE child_digest = ?1 AND kind = 'blob')",
            [&d],
            |row| row.get(0),
        )?;
        let info: Option<(i64, i64, i64)> = tx
            .query_row(
                "SELECT size, max(created_at, last_access),
                        coalesce((SELECT max(created_at) FROM repo_blobs WHERE digest = ?1), 0)
                 FROM blobs WHERE digest = ?1",
                [&d],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .optional()?;
        match info {
            Some((size, used, linked)) if !referenced => {
                if used.max(linked) >= grace_cutoff {
                    continue; // recently used: look again next time
                }
                tx.execute("DELETE FROM repo_blobs WHERE digest = ?1", [&d])?;
                tx.execute("DELETE FROM blobs WHERE digest = ?1", [&d])?;
                tx.execute(
                    "INSERT INTO gc_pending (digest, size, marked_at, run) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (digest) DO NOTHING",
                    params![d, size, t, run],
                )?;
                r.blobs += 1;
                r.blob_bytes += size as u64;
            }
            _ => {}
        }
        tx.execute("DELETE FROM blob_review WHERE digest = ?1", [&d])?;
    }
    Ok(r)
}

/// Whether a tag or an index in the same repository keeps the manifest `digest`.
fn kept_by_tag_or_index(tx: &Transaction<'_>, repo: i64, digest: &str) -> rusqlite::Result<bool> {
    tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM tags WHERE repo_id = ?1 AND digest = ?2)
             OR EXISTS (SELECT 1 FROM manifest_refs WHERE repo_id = ?1 AND child_digest = ?2
                        AND kind = 'manifest')",
        params![repo, digest],
        |row| row.get(0),
    )
}

fn forget_manifest(tx: &Transaction<'_>, repo: i64, digest: &str) -> Result<()> {
    tx.execute(
        "DELETE FROM manifest_review WHERE repo_id = ?1 AND digest = ?2",
        params![repo, digest],
    )?;
    Ok(())
}

fn usage(tx: &Transaction<'_>) -> rusqlite::Result<u64> {
    tx.query_row(
        "SELECT coalesce(sum(b.size), 0) FROM blobs b WHERE b.digest IN
            (SELECT r.child_digest FROM manifest_refs r JOIN temp.evict_repos e ON e.id = r.repo_id
             WHERE r.kind = 'blob')",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n as u64)
}

/// Removes one manifest, the children only it kept, and its referrers.
fn remove_image(tx: &Transaction<'_>, repo: i64, digest: &str) -> rusqlite::Result<u64> {
    let children: Vec<String> = {
        let mut st = tx.prepare_cached(
            "SELECT child_digest FROM manifest_refs
             WHERE repo_id = ?1 AND manifest_digest = ?2 AND kind = 'manifest'",
        )?;
        st.query_map(params![repo, digest], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    let referrers: Vec<String> = {
        let mut st =
            tx.prepare_cached("SELECT digest FROM manifests WHERE repo_id = ?1 AND subject = ?2")?;
        st.query_map(params![repo, digest], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    let mut n = tx.execute(
        "DELETE FROM manifests WHERE repo_id = ?1 AND digest = ?2",
        params![repo, digest],
    )? as u64;
    for r in referrers {
        n += remove_image(tx, repo, &r)?;
    }
    for c in children {
        if !kept_by_tag_or_index(tx, repo, &c)? {
            n += remove_image(tx, repo, &c)?;
        }
    }
    Ok(n)
}
