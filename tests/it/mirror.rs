//! One Berth as mirror and private registry (issue 15): local pushes beside a default upstream
//! never reach it and never depend on it; upstreams that fail (down, hung, refusing our
//! credentials) cost clients nothing beyond one timeout; several URLs per upstream; prefetch;
//! referrers of cached content. Upstreams are Distribution (behind token auth where it matters)
//! and Berth, on loopback; requests are counted at the upstream (its access log, its token
//! server's log), never inside Berth.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::proxy::{cache, upstream};
use crate::support::{Auth, Image, Push};
use crate::support::{
    DistributionAuth, Proc, TestServer, client, digest, requests_logged, spawn_distribution,
    spawn_distribution_with, start_token_server, token_requests,
};

/// Distribution behind token auth (a token server of our own), in `dir`.
struct TokenUpstream {
    registry: Proc,
    tokens: Proc,
    realm: String,
}

impl TokenUpstream {
    fn start(dir: &std::path::Path) -> Self {
        let (tokens, realm, cert) = start_token_server(dir);
        let registry = spawn_distribution_with(
            dir,
            Some(DistributionAuth::Token {
                realm: &realm,
                service: "berth-test",
                cert: &cert,
            }),
        );
        Self {
            registry,
            tokens,
            realm,
        }
    }

