//! The pull-through cache against real upstreams started here: Debian's `docker-registry`
//! (Distribution 2.8; its access log counts the requests it gets) and a second Berth with
//! token auth on (the token dance). Never the internet.

use std::time::Duration;

use berth::config::{AuthMode, Config, UpstreamSection};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{Auth, Image};
use crate::support::{Proc, TestServer, client, digest, spawn_berth_with, spawn_distribution};

pub(crate) fn upstream(
    name: &str,
    url: &str,
    tweak: impl FnOnce(&mut UpstreamSection),
) -> UpstreamSection {
    let mut u = UpstreamSection {
        name: name.into(),
        url: Some(url.into()),
        ..UpstreamSection::default()
    };
    tweak(&mut u);
    u
}

pub(crate) async fn cache(
    upstreams: Vec<UpstreamSection>,
    tweak: impl FnOnce(&mut Config),
) -> TestServer {
    TestServer::start_with(|c| {
        c.proxy.upstream = upstreams;
        tweak(c);
    })
    .await
}

/// Requests Distribution logged as `"METHOD <path-prefix>...`.
pub(crate) fn logged(dir: &std::path::Path, method: &str, path_prefix: &str) -> usize {
    let log = std::fs::read_to_string(dir.join("access.log")).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains(&format!("\"{method} {path_prefix}")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_cold_pulls_fetch_each_blob_once_and_outages_serve_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let dist: Proc = spawn_distribution(dir.path());
    let image = Image::new(7, &[3 << 20, 2 << 20, 1 << 20, 512 << 10]);
    image
        .push(&dist.root(), "library/app", "1", Auth::None)
        .await;
    let s = cache(
        vec![upstream("docker.io", &dist.root(), |u| {
            u.tag_ttl = Duration::ZERO
        })],
        |_| {},
    )
    .await;
    let before_blobs = logged(dir.path(), "GET", "/v2/library/app/blobs/");
    let before_manifests = logged(dir.path(), "GET", "/v2/library/app/manifests/");

    let root = s.root();
    let pulls = (0..20).map(|_| image.pull(&root, "library/app", "1", "?ns=docker.io"));
    for r in futures_util::future::join_all(pulls).await {
        r.unwrap();
    }
    for b in &image.blobs {
        let n = logged(
            dir.path(),
            "GET",
            &format!("/v2/library/app/blobs/{}", digest(b)),
        );
        assert_eq!(n, 1, "upstream GETs of blob {}", digest(b));
    }
    assert_eq!(
        logged(dir.path(), "GET", "/v2/library/app/blobs/") - before_blobs,
        image.blobs.len()
    );
    assert_eq!(
        logged(dir.path(), "GET", "/v2/library/app/manifests/") - before_manifests,
        1,
        "one manifest GET; tags are revalidated with HEAD"
    );
    // Byte-identical and not converted: the Docker media type comes back.
    let r = client()
        .get(s.url(&format!(
            "/v2/docker.io/library/app/manifests/{}",
            image.digest()
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["content-type"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        r.headers()["docker-content-digest"],
        image.digest().as_str()
    );

    // A by-digest pull of cached content never touches the upstream.
    let heads = logged(dir.path(), "HEAD", "/v2/library/app/manifests/");
    let r = client()
        .get(s.url(&format!(
            "/v2/library/app/manifests/{}?ns=docker.io",
            image.digest()
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["oci-namespace"], "docker.io");
    assert_eq!(
        logged(dir.path(), "HEAD", "/v2/library/app/manifests/"),
        heads
    );

    // The upstream goes away: what is cached still pulls (the tag is stale but served)...
    let other = Image::new(8, &[100_000]);
    other
        .push(&dist.root(), "library/other", "1", Auth::None)
        .await;
    drop(dist);
    image
        .pull(&s.root(), "library/app", "1", "?ns=docker.io")
        .await
        .unwrap();
    image
        .pull(&s.root(), "docker.io/library/app", "1", "")
        .await
        .unwrap();
    // ... and what never was gives a clear error.
    let r = client()
        .get(s.url("/v2/library/other/manifests/1?ns=docker.io"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "UNAVAILABLE");
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("not cached"),
        "{v}"
    );
    let r = client()
        .get(s.url(&format!(
            "/v2/library/other/blobs/{}?ns=docker.io",
            digest(&other.blobs[1])
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_read_only_cache_and_local_pushes_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let dist = spawn_distribution(dir.path());
    let image = Image::new(9, &[200_000]);
    image
        .push(&dist.root(), "library/alpine", "1", Auth::None)
        .await;
    image.push(&dist.root(), "org/tool", "1", Auth::None).await;
    let s = cache(
        vec![upstream("docker.io", &dist.root(), |u| u.default = true)],
        |_| {},
    )
    .await;
    // Docker's registry-mirrors form (plain Hub names), the path-prefix form with Hub's
    // `library/` added, and ns: all reach the same upstream repository.
    image
        .pull(&s.root(), "library/alpine", "1", "")
        .await
        .unwrap();
    image
        .pull(&s.root(), "docker.io/alpine", "1", "")
        .await
        .unwrap();
    image
        .pull(&s.root(), "org/tool", "1", "?ns=index.docker.io")
        .await
        .unwrap();
    // An unknown ns is not dialled.
    let r = client()
        .get(s.url("/v2/org/tool/manifests/1?ns=evil.example"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Cached repositories are read-only...
    for (m, path) in [
        (Method::POST, "/v2/docker.io/library/alpine/blobs/uploads/"),
        (Method::PUT, "/v2/docker.io/library/alpine/manifests/2"),
        (Method::DELETE, "/v2/docker.io/library/alpine/manifests/1"),
    ] {
        let r = client()
            .request(m.clone(), s.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED, "{m} {path}");
    }
    // ... while pushes to local names keep working beside the cache, and win over the default
    // upstream for reads.
    // A push in progress is local from its first request: a blob HEAD after the upload (and
    // before the manifest) must not go to the upstream.
    let blob = b"pushed here first".to_vec();
    let r = client()
        .post(s.url(&format!(
            "/v2/library/fresh/blobs/uploads/?digest={}",
            digest(&blob)
        )))
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = client()
        .head(s.url(&format!("/v2/library/fresh/blobs/{}", digest(&blob))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mine = Image::new(10, &[1000]);
    mine.push(&s.root(), "library/alpine-local", "1", Auth::None)
        .await;
    mine.push(&s.root(), "team/app", "1", Auth::None).await;
    mine.pull(&s.root(), "team/app", "1", "").await.unwrap();
    mine.pull(&s.root(), "library/alpine-local", "1", "")
        .await
        .unwrap();
    // The cache shows up in the catalog under its prefix.
    let v: Value = client()
        .get(s.url("/v2/_catalog"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let repos = v["repositories"].as_array().unwrap();
    assert!(repos.contains(&json!("docker.io/library/alpine")), "{v}");
    assert!(repos.contains(&json!("team/app")), "{v}");
    // Tags come from the upstream.
    let v: Value = client()
        .get(s.url("/v2/docker.io/org/tool/tags/list"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["tags"], json!(["1"]));
    assert_eq!(v["name"], "docker.io/org/tool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_pull_workflow_through_a_cache_of_a_token_auth_registry() {
    // The upstream: a Berth with token auth; the cache authenticates with its own account.
    let up = TestServer::start_with(|c| {
        crate::support::with_users(c, AuthMode::Token, &[("mirror", "mirror-pw")]);
    })
    .await;
    let s = cache(
        vec![upstream("ghcr.io", &up.root(), |u| {
            u.username = Some("mirror".into());
            u.password = Some("mirror-pw".into());
        })],
        |_| {},
    )
    .await;
    let mut cfg = berth_conformance::Config::new(&s.root(), "ghcr.io/conformance/pull");
    cfg.push = false;
    cfg.discovery = false;
    cfg.management = false;
    cfg.extras = false;
    cfg.upstream = Some(berth_conformance::Upstream {
        url: up.root(),
        namespace: "conformance/pull".into(),
        credentials: Some(("mirror".into(), "mirror-pw".into())),
    });
    let report = berth_conformance::run(cfg, false).await.unwrap();
    let failures: Vec<_> = report
        .failures()
        .iter()
        .map(|o| format!("{}: {:?}", o.name, o.result))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(report.passed() >= 15, "only {} checks", report.passed());
}

/// Serves `app`, with the `/v2/` base endpoint added, on a free loopback port: an upstream
/// made to misbehave in one way (or a host it sends clients to).
async fn fake_upstream(app: axum::Router) -> std::net::SocketAddr {
    let app = app.route("/v2/", axum::routing::get(|| async { "{}" }));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    addr
}

/// An upstream that answers a GET of blob `d` in `repo` with `body`, whether or not it is the
/// blob (a lying upstream serves other bytes), with its Content-Length.
async fn blob_upstream(repo: &str, d: &str, body: Vec<u8>) -> std::net::SocketAddr {
    let app = axum::Router::new().route(
        &format!("/v2/{repo}/blobs/{d}"),
        axum::routing::get(move || async move { body }),
    );
    fake_upstream(app).await
}

/// A blob whose bytes do not match its digest is neither stored nor handed out whole: the
/// bytes stream to the client before the digest is known, so the cache holds back the last
/// one, and the body breaks one byte short (Content-Length says how many were due). On local
/// disk the client reads the store's own file; in memory (an object store) a spool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_that_does_not_match_its_digest_is_never_stored_nor_served_whole() {
    for memory in [false, true] {
        let want = crate::support::noise(300_000, 1);
        let d = digest(&want);
        let good = crate::support::noise(300_000, 2);
        let gd = digest(&good);
        let evil = blob_upstream("evil/app", &d, vec![7u8; 300_000]).await;
        let honest = blob_upstream("good/app", &gd, good).await;
        let s = cache(
            vec![
                upstream("evil.example", &format!("http://{evil}"), |_| {}),
                upstream("good.example", &format!("http://{honest}"), |_| {}),
            ],
            |c| {
                if memory {
                    c.storage = berth::config::StorageSection::Memory;
                }
            },
        )
        .await;
        let url = s.url(&format!("/v2/evil/app/blobs/{d}?ns=evil.example"));
        let mut r = client().get(&url).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.content_length(), Some(300_000));
        let mut got = 0usize;
        let broke = loop {
            match r.chunk().await {
                Ok(Some(c)) => got += c.len(),
                Ok(None) => break false,
                Err(_) => break true,
            }
        };
        assert!(
            broke && got < 300_000,
            "memory={memory}: the body of the wrong bytes ended well after {got} bytes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let local: berth_storage::RepoName = "evil.example/evil/app".parse().unwrap();
        let wrong: berth_storage::Digest = d.parse().unwrap();
        assert!(
            s.state.store().stat_blob(&local, &wrong).await.is_err(),
            "memory={memory}: a mismatching blob was stored"
        );
        // A blob that matches still streams whole through the same path.
        let url = s.url(&format!("/v2/good/app/blobs/{gd}?ns=good.example"));
        let body = crate::support::get_bytes(&client(), url).await;
        assert_eq!(digest(&body), gd, "memory={memory}");
    }
}

/// Docker Hub answers a blob GET with a redirect to its CDN, and registries on object stores
/// with a presigned URL. The cache follows it, sends the upstream's credentials to the
/// upstream only (never to the other host), stores what the redirect served, and serves the
/// next pull from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_the_upstream_redirects_is_fetched_there_without_the_upstreams_credentials() {
    use axum::http::{HeaderMap, StatusCode as S, header};
    use axum::response::IntoResponse;
    use axum::routing::get;
    use std::sync::{Arc, Mutex};
    let blob = crate::support::noise(700_000, 9);
    let d = digest(&blob);
    // The CDN: serves the bytes at a signed URL and notes the Authorization it was sent.
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let cdn = {
        let (seen, blob) = (seen.clone(), blob.clone());
        let app = axum::Router::new().route(
            "/layer",
            get(move |h: HeaderMap| async move {
                let auth = h
                    .get(header::AUTHORIZATION)
                    .map(|v| v.to_str().unwrap_or("?").to_owned());
                seen.lock().unwrap().push(auth);
                blob
            }),
        );
        fake_upstream(app).await
    };
    // The registry: Basic auth, then a redirect to the CDN.
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "bot:s3cret")
    );
    let app = axum::Router::new().route(
        &format!("/v2/hub/app/blobs/{d}"),
        get(move |h: HeaderMap| async move {
            if h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(basic.as_str()) {
                return (
                    S::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Basic realm=\"hub\"".to_owned())],
                )
                    .into_response();
            }
            (
                S::TEMPORARY_REDIRECT,
                [(header::LOCATION, format!("http://{cdn}/layer?sig=abc"))],
            )
                .into_response()
        }),
    );
    let up = fake_upstream(app).await;
    let s = cache(
        vec![upstream("hub.example", &format!("http://{up}"), |u| {
            u.username = Some("bot".into());
            u.password = Some("s3cret".into());
        })],
        |_| {},
    )
    .await;
    let url = s.url(&format!("/v2/hub/app/blobs/{d}?ns=hub.example"));
    for pull in 0..2 {
        let r = client().get(&url).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "pull {pull}");
        let got = r.bytes().await.unwrap();
        assert_eq!(digest(&got), d, "pull {pull}");
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        1,
        "the CDN is asked once, then the cache serves"
    );
    assert_eq!(
        seen[0], None,
        "the upstream's credentials went to another host"
    );
}

/// A body of 1 MiB chunks, 256 MiB in all, that counts in `sent` the bytes it handed to the
/// server: an upstream answer without end, for all a reader can tell.
fn endless(sent: std::sync::Arc<std::sync::atomic::AtomicUsize>) -> axum::body::Body {
    use futures_util::StreamExt as _;
    use std::sync::atomic::Ordering;
    let chunks = futures_util::stream::iter(0..256).map(move |_| {
        sent.fetch_add(1 << 20, Ordering::Relaxed);
        Ok::<_, std::convert::Infallible>(bytes::Bytes::from(vec![b'x'; 1 << 20]))
    });
    axum::body::Body::from_stream(chunks)
}

/// What the cache holds in memory from an upstream (a manifest, a page of tags, a token
/// answer) is read up to a limit and refused past it, with or without a Content-Length: an
/// upstream that streams without end gets a 5xx for the client and costs the cache a bounded
/// buffer. (Before, a manifest answered chunked was read whole: one GET took the cache to 4 GB
/// of RSS against a Python upstream sending 4,000 MiB.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answer_without_end_is_cut_off_at_a_limit() {
    use axum::http::{StatusCode as S, header};
    use axum::response::IntoResponse;
    use axum::routing::get;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let sent = Arc::new(AtomicUsize::new(0));
    let endless_route = |sent: Arc<AtomicUsize>, ct: &'static str| {
        get(move || async move { ([(header::CONTENT_TYPE, ct)], endless(sent)) })
    };
    let open = axum::Router::new()
        .route(
            "/v2/evil/app/manifests/{reference}",
            endless_route(sent.clone(), "application/vnd.oci.image.manifest.v1+json"),
        )
        .route(
            "/v2/evil/app/tags/list",
            endless_route(sent.clone(), "application/json"),
        );
    let open = fake_upstream(open).await;
    // Token auth whose token service answers without end.
    let token = fake_upstream(
        axum::Router::new().route("/token", endless_route(sent.clone(), "application/json")),
    )
    .await;
    let locked = axum::Router::new().route(
        "/v2/evil/app/manifests/{reference}",
        get(move || async move {
            let challenge = format!("Bearer realm=\"http://{token}/token\",service=\"evil\"");
            (S::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, challenge)]).into_response()
        }),
    );
    let locked = fake_upstream(locked).await;
    let s = cache(
        vec![
            upstream("open.example", &format!("http://{open}"), |_| {}),
            upstream("locked.example", &format!("http://{locked}"), |_| {}),
        ],
        |_| {},
    )
    .await;
    let zeros = "0".repeat(64);
    for path in [
        "/v2/open.example/evil/app/manifests/latest".to_owned(),
        format!("/v2/open.example/evil/app/manifests/sha256:{zeros}"),
        "/v2/open.example/evil/app/tags/list".to_owned(),
        "/v2/locked.example/evil/app/manifests/latest".to_owned(),
    ] {
        sent.store(0, Ordering::Relaxed);
        let r = client()
            .get(s.url(&path))
            .header(header::ACCEPT, berth::proxy::upstream::MANIFEST_ACCEPT)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_server_error(), "{path}: {}", r.status());
        // The upstream stops being read: what it managed to send is the limit plus what the
        // sockets between hold, not the 256 MiB it had.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let n = sent.load(Ordering::Relaxed);
        assert!(n < 48 << 20, "{path}: the upstream sent {} MiB", n >> 20);
    }
}

/// An upstream that trickles an answer, a byte at a time but never slower than its read
/// timeout, must not hold a tag's clients for as long as it keeps on: the whole answer gets
/// the upstream's `timeout`, then the upstream is down for its backoff and the cached copy
/// answers, at once for the clients after. (Before, the revalidation waited on the trickle,
/// and with it every client of the tag.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_trickles_a_manifest_does_not_hold_its_clients() {
    use axum::http::{HeaderMap, Method as M, header};
    use axum::response::IntoResponse;
    use axum::routing::get;
    use futures_util::StreamExt as _;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    const OCI: &str = "application/vnd.oci.image.manifest.v1+json";
    let config = b"{}";
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest(config),
            "size": config.len(),
        },
        "layers": [],
    })
    .to_string();
    let md = digest(manifest.as_bytes());
    let trickle = Arc::new(AtomicBool::new(false));
    let app = axum::Router::new().route(
        "/v2/slow/app/manifests/{reference}",
        get({
            let (trickle, md) = (trickle.clone(), md.clone());
            move |method: M| async move {
                if !trickle.load(Ordering::Relaxed) {
                    let h = [
                        ("content-type", OCI),
                        ("docker-content-digest", md.as_str()),
                    ];
                    return (h, manifest).into_response();
                }
                if method == M::HEAD {
                    // No digest: the cache must GET to learn what the tag is.
                    return ([(header::CONTENT_TYPE, OCI)], "").into_response();
                }
                let drip = futures_util::stream::iter(0..100_000).then(|_| async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, std::convert::Infallible>(bytes::Bytes::from_static(b" "))
                });
                let mut h = HeaderMap::new();
                h.insert(header::CONTENT_TYPE, OCI.parse().unwrap());
                (h, axum::body::Body::from_stream(drip)).into_response()
            }
        }),
    );
    let addr = fake_upstream(app).await;
    let s = cache(
        vec![upstream("slow.example", &format!("http://{addr}"), |u| {
            u.tag_ttl = Duration::ZERO;
            u.timeout = Duration::from_secs(3);
            u.read_ahead = false;
        })],
        |_| {},
    )
    .await;
    let url = s.url("/v2/slow.example/slow/app/manifests/1");
    let get = || client().get(&url).header(header::ACCEPT, OCI).send();
    let r = get().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    trickle.store(true, Ordering::Relaxed);
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(20), get())
        .await
        .expect("the client still waits on the trickling upstream")
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "the cached copy answers");
    assert_eq!(r.headers()["docker-content-digest"], md.as_str());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // The upstream is now down for its backoff: the next client does not wait the timeout.
    let started = std::time::Instant::now();
    let r = get().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the next client waited {:?} on the trickling upstream",
        started.elapsed()
    );
}

