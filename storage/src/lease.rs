//! Leases: one holder at a time for work that must not run twice at once across every process
//! sharing the metadata (the server, `berth gc`, replicas), such as garbage collection.
//!
//! A lease is a row naming its holder and when it lapses; the holder renews it while it works
//! and drops it when done. A holder that dies stops renewing, so its lease lapses by itself; on
//! the same host, a lease whose holder process is gone (or whose pid now belongs to a process
//! started later, as after a container restart) is taken over at once, so a crash does not
//! block the next run.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::meta::now;
use crate::store::Store;

/// Whether `holder` (another instance's id) is certainly dead: a process on this host that no
/// longer runs, or whose pid now belongs to a process started at another time.
fn holder_is_dead(holder: &str, me: &str) -> bool {
    let theirs: Vec<&str> = holder.split(' ').collect();
    let mine: Vec<&str> = me.split(' ').collect();
    let ([h_host, h_pid, h_start, _, ..], [m_host, ..]) = (theirs.as_slice(), mine.as_slice())
    else {
        return false;
    };
    if h_host != m_host || !cfg!(target_os = "linux") {
        return false;
    }
    crate::instance::process_start(h_pid).is_none_or(|started| started != *h_start)
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

impl Store {
    /// Takes lease `name` for `ttl`, or says who holds it ([`Error::Busy`]).
    pub async fn take_lease(&self, name: &str, ttl: Duration) -> Result<()> {
        let t = now();
        let until = t.saturating_add(secs(ttl));
        let Some((holder, lapses)) = self
            .meta
            .take_lease(name, &self.instance, until, t, None)
            .await?
        else {
            return Ok(());
        };
        if holder_is_dead(&holder, &self.instance)
            && self
                .meta
                .take_lease(name, &self.instance, until, t, Some(&holder))
                .await?
                .is_none()
        {
            tracing::info!(lease = name, previous = %holder, "took over the lease of a dead holder");
            return Ok(());
        }
        Err(Error::Busy {
            what: name.to_owned(),
            holder,
            until: lapses,
        })
    }

    /// Extends lease `name` by `ttl`; an error when this process no longer holds it.
    pub async fn renew_lease(&self, name: &str, ttl: Duration) -> Result<()> {
        let until = now().saturating_add(secs(ttl));
        if !self.meta.renew_lease(name, &self.instance, until).await? {
            return Err(Error::Internal(format!("lost the {name} lease")));
        }
        Ok(())
    }

    /// Drops lease `name` if this process holds it.
    pub async fn release_lease(&self, name: &str) -> Result<()> {
        self.meta.release_lease(name, &self.instance).await
    }
}

/// A lease held for as long as this value lives: a task renews it at a third of its lifetime,
/// [`Held::release`] gives it back.
#[derive(Debug)]
pub struct Held {
    store: std::sync::Arc<Store>,
    name: String,
    keeper: tokio::task::JoinHandle<()>,
}

impl Store {
    /// Takes lease `name` and keeps renewing it until [`Held::release`] (or until dropped, when
    /// it lapses by itself within `ttl`).
    pub async fn hold_lease(
        self: &std::sync::Arc<Self>,
        name: &str,
        ttl: Duration,
    ) -> Result<Held> {
        self.take_lease(name, ttl).await?;
        let (store, lease) = (self.clone(), name.to_owned());
        let keeper = tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                if let Err(e) = store.renew_lease(&lease, ttl).await {
                    tracing::warn!(lease, error = %e, "renewing a lease failed");
                    return;
                }
            }
        });
        Ok(Held {
            store: self.clone(),
            name: name.to_owned(),
            keeper,
        })
    }
}

impl Held {
    /// Stops renewing and gives the lease back.
    pub async fn release(self) -> Result<()> {
        self.keeper.abort();
        self.store.release_lease(&self.name).await
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_holders_are_recognised_only_on_this_host() {
        let me = crate::instance::instance_id();
        let host = me.split(' ').next().unwrap().to_owned();
        let pid = std::process::id();
        let start = crate::instance::process_start(&pid.to_string()).unwrap();
        // Another store in this very process is alive.
        assert!(!holder_is_dead(&format!("{host} {pid} {start} other"), &me));
        // The same pid started at another time: an earlier life (a restarted container).
        assert!(holder_is_dead(&format!("{host} {pid} 1 other"), &me));
        // No such process.
        assert!(holder_is_dead(&format!("{host} 4000001 5 other"), &me));
        // A holder that says where peers reach it is judged the same way.
        assert!(holder_is_dead(
            &format!("{host} 4000001 5 other http://10.0.0.1:5000"),
            &me
        ));
        // Another host's holder is never judged from here.
        assert!(!holder_is_dead("elsewhere 4000001 5 other", &me));
        assert!(!holder_is_dead("garbage", &me));
    }
}
