//! A flaky object store: a fault-injecting proxy the test controls sits between Berth and the
//! S3 server (moto). On a share of requests it answers 500 or 503, answers late, or drops the
//! connection in the middle of the answer; at 100% every request errs. At 10% faults pushes and pulls succeed through
//! retries; at 100% they fail within bounded time with `503 UNAVAILABLE`, not a hang; at 0%
//! everything works again without a restart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use berth::config::{S3Section, StorageSection};
use rand::Rng;

use crate::backends::endpoint;
use crate::support::{Image, Push, TestServer, free_port};

#[derive(Clone)]
struct Faults {
    upstream: String,
    /// Percent of requests that get a fault.
    share: Arc<AtomicU32>,
    injected: Arc<AtomicU64>,
    forwarded: Arc<AtomicU64>,
    client: reqwest::Client,
}

async fn proxy(State(f): State<Faults>, req: Request) -> Response {
    let share = f.share.load(Ordering::Relaxed);
    let (roll, kind) = {
        let mut rng = rand::rng();
        // Down (100%): every request errs; otherwise any of the four faults.
        let kinds = if share >= 100 { 2 } else { 4 };
        (rng.random_range(0..100), rng.random_range(0..kinds))
    };
    let faulty = roll < share;
    if faulty && kind < 2 {
        f.injected.fetch_add(1, Ordering::Relaxed);
        let status = if kind == 0 { 500 } else { 503 };
        return Response::builder()
            .status(status)
            .body(Body::from("<Error><Code>SlowDown</Code></Error>"))
            .unwrap_or_default();
    }
    if faulty && kind == 2 {
        f.injected.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(800)).await; // late, then answered
    }
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return Response::builder()
            .status(400)
            .body(Body::empty())
            .unwrap_or_default();
    };
    let url = format!(
        "{}{}",
        f.upstream,
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut out = f.client.request(parts.method, url).body(body);
    for (k, v) in &parts.headers {
        if k != "host" && k != "content-length" {
            out = out.header(k, v);
        }
    }
    let Ok(r) = out.send().await else {
        return Response::builder()
            .status(502)
            .body(Body::empty())
            .unwrap_or_default();
    };
    f.forwarded.fetch_add(1, Ordering::Relaxed);
    let mut resp = Response::builder().status(r.status());
    for (k, v) in r.headers() {
        resp = resp.header(k, v);
    }
    let bytes = r.bytes().await.unwrap_or_default();
    if faulty && kind == 3 && !bytes.is_empty() {
        // The connection drops halfway through the answer.
        f.injected.fetch_add(1, Ordering::Relaxed);
        let half = bytes.slice(..bytes.len() / 2);
        let stream = futures_util::stream::iter([
            Ok::<_, std::io::Error>(half),
            Err(std::io::Error::other("dropped")),
        ]);
        return resp.body(Body::from_stream(stream)).unwrap_or_default();
    }
    resp.body(Body::from(bytes)).unwrap_or_default()
}

async fn start_faults(upstream: String) -> (SocketAddr, Faults) {
    let f = Faults {
        upstream,
        share: Arc::new(AtomicU32::new(0)),
        injected: Arc::new(AtomicU64::new(0)),
        forwarded: Arc::new(AtomicU64::new(0)),
        client: crate::support::client(),
    };
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let app = axum::Router::new().fallback(proxy).with_state(f.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushes_and_pulls_ride_out_a_flaky_object_store_and_fail_cleanly_when_it_is_down() {
    let (addr, faults) = start_faults(endpoint("BERTH_TEST_S3_ENDPOINT")).await;
    let s = TestServer::start_with(move |c| {
        c.storage = StorageSection::S3(S3Section {
            bucket: "registry".into(),
            prefix: Some(format!("faults-{}", free_port())),
            endpoint: Some(format!("http://{addr}")),
            region: Some("us-east-1".into()),
            access_key_id: Some("test".into()),
            secret_access_key: Some("test".into()),
            allow_http: true,
            redirect: Some(false),
            ..S3Section::default()
        });
    })
    .await;
    let root = s.root();

    // 10% of object-store requests fail one way or another: every push and pull succeeds.
    faults.share.store(10, Ordering::Relaxed);
    let mut pushed = Vec::new();
    for i in 0..12u64 {
        let image = Image::new(4000 + i, &[200_000, 50_000, 8_000]);
        let how = Push {
            monolithic: i % 2 == 0,
            ..Push::default()
        };
        image
            .try_push(&root, "flaky/app", &format!("v{i}"), how)
            .await
            .unwrap_or_else(|e| panic!("push {i} at 10% faults: {e}"));
        pushed.push(image);
    }
    for (i, image) in pushed.iter().enumerate() {
        image
            .pull(&root, "flaky/app", &format!("v{i}"), "")
            .await
            .unwrap_or_else(|e| panic!("pull {i} at 10% faults: {e}"));
    }
    let injected = faults.injected.load(Ordering::Relaxed);
    let forwarded = faults.forwarded.load(Ordering::Relaxed);
    assert!(injected >= 5, "{injected} faults in {forwarded} requests");
    eprintln!("10% faults: {injected} injected, {forwarded} forwarded, 0 client errors");

    // The store is down: a push fails within bounded time with an OCI error, and so does a
    // pull of a layer (the manifest lives in the metadata and still answers).
    faults.share.store(100, Ordering::Relaxed);
    let started = Instant::now();
    let err = Image::new(4999, &[10_000])
        .try_push(&root, "flaky/app", "down", Push::default())
        .await
        .expect_err("a push with the store down");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(40), "the refusal took {took:?}");
    assert!(err.contains("503") && err.contains("UNAVAILABLE"), "{err}");
    let c = crate::support::client();
    let layer = crate::support::digest(&pushed[0].blobs[1]);
    let r = c
        .get(format!("{root}/v2/flaky/app/blobs/{layer}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let r = c.get(format!("{root}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503, "not ready while blob storage fails");

    // Back: pushes and pulls work again, nothing lost, no restart.
    faults.share.store(0, Ordering::Relaxed);
    Image::new(5000, &[10_000])
        .try_push(&root, "flaky/app", "back", Push::default())
        .await
        .unwrap();
    for (i, image) in pushed.iter().enumerate() {
        image
            .pull(&root, "flaky/app", &format!("v{i}"), "")
            .await
            .unwrap_or_else(|e| panic!("pull {i} after the outage: {e}"));
    }
}
