//! The cache across processes: one upstream fetch per digest and one revalidation per tag and
//! TTL, however many processes share the metadata (replicas behind a balancer, `berth
//! prefetch` beside a server).
//!
//! Within a process, flights already coalesce (`Inner::once`, [`super::blobs`]). Across
//! processes, a flight first takes a lease named after its work (`blob:<digest>`,
//! `tag:<repo>:<tag>`, ...) in the metadata. A process that finds the lease held waits until the
//! holder's work shows in the metadata (the blob or manifest stored, the tag confirmed) or the
//! lease comes free (the holder failed, or died and its lease lapsed within [`LEASE_TTL`]), and
//! then looks again. Waiting for a blob would hold a client's first byte back for the whole
//! download, so blob waiters relay instead: they stream the bytes from the holder's spool as it
//! fetches them ([`Relay`]), when the holder said where it can be reached (`peer_url`).
//!
//! Relays between replicas are authenticated with an HMAC of the digest under a secret every
//! replica reads from the shared metadata (made once, by whichever replica asks first), so a
//! relay URL is useless to anyone who is not a replica, and leaks nothing but the one blob.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_storage::lease::Held;
use berth_storage::{ByteStream, Digest, Error as StoreError, Store};
use futures_util::StreamExt as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{CacheError, UpstreamError};

/// How long a flight's lease lasts unless renewed (its holder renews it every third of this):
/// the longest a dead holder on another host keeps others waiting.
pub(super) const LEASE_TTL: Duration = Duration::from_secs(30);
/// The longest a process waits on another's flight before giving up on the request.
pub(super) const MAX_WAIT: Duration = Duration::from_secs(600);
/// The header carrying a relay's proof.
pub const RELAY_HEADER: &str = "berth-relay";
/// Where a replica answers relays: this, then the digest.
pub const RELAY_PATH: &str = "/_berth/relay/";

/// A flight's turn across processes.
pub(super) enum Turn {
    /// This process does the work, holding the lease until it drops the value.
    Mine(Held),
    /// Another process did it: look in the metadata.
    Done,
}

/// One try at a flight's lease.
pub(super) enum Attempt {
    /// Taken.
    Mine(Held),
    /// Held by this holder (see [`berth_storage::store::holder_peer`]).
    Theirs(String),
}

/// Takes the lease `name`, or says who holds it.
pub(super) async fn attempt(store: &Arc<Store>, name: &str) -> Result<Attempt, CacheError> {
    match store.hold_lease(name, LEASE_TTL).await {
        Ok(held) => Ok(Attempt::Mine(held)),
        Err(StoreError::Busy { holder, .. }) => Ok(Attempt::Theirs(holder)),
        Err(e) => Err(e.into()),
    }
}

/// Gives a flight's lease back; a failure only means it lapses by itself.
pub(super) async fn release(held: Held) {
    if let Err(e) = held.release().await {
        tracing::debug!(error = %e, "releasing a cache lease failed; it lapses by itself");
    }
}

/// The next pause of a waiter: from 50 ms, doubling, at most 500 ms.
pub(super) fn backoff(pause: Duration) -> Duration {
    (pause * 2).min(Duration::from_millis(500))
}

/// This process's turn at the flight `name`: the lease, unless `done` says (before or after
/// taking it) that another process already did the work; waiting while another holds it.
pub(super) async fn turn<D, F>(store: &Arc<Store>, name: &str, done: D) -> Result<Turn, CacheError>
where
    D: Fn() -> F,
    F: Future<Output = Result<bool, CacheError>>,
{
    let deadline = Instant::now() + MAX_WAIT;
    let mut pause = Duration::from_millis(50);
    let mut waited = false;
    loop {
        match attempt(store, name).await? {
            Attempt::Mine(held) => {
                // The previous holder may have finished just before letting go.
                if done().await? {
                    release(held).await;
                    return Ok(Turn::Done);
                }
                return Ok(Turn::Mine(held));
            }
            Attempt::Theirs(holder) => {
                if !waited {
                    waited = true;
                    tracing::debug!(flight = name, %holder, "waiting on another process's fetch");
                    metrics::counter!("berth_proxy_cluster_waits_total").increment(1);
                }
                if done().await? {
                    return Ok(Turn::Done);
                }
                if Instant::now() > deadline {
                    return Err(UpstreamError::Unavailable(format!(
                        "{holder} has been fetching {name} for over {}s",
                        MAX_WAIT.as_secs()
                    ))
                    .into());
                }
                tokio::time::sleep(pause).await;
                pause = backoff(pause);
            }
        }
    }
}

/// Relays between replicas: proving and checking that a request comes from one, and fetching
/// a blob from the replica that is downloading it.
pub(super) struct Relay {
    store: Arc<Store>,
    client: reqwest::Client,
}

/// How long a relay's body may go without a byte before the follower gives up on the replica
/// it relays from: longer than that replica may itself wait on its slowest upstream (which
/// ends its stream with an error when it gives up), so only a replica that froze or dropped
/// off the network (no reset ever comes) trips it, and its clients get an error to retry on
/// rather than a pull that never ends.
pub(super) fn relay_read_timeout(upstreams: &[crate::config::UpstreamSection]) -> Duration {
    let slowest = upstreams
        .iter()
        .map(|u| u.timeout)
        .max()
        .unwrap_or_default();
    slowest + Duration::from_secs(30)
}