/// An upstream that sends the first `first` bytes of `blob` at once and the rest only when
/// `gate` is notified.
async fn stalling_upstream(
    blob: Vec<u8>,
    first: usize,
    gate: std::sync::Arc<tokio::sync::Notify>,
) -> std::net::SocketAddr {
    use axum::routing::get;
    let path = format!("/v2/slow/app/blobs/{}", digest(&blob));
    let blob = bytes::Bytes::from(blob);
    let app = axum::Router::new().route(
        &path,
        get(move || {
            let (blob, gate) = (blob.clone(), gate.clone());
            async move {
                let len = blob.len();
                let head = futures_util::stream::once({
                    let b = blob.slice(..first);
                    async move { Ok::<_, std::convert::Infallible>(b) }
                });
                let tail = futures_util::stream::once(async move {
                    gate.notified().await;
                    Ok(blob.slice(first..))
                });
                let body =
                    axum::body::Body::from_stream(futures_util::StreamExt::chain(head, tail));
                ([("content-length", len.to_string())], body)
            }
        }),
    );
    fake_upstream(app).await
}

/// The bytes an upstream has sent reach the client while the upstream stalls: the cache
/// writes what it has when nothing more is coming rather than waiting to fill a batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_stalled_upstream_sent_reaches_the_client_before_the_rest() {
    let blob = crate::support::noise(3 << 20, 5);
    let d = digest(&blob);
    let first = 100_000;
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    let addr = stalling_upstream(blob.clone(), first, gate.clone()).await;
    let s = cache(
        vec![upstream("slow.example", &format!("http://{addr}"), |_| {})],
        |_| {},
    )
    .await;
    let mut r = client()
        .get(s.url(&format!("/v2/slow/app/blobs/{d}?ns=slow.example")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut got = Vec::new();
    let head = tokio::time::timeout(Duration::from_secs(10), async {
        while got.len() < first {
            match r.chunk().await.unwrap() {
                Some(c) => got.extend_from_slice(&c),
                None => break,
            }
        }
    })
    .await;
    assert!(
        head.is_ok(),
        "the client had {} of the {first} bytes the upstream sent before it stalled",
        got.len()
    );
    assert_eq!(got.len(), first, "bytes the upstream had not sent yet");
    gate.notify_one();
    while let Some(c) = r.chunk().await.unwrap() {
        got.extend_from_slice(&c);
    }
    assert_eq!(digest(&got), d);
}

/// A ranged GET of a blob the cache is still fetching gets its range (206), as a stored blob
/// would: a client resuming a download (containerd sends `Range: bytes=<offset>-`) gets the
/// rest, not the whole blob again. A range's last byte, like a whole body's, waits until the
/// bytes are verified; a range past the end is 416. On local disk and in memory (a spool).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_of_a_blob_still_being_fetched_is_served_as_a_range() {
    for memory in [false, true] {
        let blob = crate::support::noise(3 << 20, 6);
        let d = digest(&blob);
        let size = blob.len();
        let gate = std::sync::Arc::new(tokio::sync::Notify::new());
        let addr = stalling_upstream(blob.clone(), 100_000, gate.clone()).await;
        let s = cache(
            vec![upstream("slow.example", &format!("http://{addr}"), |_| {})],
            |c| {
                if memory {
                    c.storage = berth::config::StorageSection::Memory;
                }
            },
        )
        .await;
        let url = s.url(&format!("/v2/slow/app/blobs/{d}?ns=slow.example"));
        let ranged = |range: &str| client().get(&url).header("range", range).send();
        // A slice of what has arrived: all but its last byte comes before the upstream
        // resumes, and the last once the whole blob has been checked.
        let mut slice = ranged("bytes=1000-1999").await.unwrap();
        assert_eq!(
            slice.status(),
            StatusCode::PARTIAL_CONTENT,
            "memory={memory}"
        );
        let h = slice.headers();
        assert_eq!(
            h["content-range"],
            format!("bytes 1000-1999/{size}").as_str()
        );
        assert_eq!(h["content-length"], "1000");
        let mut got = Vec::new();
        let early = tokio::time::timeout(Duration::from_secs(1), async {
            while let Some(c) = slice.chunk().await.unwrap() {
                got.extend_from_slice(&c);
            }
        })
        .await;
        assert!(
            early.is_err(),
            "the slice ended before the blob was verified"
        );
        assert_eq!(got, blob[1000..1999], "memory={memory}");
        // A resumption joins the same fetch.
        let rest = ranged("bytes=3000000-").await.unwrap();
        assert_eq!(
            rest.status(),
            StatusCode::PARTIAL_CONTENT,
            "memory={memory}"
        );
        let beyond = ranged(&format!("bytes={size}-")).await.unwrap();
        assert_eq!(beyond.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(
            beyond.headers()["content-range"],
            format!("bytes */{size}").as_str()
        );
        gate.notify_one();
        while let Some(c) = slice.chunk().await.unwrap() {
            got.extend_from_slice(&c);
        }
        assert_eq!(got, blob[1000..2000], "memory={memory}");
        assert_eq!(
            rest.bytes().await.unwrap(),
            blob[3_000_000..],
            "memory={memory}"
        );
        let whole = crate::support::get_bytes(&client(), url.clone()).await;
        assert_eq!(digest(&whole), d, "memory={memory}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_does_not_stop_the_cache_fill() {
    let dir = tempfile::tempdir().unwrap();
    let dist = spawn_distribution(dir.path());
    let image = Image::new(11, &[48 << 20]);
    image.push(&dist.root(), "big/layer", "1", Auth::None).await;
    let s = cache(vec![upstream("quay.io", &dist.root(), |_| {})], |_| {}).await;
    let layer = digest(&image.blobs[1]);
    let mut r = client()
        .get(s.url(&format!("/v2/quay.io/big/layer/blobs/{layer}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.content_length(), Some(48 << 20));
    // The first bytes arrive while the fetch runs; then the client goes away.
    let first = r.chunk().await.unwrap().unwrap();
    assert!(!first.is_empty());
    drop(r);
    let local: berth_storage::RepoName = "quay.io/big/layer".parse().unwrap();
    let d: berth_storage::Digest = layer.parse().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while s.state.store().stat_blob(&local, &d).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the cache fill did not complete"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = crate::support::get_bytes(
        &client(),
        s.url(&format!("/v2/quay.io/big/layer/blobs/{layer}")),
    )
    .await;
    assert_eq!(digest(&got), layer);
    assert_eq!(
        logged(dir.path(), "GET", &format!("/v2/big/layer/blobs/{layer}")),
        1
    );
    // Nothing is left in the spool.
    let spool = s.dir.path().join("proxy-spool");
    assert_eq!(std::fs::read_dir(spool).unwrap().count(), 0);
}

/// On a filesystem store, a cold blob's bytes are written once: clients read the store's own
/// file as it fills, with no spool copy beside it. The kernel counts the bytes the cache
/// process put in the page cache to be written; two copies (spool and store) would count
/// twice the blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_pull_through_a_cache_on_local_disk_writes_the_blob_once() {
    let dir = tempfile::tempdir().unwrap();
    let up = spawn_berth_with(&dir.path().join("upstream"), None);
    let size = 24 << 20;
    let image = Image::new(12, &[size]);
    image.push(&up.root(), "big/layer", "1", Auth::None).await;
    let config = format!(
        "[[proxy.upstream]]\nname = \"quay.io\"\nurl = \"{}\"\n",
        up.root()
    );
    let cache = spawn_berth_with(&dir.path().join("cache"), Some(&config));
    let layer = digest(&image.blobs[1]);
    let url = format!("{}/v2/quay.io/big/layer/blobs/{layer}", cache.root());
    let before = cache.write_bytes();
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let got = r.bytes().await.unwrap();
    assert_eq!(digest(&got), layer);
    let written = cache.write_bytes() - before;
    let size = size as u64;
    assert!(
        written >= size && written < size + size / 2,
        "the cache wrote {written} bytes for a blob of {size}"
    );
    // The blob is stored whole, and served from the store now.
    let again = crate::support::get_bytes(&client(), &url).await;
    assert_eq!(digest(&again), layer);
}

fn disk_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_cap_holds_under_churn_and_kept_images_stay_whole() {
    let dir = tempfile::tempdir().unwrap();
    let dist = spawn_distribution(dir.path());
    // Six images sharing a base layer, each with its own 1 MiB layer.
    let base = crate::support::noise(512 << 10, 999);
    let images: Vec<Image> = (0..6)
        .map(|i| {
            let mut img = Image::new(100 + i, &[1 << 20]);
            img.blobs.insert(1, base.clone());
            let m: Value = serde_json::from_str(&img.manifest).unwrap();
            let mut m = m;
            let layers = m["layers"].as_array_mut().unwrap();
            layers.insert(0, json!({"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": digest(&base), "size": base.len()}));
            img.manifest = m.to_string();
            img
        })
        .collect();
    for (i, img) in images.iter().enumerate() {
        img.push(&dist.root(), &format!("library/img{i}"), "1", Auth::None)
            .await;
    }
    let cap: u64 = (3 << 20) + (700 << 10);
    let s = cache(vec![upstream("docker.io", &dist.root(), |_| {})], |c| {
        c.proxy.max_size = Some(bytesize::ByteSize::b(cap));
    })
    .await;
    let proxy = s.state.registry.proxy().cloned().unwrap();
    let gc = berth_storage::GcPolicy {
        grace: Duration::ZERO,
        ..berth_storage::GcPolicy::default()
    };
    let objects = s.dir.path().join("objects");
    let mut evicted = 0;
    // Churn: every image in turn, img0 pulled again in between so it stays recent.
    for i in [0usize, 1, 2, 0, 3, 4, 0, 5] {
        images[i]
            .pull(&s.root(), &format!("docker.io/library/img{i}"), "1", "")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await; // distinct pull times (seconds)
        let r = s
            .state
            .store()
            .evict_cache(proxy.evict_policy())
            .await
            .unwrap();
        evicted += r.manifests;
        assert!(r.bytes_after <= cap, "{r:?}");
        // The collection a grace period later (here: two seconds, as if).
        let later = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            + 2;
        s.state.store().gc_as_of(&gc, false, later).await.unwrap();
        let on_disk = disk_bytes(&objects);
        assert!(
            on_disk <= cap + 4096,
            "{on_disk} bytes on disk over the {cap} cap"
        );
    }
    assert!(evicted >= 3, "only {evicted} manifests evicted");
    // With the upstream gone, whatever the cache kept pulls completely; the rest is gone.
    drop(dist);
    let mut kept = Vec::new();
    for (i, img) in images.iter().enumerate() {
        let local: berth_storage::RepoName = format!("docker.io/library/img{i}").parse().unwrap();
        let has = s
            .state
            .store()
            .get_manifest(&local, &berth_storage::Reference::Tag("1".parse().unwrap()))
            .await
            .is_ok();
        let pulled = img
            .pull(&s.root(), &format!("docker.io/library/img{i}"), "1", "")
            .await;
        assert_eq!(
            has,
            pulled.is_ok(),
            "img{i}: cached={has}, pull: {pulled:?}"
        );
        if has {
            kept.push(i);
        }
    }
    assert!(
        kept.contains(&0),
        "the most used image was evicted: kept {kept:?}"
    );
    assert!(
        kept.contains(&5),
        "the newest image was evicted: kept {kept:?}"
    );
    assert!(kept.len() < 6, "nothing was evicted: {kept:?}");
}

/// An upstream that starts answering 429 (with `Retry-After`) when told to: Docker Hub's
/// pull limit, on loopback.
async fn limited_upstream(
    image: &Image,
    limited: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::net::SocketAddr {
    use axum::extract::Path;
    use axum::http::{HeaderMap, StatusCode as S};
    use axum::response::IntoResponse;
    use std::sync::atomic::Ordering;
    let manifest = image.manifest.clone();
    let blobs: std::collections::HashMap<String, Vec<u8>> =
        image.blobs.iter().map(|b| (digest(b), b.clone())).collect();
    let lim = limited.clone();
    let app = axum::Router::new()
        .route(
            "/v2/rl/app/manifests/{reference}",
            axum::routing::get(move |Path(reference): Path<String>| {
                let (manifest, lim) = (manifest.clone(), lim.clone());
                async move {
                    if lim.load(Ordering::SeqCst) {
                        let mut h = HeaderMap::new();
                        h.insert("retry-after", "30".parse().unwrap());
                        return (
                            S::TOO_MANY_REQUESTS,
                            h,
                            "{\"errors\":[{\"code\":\"TOOMANYREQUESTS\"}]}".to_owned(),
                        )
                            .into_response();
                    }
                    if reference != "1" && reference != digest(manifest.as_bytes()) {
                        return S::NOT_FOUND.into_response();
                    }
                    let mut h = HeaderMap::new();
                    h.insert(
                        "content-type",
                        "application/vnd.docker.distribution.manifest.v2+json"
                            .parse()
                            .unwrap(),
                    );
                    h.insert(
                        "docker-content-digest",
                        digest(manifest.as_bytes()).parse().unwrap(),
                    );
                    h.insert("ratelimit-remaining", "42;w=21600".parse().unwrap());
                    (S::OK, h, manifest).into_response()
                }
            }),
        )
        .route(
            "/v2/rl/app/blobs/{d}",
            axum::routing::get(move |Path(d): Path<String>| {
                let b = blobs.get(&d).cloned();
                async move { b.map_or(S::NOT_FOUND.into_response(), |b| b.into_response()) }
            }),
        );
    fake_upstream(app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_upstreams_serve_the_cache_within_max_stale() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let image = Image::new(31, &[50_000]);
    let limited = std::sync::Arc::new(AtomicBool::new(false));
    let addr = limited_upstream(&image, limited.clone()).await;
    let up = |stale: Duration| {
        upstream("rl.example", &format!("http://{addr}"), move |u| {
            u.tag_ttl = Duration::ZERO;
            u.max_stale = Some(stale);
        })
    };
    let lenient = cache(vec![up(Duration::from_secs(3600))], |_| {}).await;
    let strict = cache(vec![up(Duration::ZERO)], |_| {}).await;
    for s in [&lenient, &strict] {
        image
            .pull(&s.root(), "rl/app", "1", "?ns=rl.example")
            .await
            .unwrap();
    }
    limited.store(true, Ordering::SeqCst);
    // Within max_stale the cached tag is served while the upstream says 429...
    image
        .pull(&lenient.root(), "rl/app", "1", "?ns=rl.example")
        .await
        .unwrap();
    // ... past it, and for what was never cached, the 429 comes through with its Retry-After.
    for (s, path) in [
        (&strict, "/v2/rl/app/manifests/1?ns=rl.example"),
        (&lenient, "/v2/rl/app/manifests/2?ns=rl.example"),
    ] {
        let r = client().get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "{path}");
        assert_eq!(r.headers()["retry-after"], "30");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["errors"][0]["code"], "TOOMANYREQUESTS");
    }
    // By digest, cached content needs no upstream at all.
    let r = client()
        .get(strict.url(&format!(
            "/v2/rl/app/manifests/{}?ns=rl.example",
            image.digest()
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Docker Hub's remaining-pulls header shows up as a metric.
    let m = client()
        .get(lenient.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.lines().any(
            |l| l.starts_with("berth_proxy_upstream_ratelimit_remaining") && l.ends_with(" 42")
        ),
        "{m}"
    );
}

/// Waits up to `within` for the cache's repository `local` to hold every blob of `image`;
/// how many it holds at the end.
pub(crate) async fn cached_blobs(
    s: &TestServer,
    local: &str,
    image: &Image,
    within: Duration,
) -> usize {
    let local: berth_storage::RepoName = local.parse().unwrap();
    let deadline = std::time::Instant::now() + within;
    loop {
        let mut n = 0;
        for b in &image.blobs {
            let d: berth_storage::Digest = digest(b).parse().unwrap();
            if s.state.store().stat_blob(&local, &d).await.is_ok() {
                n += 1;
            }
        }
        if n == image.blobs.len() || std::time::Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_get_the_cache_fetched_reads_the_images_layers_ahead_and_a_head_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let dist = spawn_distribution(dir.path());
    let read = Image::new(31, &[300 << 10, 200 << 10, 100 << 10]);
    read.push(&dist.root(), "ahead/read", "1", Auth::None).await;
    let headed = Image::new(32, &[100 << 10]);
    headed
        .push(&dist.root(), "ahead/head", "1", Auth::None)
        .await;
    let s = cache(vec![upstream("quay.io", &dist.root(), |_| {})], |_| {}).await;

    // A GET of the manifest alone: every blob arrives in the cache without being asked for,
    // each fetched from the upstream once.
    let r = client()
        .get(s.url("/v2/quay.io/ahead/read/manifests/1"))
        .header("Accept", read.media_type)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let n = cached_blobs(&s, "quay.io/ahead/read", &read, Duration::from_secs(20)).await;
    assert_eq!(n, read.blobs.len(), "blobs read ahead into the cache");
    for b in &read.blobs {
        let path = format!("/v2/ahead/read/blobs/{}", digest(b));
        assert_eq!(logged(dir.path(), "GET", &path), 1, "{path}");
        // The client's own GET is then a hit.
        let got = crate::support::get_bytes(
            &client(),
            s.url(&format!("/v2/quay.io/ahead/read/blobs/{}", digest(b))),
        )
        .await;
        assert_eq!(digest(&got), digest(b));
        assert_eq!(logged(dir.path(), "GET", &path), 1, "{path} again");
    }

    // A HEAD (how containerd checks a tag) reads nothing ahead.
    let upstream_dir = dir.path();
    let reads_nothing_ahead = |server: &TestServer, method: Method| {
        let r = client()
            .request(method, server.url("/v2/quay.io/ahead/head/manifests/1"))
            .header("Accept", headed.media_type)
            .send();
        async move {
            assert_eq!(r.await.unwrap().status(), StatusCode::OK);
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert_eq!(logged(upstream_dir, "GET", "/v2/ahead/head/blobs/"), 0);
        }
    };
    reads_nothing_ahead(&s, Method::HEAD).await;

    // Nor does a GET from a cache with `read_ahead = false`.
    let off = cache(
        vec![upstream("quay.io", &dist.root(), |u| u.read_ahead = false)],
        |_| {},
    )
    .await;
    reads_nothing_ahead(&off, Method::GET).await;
    assert_eq!(
        cached_blobs(&off, "quay.io/ahead/head", &headed, Duration::ZERO).await,
        0
    );
}
