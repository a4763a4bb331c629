//! [`UploadMeta`] on SQLite.

use std::collections::HashSet;

use rusqlite::{OptionalExtension, params};

use super::{SqliteMeta, ensure_repo, link_blob};
use crate::meta::{Fut, UploadMeta};

fn size_of(c: &rusqlite::Connection, repo: &str, id: &str) -> rusqlite::Result<Option<u64>> {
    c.query_row(
        "SELECT u.size FROM uploads u JOIN repos r ON r.id = u.repo_id
         WHERE u.id = ?1 AND r.name = ?2",
        params![id, repo],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map(|s| s.map(|s| s as u64))
}

impl UploadMeta for SqliteMeta {
    fn start_upload(&self, repo: &str, id: &str, t: i64) -> Fut<'_, ()> {
        let (name, sid) = (repo.to_owned(), id.to_owned());
        Box::pin(self.db.write_unsynced(move |tx| {
            let rid = ensure_repo(tx, &name)?;
            tx.execute(
                "INSERT INTO uploads (id, repo_id, size, created_at, updated_at)
                 VALUES (?1, ?2, 0, ?3, ?3)",
                params![sid, rid, t],
            )?;
            Ok(())
        }))
    }

    fn upload_size(&self, repo: &str, id: &str) -> Fut<'_, Option<u64>> {
        let (name, sid) = (repo.to_owned(), id.to_owned());
        Box::pin(self.db.read(move |c| Ok(size_of(c, &name, &sid)?)))
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
        Box::pin(self.db.write_unsynced(move |tx| {
            let rows = tx.execute(
                "UPDATE uploads SET size = size + ?1, updated_at = ?2
                 WHERE id = ?3 AND size = ?4
                   AND repo_id = (SELECT id FROM repos WHERE name = ?5)",
                params![len as i64, t, sid, at as i64, name],
            )?;
            if rows == 0 {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO upload_parts (upload_id, offset, size, key) VALUES (?1, ?2, ?3, ?4)",
                params![sid, at as i64, len as i64, k],
            )?;
            Ok(true)
        }))
    }

    fn upload_parts(&self, repo: &str, id: &str) -> Fut<'_, Option<(u64, Vec<String>)>> {
        let (name, sid) = (repo.to_owned(), id.to_owned());
        Box::pin(self.db.read(move |c| {
            let Some(size) = size_of(c, &name, &sid)? else {
                return Ok(None);
            };
            let mut st = c.prepare_cached(
                "SELECT key FROM upload_parts WHERE upload_id = ?1 ORDER BY offset",
            )?;
            let parts = st
                .query_map([&sid], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Some((size, parts)))
        }))
    }

    fn reserve_blob(&self, digest: &str, size: u64, t: i64) -> Fut<'_, ()> {
        let d = digest.to_owned();
        Box::pin(self.db.write(move |tx| {
            tx.execute(
                "INSERT INTO blobs (digest, size, created_at, last_access) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (digest) DO NOTHING",
                params![d, size as i64, t],
            )?;
            Ok(())
        }))
    }

    fn commit_blob(&self, repo: &str, id: &str, digest: &str, size: u64, t: i64) -> Fut<'_, ()> {
        let (name, sid, d) = (repo.to_owned(), id.to_owned(), digest.to_owned());
        Box::pin(self.db.write(move |tx| {
            let rid = ensure_repo(tx, &name)?;
            tx.execute(
                "INSERT INTO blobs (digest, size, created_at, last_access) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (digest) DO NOTHING",
                params![d, size as i64, t],
            )?;
            link_blob(tx, rid, &d, t)?;
            tx.execute("DELETE FROM uploads WHERE id = ?1", [&sid])?;
            Ok(())
        }))
    }

    fn end_upload(&self, id: &str) -> Fut<'_, Vec<String>> {
        let sid = id.to_owned();
        Box::pin(self.db.write(move |tx| {
            let parts = {
                let mut st =
                    tx.prepare_cached("SELECT key FROM upload_parts WHERE upload_id = ?1")?;
                st.query_map([&sid], |r| r.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?
            };
            tx.execute("DELETE FROM uploads WHERE id = ?1", [&sid])?;
            Ok(parts)
        }))
    }

    fn count_uploads(&self) -> Fut<'_, u64> {
        Box::pin(self.db.read(|c| {
            Ok(c.query_row("SELECT count(*) FROM uploads", [], |r| r.get::<_, i64>(0))? as u64)
        }))
    }

    fn uploads_untouched_since(&self, cutoff: i64) -> Fut<'_, Vec<String>> {
        Box::pin(self.db.read(move |c| {
            let mut st = c.prepare_cached("SELECT id FROM uploads WHERE updated_at < ?1")?;
            let ids = st
                .query_map([cutoff], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(ids)
        }))
    }

    fn live_uploads(&self, ids: Vec<String>) -> Fut<'_, HashSet<String>> {
        Box::pin(self.db.read(move |c| {
            let mut st = c.prepare_cached("SELECT 1 FROM uploads WHERE id = ?1")?;
            let mut live = HashSet::new();
            for id in ids {
                if st.exists([&id])? {
                    live.insert(id);
                }
            }
            Ok(live)
        }))
    }
}
