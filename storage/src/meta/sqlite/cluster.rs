//! [`ClusterMeta`] on SQLite.

use rusqlite::{OptionalExtension, params};

use super::SqliteMeta;
use crate::meta::{ClusterMeta, Fut};

impl ClusterMeta for SqliteMeta {
    fn confirmed_at(&self, key: &str) -> Fut<'_, Option<i64>> {
        let key = key.to_owned();
        Box::pin(self.db.read(move |c| {
            Ok(
                c.prepare_cached("SELECT confirmed_at FROM confirmations WHERE key = ?1")?
                    .query_row([&key], |r| r.get(0))
                    .optional()?,
            )
        }))
    }

    fn confirm(&self, key: &str, t: i64) -> Fut<'_, ()> {
        let key = key.to_owned();
        Box::pin(self.db.write(move |tx| {
            tx.execute(
                "INSERT INTO confirmations (key, confirmed_at) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET
                    confirmed_at = max(confirmed_at, excluded.confirmed_at)",
                params![key, t],
            )?;
            Ok(())
        }))
    }

    fn shared_secret(&self, candidate: &str) -> Fut<'_, String> {
        let candidate = candidate.to_owned();
        Box::pin(self.db.write(move |tx| {
            tx.execute(
                "INSERT INTO settings (name, value) VALUES ('relay_secret', ?1)
                 ON CONFLICT (name) DO NOTHING",
                [&candidate],
            )?;
            Ok(tx.query_row(
                "SELECT value FROM settings WHERE name = 'relay_secret'",
                [],
                |r| r.get(0),
            )?)
        }))
    }
}