impl Relay {
    pub(super) fn new(store: Arc<Store>, read_timeout: Duration) -> Result<Self, String> {
        crate::tls::install_crypto();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .read_timeout(read_timeout)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("relay client: {e}"))?;
        Ok(Self { store, client })
    }

    async fn mac(&self) -> Result<Hmac<Sha256>, CacheError> {
        let secret = self.store.shared_secret().await?;
        Hmac::<Sha256>::new_from_slice(secret)
            .map_err(|e| CacheError::Storage(format!("relay secret: {e}")))
    }

    /// The proof that a relay of `digest` comes from a replica.
    pub(super) async fn proof(&self, digest: &Digest) -> Result<String, CacheError> {
        let mut mac = self.mac().await?;
        mac.update(digest.to_string().as_bytes());
        Ok(hex::encode(mac.finalize().into_bytes()))
    }

    /// Whether `proof` proves a relay of `digest` (in constant time).
    pub(super) async fn verify(&self, digest: &Digest, proof: &str) -> Result<bool, CacheError> {
        let Ok(bytes) = hex::decode(proof) else {
            return Ok(false);
        };
        let mut mac = self.mac().await?;
        mac.update(digest.to_string().as_bytes());
        Ok(mac.verify_slice(&bytes).is_ok())
    }

    /// Opens the stream of `digest` from the replica at `peer`: its size when known and the
    /// bytes, or `None` when the peer has no such fetch any more (it ended: look in the store,
    /// or take the lease).
    pub(super) async fn open(
        &self,
        peer: &str,
        digest: &Digest,
    ) -> Result<Option<(Option<u64>, ByteStream)>, CacheError> {
        let url = format!("{}{RELAY_PATH}{digest}", peer.trim_end_matches('/'));
        let resp = match self
            .client
            .get(&url)
            .header(RELAY_HEADER, self.proof(digest).await?)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                tracing::debug!(%url, status = %r.status(), "the fetching replica has no stream");
                return Ok(None);
            }
            Err(e) => {
                tracing::debug!(%url, error = %e, "the fetching replica cannot be reached");
                return Ok(None);
            }
        };
        let size = resp.content_length();
        let body = resp
            .bytes_stream()
            .map(|r| r.map_err(std::io::Error::other))
            .boxed();
        metrics::counter!("berth_proxy_relays_total").increment(1);
        Ok(Some((size, body)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store_in(dir: &std::path::Path) -> Arc<Store> {
        let config = berth_storage::StorageConfig::local(dir);
        Arc::new(Store::open(&config).await.unwrap())
    }

    #[tokio::test]
    async fn relay_proofs_hold_only_for_their_digest_and_secret() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(dir.path()).await;
        let relay = Relay::new(store.clone(), Duration::from_secs(60)).unwrap();
        let (a, b) = (Digest::sha256(b"a"), Digest::sha256(b"b"));
        let proof = relay.proof(&a).await.unwrap();
        assert!(relay.verify(&a, &proof).await.unwrap());
        assert!(!relay.verify(&b, &proof).await.unwrap());
        assert!(!relay.verify(&a, "zz").await.unwrap());
        assert!(!relay.verify(&a, &"0".repeat(64)).await.unwrap());
        // Another process over the same metadata shares the secret.
        let other = Relay::new(store, Duration::from_secs(60)).unwrap();
        assert!(other.verify(&a, &proof).await.unwrap());
    }

    /// A replica that stops sending mid-relay (frozen, or cut off the network: no reset ever
    /// comes) ends the relay with an error after the read timeout, instead of holding its
    /// followers' clients forever.
    #[tokio::test]
    async fn a_relay_from_a_replica_that_stops_sending_fails_after_the_read_timeout() {
        use futures_util::StreamExt as _;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(dir.path()).await;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut sock, _) = l.accept().await.unwrap();
            let mut req = [0u8; 4096];
            let _ = sock.read(&mut req).await;
            let head = "HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789";
            sock.write_all(head.as_bytes()).await.unwrap();
            // Holds the connection open and sends nothing more.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(sock);
        });
        let relay = Relay::new(store, Duration::from_millis(300)).unwrap();
        let d = Digest::sha256(b"x");
        let (size, mut body) = relay.open(&peer, &d).await.unwrap().expect("a stream");
        assert_eq!(size, Some(1000));
        let read = async {
            let mut got = 0;
            while let Some(chunk) = body.next().await {
                match chunk {
                    Ok(c) => got += c.len(),
                    Err(e) => return Err((got, e)),
                }
            }
            Ok(got)
        };
        let r = tokio::time::timeout(Duration::from_secs(10), read).await;
        match r {
            Ok(Err((got, _))) => assert_eq!(got, 10),
            Ok(Ok(got)) => panic!("the relay ended well after {got} bytes"),
            Err(_) => panic!("the relay still waits on a replica that stopped sending"),
        }
    }

    #[test]
    fn waiters_back_off_to_half_a_second() {
        let mut p = Duration::from_millis(50);
        for _ in 0..10 {
            p = backoff(p);
        }
        assert_eq!(p, Duration::from_millis(500));
    }
}
