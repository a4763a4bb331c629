//! [`LeaseMeta`] on PostgreSQL: one statement takes a lease when it is free, lapsed, ours or
//! held by a dead holder, so two replicas asking at once cannot both get it.

use super::{PgMeta, db};
use crate::meta::{Fut, LeaseMeta};

impl LeaseMeta for PgMeta {
    fn take_lease<'a>(
        &'a self,
        name: &'a str,
        me: &'a str,
        until: i64,
        now: i64,
        steal_from: Option<&'a str>,
    ) -> Fut<'a, Option<(String, i64)>> {
        Box::pin(async move {
            let c = self.client().await?;
            // The holder may let go between the two statements; then try again.
            loop {
                let taken = c
                    .query_opt(
                        "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3)
                         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,
                            expires_at = excluded.expires_at
                         WHERE leases.holder = excluded.holder OR leases.expires_at < $4
                            OR leases.holder = $5
                         RETURNING holder",
                        &[&name, &me, &until, &now, &steal_from],
                    )
                    .await
                    .map_err(db)?;
                if taken.is_some() {
                    return Ok(None);
                }
                let current = c
                    .query_opt(
                        "SELECT holder, expires_at FROM leases WHERE name = $1",
                        &[&name],
                    )
                    .await
                    .map_err(db)?;
                if let Some(r) = current {
                    return Ok(Some((r.get(0), r.get(1))));
                }
            }
        })
    }

    fn renew_lease(&self, name: &str, me: &str, until: i64) -> Fut<'_, bool> {
        let (name, me) = (name.to_owned(), me.to_owned());
        Box::pin(async move {
            let c = self.client().await?;
            let n = c
                .execute(
                    "UPDATE leases SET expires_at = $3 WHERE name = $1 AND holder = $2",
                    &[&name, &me, &until],
                )
                .await
                .map_err(db)?;
            Ok(n > 0)
        })
    }

    fn release_lease(&self, name: &str, me: &str) -> Fut<'_, ()> {
        let (name, me) = (name.to_owned(), me.to_owned());
        Box::pin(async move {
            let c = self.client().await?;
            c.execute(
                "DELETE FROM leases WHERE name = $1 AND holder = $2",
                &[&name, &me],
            )
            .await
            .map_err(db)?;
            Ok(())
        })
    }
}
