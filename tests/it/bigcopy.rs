//! S3's copy limit and the multipart uploads crashes leave.
//!
//! AWS copies at most 5 GiB in one CopyObject; moto copies anything. So Berth's S3 traffic goes
//! through a proxy that enforces a copy limit the way AWS does (a CopyObject whose source is
//! larger gets `400 InvalidRequest`, and so does an UploadPartCopy whose range is) and counts
//! both kinds of copy. A blob over the limit must still commit and pull back whole.
//!
//! CI runs it with a 5 MiB limit (S3's smallest part) and a 12 MiB blob, small because every
//! test shares the one moto. The long mode takes the blob's size from
//! `BERTH_BIG_BLOB_GIB` and the limit from `BERTH_BIG_BLOB_LIMIT_GIB` (default: AWS's 5 GiB,
//! Berth's default), streamed both ways. moto holds multipart uploads in memory (6 GiB over
//! AWS's limit needs more than 24 GiB), so the 6 GiB run points `BERTH_TEST_S3_ENDPOINT` at
//! s3s-fs (crates.io: an S3 server over a directory, which checks signatures and streams
//! parts and part copies to disk); see the README.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use berth::config::{S3Section, StorageSection};
use berth_storage::GcPolicy;
use berth_storage::s3::S3Native;
use futures_util::StreamExt;
use object_store::ObjectStoreExt as _;
use object_store::aws::AmazonS3Builder;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use rand::{RngCore, SeedableRng};
use sha2::{Digest as _, Sha256};

use crate::backends::{endpoint, unique};
use crate::support::{TestServer, free_port};

const MIB: u64 = 1024 * 1024;

#[derive(Clone)]
struct CopyLimit {
    upstream: String,
    limit: u64,
    /// How long the store takes, in silence, to join a copy in parts (S3 sends blanks while
    /// it joins; some S3-compatible servers send nothing).
    join_silence: std::time::Duration,
    client: reqwest::Client,
    /// The store itself, for the size of a copy's source.
    store: Arc<object_store::aws::AmazonS3>,
    whole_copies: Arc<AtomicU64>,
    part_copies: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
}

fn refuse(p: &CopyLimit, what: &str) -> Response {
    p.refused.fetch_add(1, Ordering::Relaxed);
    Response::builder()
        .status(400)
        .header("content-type", "application/xml")
        .body(Body::from(format!(
            "<Error><Code>InvalidRequest</Code><Message>The specified copy source is larger than \
             the maximum allowable size for a copy source: {} ({what})</Message></Error>",
            p.limit
        )))
        .unwrap_or_default()
}

/// The size a `bytes=a-b` range covers.
fn range_len(v: &str) -> Option<u64> {
    let (a, b) = v.strip_prefix("bytes=")?.split_once('-')?;
    Some(b.parse::<u64>().ok()? - a.parse::<u64>().ok()? + 1)
}