    /// Pushes `image` as `repo:tag` with a token for it.
    async fn push(&self, image: &Image, repo: &str, tag: &str) {
        let v: Value = client()
            .get(&self.realm)
            .query(&[
                ("service", "berth-test"),
                ("scope", &format!("repository:{repo}:pull,push")),
            ])
            .basic_auth("tester", Some("s3cret"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = v["token"].as_str().unwrap();
        image
            .push(&self.registry.root(), repo, tag, Auth::Bearer(token))
            .await;
    }

    fn pause(&self) {
        self.registry.pause();
        self.tokens.pause();
    }

    fn resume(&self) {
        self.registry.resume();
        self.tokens.resume();
    }
}

/// Every request the upstream of `dir` saw: registry and token service.
fn upstream_requests(dir: &std::path::Path) -> usize {
    let (granted, refused) = token_requests(dir);
    requests_logged(dir) + granted + refused
}

/// The upstream's count once it has settled: Distribution writes a request's access-log line
/// after the response, so the last line of a pull may land after the client is done.
async fn settled_upstream_requests(dir: &std::path::Path) -> usize {
    let mut n = upstream_requests(dir);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = upstream_requests(dir);
        if now == n {
            return n;
        }
        n = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_pushes_beside_a_default_upstream_never_reach_it() {
    let dir = tempfile::tempdir().unwrap();
    let up = TokenUpstream::start(dir.path());
    let base = Image::new(41, &[300_000, 20_000]);
    up.push(&base, "library/base", "1").await;
    let held = Image::new(42, &[10_000]);
    up.push(&held, "team/held", "1").await;
    let s = cache(
        vec![upstream("docker.io", &up.registry.root(), |u| {
            u.default = true;
            u.username = Some("tester".into());
            u.password = Some("s3cret".into());
            u.timeout = Duration::from_secs(2);
        })],
        |_| {},
    )
    .await;
    // The base image and team/held are pulled through the mirror: their layers are cached.
    base.pull(&s.root(), "library/base", "1", "").await.unwrap();
    held.pull(&s.root(), "team/held", "1", "").await.unwrap();
    let before = settled_upstream_requests(dir.path()).await;

    // (a) An image built on the cached base, pushed to a new name.
    let app = base.on_top(43, 5_000);
    app.push_like_docker(&s.root(), "team/app", "1")
        .await
        .unwrap();
    // (b) A new image pushed to a name the upstream holds too (and the cache has pulled).
    let mine = held.on_top(44, 6_000);
    mine.push_like_docker(&s.root(), "team/held", "2")
        .await
        .unwrap();
    // ... and one whose layers only the upstream's copy of the name has, under its tag.
    held.push_like_docker(&s.root(), "team/held", "1")
        .await
        .unwrap();
    assert_eq!(
        upstream_requests(dir.path()),
        before,
        "a local push reached the upstream"
    );
    // (c) With the upstream hung, a new image pushes at full speed.
    up.pause();
    let offline = Image::new(45, &[7_000]);
    let start = Instant::now();
    offline
        .push_like_docker(&s.root(), "team/offline", "1")
        .await
        .unwrap();
    let took = start.elapsed();
    up.resume();
    assert!(
        took < Duration::from_secs(1),
        "a push waited on a hung upstream: {took:?}"
    );
    assert_eq!(upstream_requests(dir.path()), before);

    // Everything pulls back with the pushed digests, from the local repositories.
    for (repo, tag, image) in [
        ("team/app", "1", &app),
        ("team/held", "2", &mine),
        ("team/held", "1", &held),
        ("team/offline", "1", &offline),
    ] {
        image
            .pull(&s.root(), repo, tag, "")
            .await
            .unwrap_or_else(|e| panic!("{repo}:{tag}: {e}"));
    }
    // Nothing was linked into the cache namespace for the local names.
    let v: Value = client()
        .get(s.url("/v2/_catalog"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let repos: Vec<&str> = v["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(!repos.contains(&"docker.io/team/app"), "{repos:?}");
    assert!(!repos.contains(&"docker.io/team/offline"), "{repos:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upstream_credentials_are_an_operator_error_and_are_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let up = TokenUpstream::start(dir.path());
    let image = Image::new(51, &[1_000]);
    up.push(&image, "library/app", "1").await;
    let (_, refused_before) = token_requests(dir.path());
    let s = cache(
        vec![upstream("docker.io", &up.registry.root(), |u| {
            u.default = true;
            u.username = Some("tester".into());
            u.password = Some("wrong".into());
        })],
        |_| {},
    )
    .await;
    for i in 0..20 {
        let r = client()
            .get(s.url("/v2/library/app/manifests/1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY, "pull {i}");
        let v: Value = r.json().await.unwrap();
        let message = v["errors"][0]["message"].as_str().unwrap_or_default();
        assert_eq!(v["errors"][0]["code"], "UNAVAILABLE", "{v}");
        assert!(
            message.contains("docker.io") && message.contains("refused the credentials"),
            "{message}"
        );
    }
    let (_, refused) = token_requests(dir.path());
    assert!(
        refused - refused_before <= 2,
        "{} failed logins for 20 pulls",
        refused - refused_before
    );
    let m = client()
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("berth_proxy_upstream_credentials_refused_total"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_upstream_costs_one_timeout_then_cached_tags_are_served_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let dist = spawn_distribution(dir.path());
    let image = Image::new(61, &[100_000]);
    image
        .push(&dist.root(), "library/app", "1", Auth::None)
        .await;
    let s = cache(
        vec![upstream("docker.io", &dist.root(), |u| {
            u.tag_ttl = Duration::ZERO;
            u.timeout = Duration::from_secs(2);
        })],
        |_| {},
    )
    .await;
    image
        .pull(&s.root(), "docker.io/library/app", "1", "")
        .await
        .unwrap();
    dist.pause();
    // The first pull finds out, waiting one timeout ...
    let start = Instant::now();
    image
        .pull(&s.root(), "docker.io/library/app", "1", "")
        .await
        .unwrap();
    let first = start.elapsed();
    // ... then every pull is answered from the cache at once, probes running behind.
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let start = Instant::now();
        image
            .pull(&s.root(), "docker.io/library/app", "1", "")
            .await
            .unwrap();
        slowest = slowest.max(start.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Content never cached fails fast too.
    let start = Instant::now();
    let r = client()
        .get(s.url("/v2/docker.io/library/app/manifests/2"))
        .send()
        .await
        .unwrap();
    let uncached = start.elapsed();
    dist.resume();
    assert!(first >= Duration::from_secs(1), "first pull took {first:?}");
    assert!(
        slowest < Duration::from_secs(1),
        "a pull took {slowest:?} with the upstream hung"
    );
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(uncached < Duration::from_secs(1), "{uncached:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_urls_the_first_hung_pulls_go_through_the_second() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (first, second) = (spawn_distribution(d1.path()), spawn_distribution(d2.path()));
    let image = Image::new(71, &[50_000]);
    for d in [&first, &second] {
        image.push(&d.root(), "org/app", "1", Auth::None).await;
    }
    first.pause();
    let s = cache(
        vec![upstream("ghcr.io", "http://unused", |u| {
            u.url = None;
            u.urls = vec![first.root(), second.root()];
            u.timeout = Duration::from_secs(1);
        })],
        |_| {},
    )
    .await;
    let seen = requests_logged(d2.path());
    for i in 0..5 {
        let start = Instant::now();
        image
            .pull(&s.root(), "org/app", "1", "?ns=ghcr.io")
            .await
            .unwrap_or_else(|e| panic!("pull {i}: {e}"));
        if i > 0 {
            // The hung endpoint is skipped once it failed.
            assert!(start.elapsed() < Duration::from_secs(1), "pull {i}");
        }
    }
    first.resume();
    assert!(
        requests_logged(d2.path()) > seen,
        "the second url served nothing"
    );
}

/// An upstream with the three images the prefetch tests list (two through a tag pattern),
/// and one they do not.
async fn prefetch_upstream(dist: &Proc) -> Vec<(&'static str, &'static str, Image)> {
    let images = vec![
        ("library/one", "1", Image::new(81, &[40_000])),
        ("library/two", "1.0", Image::new(82, &[30_000])),
        ("library/two", "1.1", Image::new(83, &[20_000])),
        ("library/two", "2.0", Image::new(84, &[10_000])),
    ];
    for (repo, tag, image) in &images {
        image.push(&dist.root(), repo, tag, Auth::None).await;
    }
    images
}

const PREFETCH: [&str; 2] = ["library/one:1", "library/two:1.*"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetched_images_pull_while_the_upstream_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let dist = spawn_distribution(dir.path());
    let images = prefetch_upstream(&dist).await;
    // The schedule's first run starts with the server.
    let s = cache(
        vec![upstream("docker.io", &dist.root(), |u| {
            u.prefetch = PREFETCH.iter().map(|p| (*p).to_owned()).collect();
            u.timeout = Duration::from_secs(2);
        })],
        |_| {},
    )
    .await;
    let store = s.state.store().clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    let warm = |repo: &'static str, image: &Image| {
        let (store, d) = (store.clone(), image.blobs.last().map(|b| digest(b)));
        async move {
            let local: berth_storage::RepoName = format!("docker.io/{repo}").parse().unwrap();
            let d: berth_storage::Digest = d.unwrap().parse().unwrap();
            store.stat_blob(&local, &d).await.is_ok()
        }
    };
    for (repo, _, image) in &images[..3] {
        while !warm(repo, image).await {
            assert!(Instant::now() < deadline, "{repo} was not prefetched");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    drop(dist);
    for (repo, tag, image) in &images[..3] {
        image
            .pull(&s.root(), &format!("docker.io/{repo}"), tag, "")
            .await
            .unwrap_or_else(|e| panic!("{repo}:{tag}: {e}"));
    }
    // What the list does not name was not fetched.
    let r = client()
        .get(s.url("/v2/docker.io/library/two/manifests/2.0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_prefetch_fills_the_cache_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("upstream")).unwrap();
    let dist = spawn_distribution(&dir.path().join("upstream"));
    let images = prefetch_upstream(&dist).await;
    let data = dir.path().join("data");
    let config = format!(
        "[[proxy.upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ntimeout = \"2s\"\nprefetch = {}\n",
        dist.root(),
        json!(PREFETCH)
    );
    let file = dir.path().join("mirror.toml");
    std::fs::write(&file, &config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["prefetch", "--data"])
        .arg(&data)
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for image in ["library/one:1", "library/two:1.0", "library/two:1.1"] {
        assert!(
            stdout.contains(&format!("docker.io {image} sha256:")),
            "no progress line for {image}:\n{stdout}"
        );
    }
    assert!(stdout.contains("prefetch: 3 images, 0 failed"), "{stdout}");
    // The upstream goes away before any client pulls; the mirror starts and serves all three.
    drop(dist);
    let mirror = crate::support::spawn_berth_with(&data, Some(&config));
    for (repo, tag, image) in &images[..3] {
        image
            .pull(&mirror.root(), &format!("docker.io/{repo}"), tag, "")
            .await
            .unwrap_or_else(|e| panic!("{repo}:{tag}: {e}"));
    }
}

/// A signature-like referrer of `subject` (an OCI manifest with `subject` and an
/// `artifactType`).
fn referrer(subject: &Image, seed: u64) -> (String, Vec<Vec<u8>>) {
    let payload = format!("signature {seed}").into_bytes();
    let m = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.dev.berth.signature",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest(b"{}"), "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": digest(&payload), "size": payload.len()}],
        "subject": {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "digest": subject.digest(), "size": subject.manifest.len()},
    })
    .to_string();
    (m, vec![b"{}".to_vec(), payload])
}

async fn push_referrer(root: &str, repo: &str, subject: &Image, seed: u64) -> String {
    let (m, blobs) = referrer(subject, seed);
    let image = Image::with_manifest(m, "application/vnd.oci.image.manifest.v1+json", blobs);
    let d = image.digest();
    image
        .try_push(root, repo, &d, Push::default())
        .await
        .unwrap()
}

async fn referrers_via(s: &TestServer, path: &str) -> Vec<String> {
    let v: Value = client()
        .get(s.url(path))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["digest"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_of_cached_content_are_cached_from_the_upstream() {
    // An upstream with the referrers API (Berth) ...
    let berth_up = TestServer::start().await;
    let image = Image::new(91, &[5_000]);
    image
        .push(&berth_up.root(), "org/signed", "1", Auth::None)
        .await;
    let sig = push_referrer(&berth_up.root(), "org/signed", &image, 1).await;
    // ... and one without it (Distribution 2.8), which lists referrers under the
    // `sha256-<hex>` tag.
    let dir = tempfile::tempdir().unwrap();
    let dist = spawn_distribution(dir.path());
    image
        .push(&dist.root(), "org/signed", "1", Auth::None)
        .await;
    let sig2 = push_referrer(&dist.root(), "org/signed", &image, 2).await;
    let (m2, _) = referrer(&image, 2);
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sig2, "size": m2.len(), "artifactType": "application/vnd.dev.berth.signature"}],
    })
    .to_string();
    let fallback_tag = image.digest().replace(':', "-");
    let r = client()
        .put(format!(
            "{}/v2/org/signed/manifests/{fallback_tag}",
            dist.root()
        ))
        .header("content-type", "application/vnd.oci.image.index.v1+json")
        .body(index)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    let s = cache(
        vec![
            upstream("ghcr.io", &berth_up.root(), |u| {
                u.timeout = Duration::from_secs(2)
            }),
            upstream("quay.io", &dist.root(), |u| {
                u.timeout = Duration::from_secs(2)
            }),
        ],
        |_| {},
    )
    .await;
    let subject = image.digest();
    for (prefix, want) in [("ghcr.io", &sig), ("quay.io", &sig2)] {
        image
            .pull(&s.root(), &format!("{prefix}/org/signed"), "1", "")
            .await
            .unwrap();
        let got = referrers_via(&s, &format!("/v2/{prefix}/org/signed/referrers/{subject}")).await;
        assert_eq!(&got, std::slice::from_ref(want), "{prefix}");
    }
    // With the upstreams gone, the cached referrers still answer, and the signature pulls.
    drop(berth_up);
    drop(dist);
    for (prefix, want) in [("ghcr.io", &sig), ("quay.io", &sig2)] {
        let got = referrers_via(&s, &format!("/v2/{prefix}/org/signed/referrers/{subject}")).await;
        assert_eq!(
            &got,
            std::slice::from_ref(want),
            "{prefix} after the upstream went away"
        );
        let r = client()
            .get(s.url(&format!("/v2/{prefix}/org/signed/manifests/{want}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{prefix}");
    }
}
