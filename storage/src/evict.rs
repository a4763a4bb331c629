//! Cache eviction: keeps the pull-through cache under a size cap and a maximum age by
//! dropping the least recently pulled cached images; garbage collection then frees their
//! blobs (after its grace period), exactly as for deleted pushed images.
//!
//! An image goes whole: an index with the manifests it lists (unless something else still
//! lists or tags them) and the referrers of what goes. Blobs are never deleted here, so a
//! blob that a kept manifest references stays, whichever image brought it in.

use std::time::Duration;

use rusqlite::{Transaction, params};
use tracing::info;

use crate::error::Result;
use crate::meta::now;
use crate::store::Store;

/// What to keep.
#[derive(Debug, Clone, Default)]
pub struct EvictPolicy {
    /// Repository prefixes of cached content (`docker.io` for `docker.io/library/alpine`).
    pub prefixes: Vec<String>,
    /// Cap on the bytes of blobs cached manifests reference.
    pub max_bytes: Option<u64>,
    /// Images not pulled for this long go.
    pub max_age: Option<Duration>,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvictReport {
    /// Manifests removed.
    pub manifests: u64,
    /// Bytes the cache referenced before.
    pub bytes_before: u64,
    /// Bytes it references now (freed on disk by the next garbage collection).
    pub bytes_after: u64,
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
        if !crate::gc::kept_by_tag_or_index(tx, repo, &c)? {
            n += remove_image(tx, repo, &c)?;
        }
    }
    Ok(n)
}

impl Store {
    /// Evicts cached images per `p`, least recently pulled first.
    pub async fn evict_cache(&self, p: &EvictPolicy) -> Result<EvictReport> {
        if p.prefixes.is_empty() || (p.max_bytes.is_none() && p.max_age.is_none()) {
            return Ok(EvictReport::default());
        }
        // Pull times still in memory count.
        self.flush_access().await?;
        let p = p.clone();
        let report = self
            .db
            .write(move |tx| {
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
                let age_cutoff = p.max_age.map(|a| now() - a.as_secs() as i64);
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
            })
            .await?;
        if report.manifests > 0 {
            info!(
                manifests = report.manifests,
                before = report.bytes_before,
                after = report.bytes_after,
                "cache eviction"
            );
        }
        Ok(report)
    }
}