async fn proxy(State(p): State<CopyLimit>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let query = parts.uri.query().unwrap_or("");
    if parts.method == "POST" && query.contains("uploadId=") && parts.uri.path().contains("/blobs/")
    {
        tokio::time::sleep(p.join_silence).await;
    }
    if parts.method == "PUT"
        && let Some(source) = parts.headers.get("x-amz-copy-source")
    {
        if query.contains("uploadId=") {
            let len = parts
                .headers
                .get("x-amz-copy-source-range")
                .and_then(|v| v.to_str().ok())
                .and_then(range_len);
            match len {
                Some(n) if n <= p.limit => p.part_copies.fetch_add(1, Ordering::Relaxed),
                _ => return refuse(&p, "part copy"),
            };
        } else {
            // The source's size, asked of the store with credentials (a store that checks
            // signatures refuses an unsigned HEAD).
            let source = source.to_str().unwrap_or_default().trim_start_matches('/');
            let key = source.strip_prefix("registry/").unwrap_or(source);
            let key = percent_encoding::percent_decode_str(key).decode_utf8_lossy();
            let size = match p.store.head(&Path::from(key.as_ref())).await {
                Ok(meta) => meta.size,
                Err(_) => u64::MAX,
            };
            if size > p.limit {
                return refuse(&p, "CopyObject");
            }
            p.whole_copies.fetch_add(1, Ordering::Relaxed);
        }
    }
    let url = format!(
        "{}{}",
        p.upstream,
        parts.uri.path_and_query().map_or("/", |q| q.as_str())
    );
    // A body whose length was declared (or an absent one) goes on with that length (held whole:
    // Berth's requests carry parts of a few MiB); a store may refuse a chunked body (s3s-fs
    // wants Content-Length).
    let sized = parts.headers.contains_key("content-length")
        || !parts.headers.contains_key("transfer-encoding");
    let body = if sized {
        match axum::body::to_bytes(body, 256 * MIB as usize).await {
            Ok(b) => reqwest::Body::from(b),
            Err(_) => {
                return Response::builder()
                    .status(400)
                    .body(Body::empty())
                    .unwrap_or_default();
            }
        }
    } else {
        reqwest::Body::wrap_stream(body.into_data_stream())
    };
    let mut out = p.client.request(parts.method, url).body(body);
    // Every header, Host too: the request is signed for the proxy's address, and a store that
    // checks signatures (s3s-fs in the long mode) must see the host it was signed for.
    for (k, v) in &parts.headers {
        out = out.header(k, v);
    }
    let Ok(r) = out.send().await else {
        return Response::builder()
            .status(502)
            .body(Body::empty())
            .unwrap_or_default();
    };
    let mut resp = Response::builder().status(r.status());
    for (k, v) in r.headers() {
        resp = resp.header(k, v);
    }
    resp.body(Body::from_stream(r.bytes_stream()))
        .unwrap_or_default()
}

async fn start_proxy(limit: u64) -> (SocketAddr, CopyLimit) {
    start_proxy_with(limit, std::time::Duration::ZERO).await
}

async fn start_proxy_with(
    limit: u64,
    join_silence: std::time::Duration,
) -> (SocketAddr, CopyLimit) {
    let p = CopyLimit {
        upstream: endpoint("BERTH_TEST_S3_ENDPOINT"),
        limit,
        join_silence,
        client: crate::support::client(),
        store: Arc::new(raw_s3().build().expect("store")),
        whole_copies: Arc::new(AtomicU64::new(0)),
        part_copies: Arc::new(AtomicU64::new(0)),
        refused: Arc::new(AtomicU64::new(0)),
    };
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let app = axum::Router::new().fallback(proxy).with_state(p.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, p)
}

/// `size` bytes of seeded noise, 1 MiB at a time: the same every time it is made.
fn noise_stream(size: u64, seed: u64) -> impl futures_util::Stream<Item = Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut left = size;
    futures_util::stream::iter(std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let n = left.min(MIB);
        left -= n;
        let mut buf = vec![0u8; n as usize];
        rng.fill_bytes(&mut buf);
        Some(buf)
    }))
}

