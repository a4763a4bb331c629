//! [`LeaseMeta`] on SQLite.

use rusqlite::{OptionalExtension, params};

use super::SqliteMeta;
use crate::meta::{Fut, LeaseMeta};

impl LeaseMeta for SqliteMeta {
    fn take_lease<'a>(
        &'a self,
        name: &'a str,
        me: &'a str,
        until: i64,
        now: i64,
        steal_from: Option<&'a str>,
    ) -> Fut<'a, Option<(String, i64)>> {
        let (name, me, steal) = (
            name.to_owned(),
            me.to_owned(),
            steal_from.map(str::to_owned),
        );
        Box::pin(self.db.write(move |tx| {
            let current: Option<(String, i64)> = tx
                .query_row(
                    "SELECT holder, expires_at FROM leases WHERE name = ?1",
                    [&name],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((holder, lapses)) = current
                && holder != me
                && lapses >= now
                && steal.as_deref() != Some(holder.as_str())
            {
                return Ok(Some((holder, lapses)));
            }
            tx.execute(
                "INSERT INTO leases (name, holder, expires_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,
                    expires_at = excluded.expires_at",
                params![name, me, until],
            )?;
            Ok(None)
        }))
    }

    fn renew_lease(&self, name: &str, me: &str, until: i64) -> Fut<'_, bool> {
        let (name, me) = (name.to_owned(), me.to_owned());
        Box::pin(self.db.write(move |tx| {
            let n = tx.execute(
                "UPDATE leases SET expires_at = ?3 WHERE name = ?1 AND holder = ?2",
                params![name, me, until],
            )?;
            Ok(n > 0)
        }))
    }

    fn release_lease(&self, name: &str, me: &str) -> Fut<'_, ()> {
        let (name, me) = (name.to_owned(), me.to_owned());
        Box::pin(self.db.write(move |tx| {
            tx.execute(
                "DELETE FROM leases WHERE name = ?1 AND holder = ?2",
                params![name, me],
            )?;
            Ok(())
        }))
    }
}
