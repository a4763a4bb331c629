//! [`ClusterMeta`] on PostgreSQL.

use super::{PgMeta, db};
use crate::meta::{ClusterMeta, Fut};

impl ClusterMeta for PgMeta {
    fn confirmed_at(&self, key: &str) -> Fut<'_, Option<i64>> {
        let key = key.to_owned();
        Box::pin(async move {
            let c = self.client().await?;
            let st = c
                .prepare_cached("SELECT confirmed_at FROM confirmations WHERE key = $1")
                .await
                .map_err(db)?;
            Ok(c.query_opt(&st, &[&key])
                .await
                .map_err(db)?
                .map(|r| r.get(0)))
        })
    }

    fn confirm(&self, key: &str, t: i64) -> Fut<'_, ()> {
        let key = key.to_owned();
        Box::pin(async move {
            let c = self.client().await?;
            c.execute(
                "INSERT INTO confirmations (key, confirmed_at) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET
                    confirmed_at = GREATEST(confirmations.confirmed_at, excluded.confirmed_at)",
                &[&key, &t],
            )
            .await
            .map_err(db)?;
            Ok(())
        })
    }

    fn shared_secret(&self, candidate: &str) -> Fut<'_, String> {
        let candidate = candidate.to_owned();
        Box::pin(async move {
            let c = self.client().await?;
            c.execute(
                "INSERT INTO settings (name, value) VALUES ('relay_secret', $1)
                 ON CONFLICT (name) DO NOTHING",
                &[&candidate],
            )
            .await
            .map_err(db)?;
            Ok(c.query_one(
                "SELECT value FROM settings WHERE name = 'relay_secret'",
                &[],
            )
            .await
            .map_err(db)?
            .get(0))
        })
    }
}