async fn noise_digest(size: u64, seed: u64) -> String {
    let mut h = Sha256::new();
    let mut s = std::pin::pin!(noise_stream(size, seed));
    while let Some(b) = s.next().await {
        h.update(&b);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Pushes `size` bytes of noise as one monolithic upload, streamed; the blob's digest.
async fn push_noise(s: &TestServer, repo: &str, size: u64, seed: u64) -> String {
    let client = crate::support::client();
    let digest = noise_digest(size, seed).await;
    let r = client
        .post(s.url(&format!("/v2/{repo}/blobs/uploads/")))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let location = if location.starts_with('/') {
        s.url(&location)
    } else {
        location
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let body = noise_stream(size, seed).map(Ok::<_, std::io::Error>);
    let r = client
        .put(format!("{location}{sep}digest={digest}"))
        .header("content-type", "application/octet-stream")
        .header("content-length", size)
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .expect("PUT");
    let status = r.status();
    assert_eq!(status, 201, "push of {size} bytes: {:?}", r.text().await);
    digest
}

/// Pulls blob `digest` back, streamed: its digest and length as received.
async fn pull_digest(s: &TestServer, repo: &str, digest: &str) -> (String, u64) {
    let r = crate::support::client()
        .get(s.url(&format!("/v2/{repo}/blobs/{digest}")))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 200);
    let mut h = Sha256::new();
    let mut n = 0u64;
    let mut body = r.bytes_stream();
    while let Some(b) = body.next().await {
        let b = b.expect("body");
        n += b.len() as u64;
        h.update(&b);
    }
    (format!("sha256:{}", hex::encode(h.finalize())), n)
}

fn s3_through(
    proxy: SocketAddr,
    prefix: &str,
    max_copy: Option<u64>,
) -> impl FnOnce(&mut berth::config::Config) {
    let prefix = prefix.to_owned();
    move |c| {
        c.storage = StorageSection::S3(S3Section {
            bucket: "registry".into(),
            prefix: Some(prefix),
            endpoint: Some(format!("http://{proxy}")),
            region: Some("us-east-1".into()),
            access_key_id: Some("test".into()),
            secret_access_key: Some("test".into()),
            allow_http: true,
            redirect: Some(false),
            max_copy_size: max_copy.map(bytesize::ByteSize::b),
            ..S3Section::default()
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_over_the_copy_limit_is_copied_in_parts() {
    // The long mode: AWS's limit (Berth's default) or `BERTH_BIG_BLOB_LIMIT_GIB`, and a blob
    // of `BERTH_BIG_BLOB_GIB`.
    let env_gib = |var: &str| -> Option<u64> { std::env::var(var).ok()?.parse().ok() };
    let (limit, size, configured) = match env_gib("BERTH_BIG_BLOB_GIB") {
        Some(g) => match env_gib("BERTH_BIG_BLOB_LIMIT_GIB") {
            Some(l) => (l * 1024 * MIB, g * 1024 * MIB, Some(l * 1024 * MIB)),
            None => (berth_storage::s3::MAX_COPY, g * 1024 * MIB, None),
        },
        None => (5 * MIB, 12 * MIB, Some(5 * MIB)),
    };
    let (addr, p) = start_proxy(limit).await;
    let s = TestServer::start_with(s3_through(addr, &unique("bigcopy"), configured)).await;

    // Under the limit: one CopyObject, as before.
    let small = push_noise(&s, "big/blob", MIB, 1).await;
    assert_eq!(p.whole_copies.load(Ordering::Relaxed), 1);
    assert_eq!(p.part_copies.load(Ordering::Relaxed), 0);

    let started = std::time::Instant::now();
    let big = push_noise(&s, "big/blob", size, 2).await;
    let pushed = started.elapsed();
    let parts = size.div_ceil(berth_storage::s3::part_size(size, limit));
    assert_eq!(
        p.refused.load(Ordering::Relaxed),
        0,
        "a copy over the limit was sent"
    );
    assert_eq!(
        p.whole_copies.load(Ordering::Relaxed),
        1,
        "the big blob went as one copy"
    );
    assert_eq!(p.part_copies.load(Ordering::Relaxed), parts);

    let started = std::time::Instant::now();
    let (got, n) = pull_digest(&s, "big/blob", &big).await;
    assert_eq!((got.as_str(), n), (big.as_str(), size));
    eprintln!(
        "{size} bytes over a {limit}-byte copy limit: pushed in {:.1?} ({parts} part copies), pulled back whole in {:.1?}",
        pushed,
        started.elapsed()
    );
    assert_eq!(pull_digest(&s, "big/blob", &small).await, (small, MIB));
}

/// A store that joins a copy in parts in silence for longer than the object-store client
/// allows a request to be silent (30 s): the commit waits for it instead of failing the push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_silent_join_of_part_copies_is_waited_for() {
    let (addr, p) = start_proxy_with(5 * MIB, std::time::Duration::from_secs(35)).await;
    let s = TestServer::start_with(s3_through(addr, &unique("slowjoin"), Some(5 * MIB))).await;
    let started = std::time::Instant::now();
    let big = push_noise(&s, "big/slow", 12 * MIB, 3).await;
    assert!(started.elapsed() >= std::time::Duration::from_secs(35));
    assert_eq!(p.part_copies.load(Ordering::Relaxed), 3);
    assert_eq!(
        pull_digest(&s, "big/slow", &big).await,
        (big.clone(), 12 * MIB)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_refused_by_the_store_leaves_nothing() {
    // Berth told a limit higher than the store's: the copy is refused, and the push fails with
    // an OCI error and leaves no blob visible.
    let (addr, p) = start_proxy(6 * MIB).await;
    let s =
        TestServer::start_with(s3_through(addr, &unique("bigcopy-refused"), Some(10 * MIB))).await;
    let digest = noise_digest(8 * MIB, 3).await;
    let client = crate::support::client();
    let r = client
        .post(s.url("/v2/big/refused/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let location = s.url(r.headers()["location"].to_str().unwrap());
    let sep = if location.contains('?') { '&' } else { '?' };
    let mut body = Vec::new();
    let mut st = std::pin::pin!(noise_stream(8 * MIB, 3));
    while let Some(b) = st.next().await {
        body.extend_from_slice(&b);
    }
    let r = client
        .put(format!("{location}{sep}digest={digest}"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());
    let text = r.text().await.unwrap();
    assert!(text.contains("\"code\""), "an OCI error body: {text}");
    assert_eq!(p.refused.load(Ordering::Relaxed), 1);
    let r = client
        .head(s.url(&format!("/v2/big/refused/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "a refused copy made the blob visible");
}

fn raw_s3() -> AmazonS3Builder {
    AmazonS3Builder::new()
        .with_endpoint(endpoint("BERTH_TEST_S3_ENDPOINT"))
        .with_allow_http(true)
        .with_bucket_name("registry")
        .with_region("us-east-1")
        .with_access_key_id("test")
        .with_secret_access_key("test")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_aborts_multipart_uploads_left_by_crashes() {
    let prefix = unique("multipart");
    let s = TestServer::start_with(crate::backends::configure(
        crate::backends::Cloud::S3,
        &prefix,
        false,
    ))
    .await;
    let b = raw_s3();
    let store = Arc::new(b.clone().build().unwrap());
    let native = S3Native::new(
        &b,
        store.clone(),
        Some(Path::from(prefix.as_str())),
        1 << 30,
    )
    .unwrap();
    let open = |key: String| {
        let store = store.clone();
        let prefix = prefix.clone();
        async move {
            store
                .create_multipart(&Path::from(format!("{prefix}/{key}")))
                .await
                .unwrap()
        }
    };
    // A session that is still open, with a write in flight.
    let r = crate::support::client()
        .post(s.url("/v2/mp/live/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let live = location
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    open(format!("uploads/{live}.00000000000000000000-a")).await;
    // A session that ended in a crash. (moto dates every multipart upload 2010, so which
    // ages are aborted is left to the unit test of `crash_left`.)
    open("uploads/0123456789abcdef0123456789abcdef.00000000000000000000-b".into()).await;
    assert_eq!(native.open_multiparts().await.unwrap().len(), 2);

    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let policy = GcPolicy {
        grace: std::time::Duration::ZERO,
        ..GcPolicy::default()
    };
    let dry = s.state.store().gc(&policy, true).await.unwrap();
    assert_eq!(dry.multipart_aborted, 1, "{dry}");
    assert_eq!(
        native.open_multiparts().await.unwrap().len(),
        2,
        "a dry run aborted"
    );
    let report = s.state.store().gc(&policy, false).await.unwrap();
    assert_eq!(report.multipart_aborted, 1, "{report}");
    let left: Vec<String> = native
        .open_multiparts()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.key.to_string())
        .collect();
    assert_eq!(left, [format!("uploads/{live}.00000000000000000000-a")]);
}
