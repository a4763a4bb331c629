//! Endpoint and error-path tests over a real socket, beyond what the conformance runner checks.

use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{DOCKER, Image, TestServer, digest};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

struct T {
    s: TestServer,
    c: Client,
}

impl T {
    async fn new() -> Self {
        Self {
            s: TestServer::start().await,
            c: crate::support::client(),
        }
    }

    async fn req(
        &self,
        m: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut r = self.c.request(m, self.s.url(path));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        if let Some(b) = body {
            r = r.body(b);
        }
        r.send().await.expect("request")
    }

    async fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let d = digest(data);
        let r = self
            .req(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
                Some(data.to_vec()),
                &[],
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
        d
    }

    /// Pushes a one-layer image; returns (manifest bytes, digest).
    async fn push_image(&self, repo: &str, tag: &str, seed: &str) -> (Vec<u8>, String) {
        let image = Image::oci(vec![
            format!("{{\"seed\":\"{seed}\"}}").into_bytes(),
            format!("layer-{seed}").into_bytes(),
        ]);
        let d = image
            .try_push(&self.s.root(), repo, tag, DOCKER)
            .await
            .unwrap();
        (image.manifest.into_bytes(), d)
    }
}

async fn code(r: reqwest::Response) -> (StatusCode, String) {
    let s = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    (s, v["errors"][0]["code"].as_str().unwrap_or("").to_owned())
}

#[tokio::test]
async fn every_answer_carries_the_api_version_header() {
    let t = T::new().await;
    for (m, p) in [
        (Method::GET, "/v2/"),
        (Method::GET, "/v2"),
        (Method::GET, "/v2/nope/tags/list"),
        (Method::GET, "/v3/whatever"),
        (Method::PUT, "/v2/a/blobs/uploads/unknown?digest=sha256:00"),
    ] {
        let r = t.req(m.clone(), p, None, &[]).await;
        assert_eq!(
            r.headers()
                .get("docker-distribution-api-version")
                .and_then(|v| v.to_str().ok()),
            Some("registry/2.0"),
            "{m} {p}"
        );
    }
    assert_eq!(
        t.req(Method::GET, "/v2/", None, &[]).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn invalid_names_tags_and_digests_are_rejected_with_spec_codes() {
    let t = T::new().await;
    for name in ["UPPER", "a..b", "a%2Fb", "-x", &"a".repeat(256)] {
        let r = t
            .req(
                Method::POST,
                &format!("/v2/{name}/blobs/uploads/"),
                None,
                &[],
            )
            .await;
        assert_eq!(
            code(r).await,
            (StatusCode::BAD_REQUEST, "NAME_INVALID".into()),
            "{name}"
        );
    }
    let r = t
        .req(
            Method::PUT,
            "/v2/a/manifests/bad:tag:x",
            Some(b"{}".to_vec()),
            &[("content-type", OCI_MANIFEST)],
        )
        .await;
    assert_eq!(
        code(r).await,
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID".into())
    );
    let r = t
        .req(
            Method::PUT,
            "/v2/a/manifests/.bad",
            Some(b"{}".to_vec()),
            &[("content-type", OCI_MANIFEST)],
        )
        .await;
    assert_eq!(
        code(r).await,
        (StatusCode::BAD_REQUEST, "TAG_INVALID".into())
    );
    let r = t.req(Method::GET, "/v2/a/blobs/sha256:zz", None, &[]).await;
    assert_eq!(
        code(r).await,
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID".into())
    );
    let r = t
        .req(Method::GET, "/v2/a/referrers/md5:00", None, &[])
        .await;
    assert_eq!(
        code(r).await,
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID".into())
    );
    let r = t.req(Method::POST, "/v2/a/blobs/uploads/", None, &[]).await;
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    let r = t.req(Method::PUT, &loc, None, &[]).await;
    assert_eq!(
        code(r).await,
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID".into()),
        "PUT without digest"
    );
}

#[tokio::test]
async fn blobs_are_visible_only_in_repositories_that_hold_them() {
    let t = T::new().await;
    let d = t.push_blob("team/private", b"secret layer").await;
    let r = t
        .req(Method::GET, &format!("/v2/other/blobs/{d}"), None, &[])
        .await;
    assert_eq!(
        code(r).await,
        (StatusCode::NOT_FOUND, "BLOB_UNKNOWN".into())
    );
    // A mount from a repository that does not hold it opens a session instead.
    let r = t
        .req(
            Method::POST,
            &format!("/v2/third/blobs/uploads/?mount={d}&from=other"),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = t
        .req(
            Method::POST,
            &format!("/v2/third/blobs/uploads/?mount={d}&from=team/private"),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        t.req(Method::GET, &format!("/v2/third/blobs/{d}"), None, &[])
            .await
            .status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn anonymous_mount_can_be_switched_off() {
    let s = TestServer::start_with(|c| c.registry.anonymous_mount = false).await;
    let t = T {
        s,
        c: crate::support::client(),
    };
    let d = t.push_blob("a", b"x").await;
    let r = t
        .req(
            Method::POST,
            &format!("/v2/b/blobs/uploads/?mount={d}"),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn chunk_errors() {
    let t = T::new().await;
    let r = t.req(Method::POST, "/v2/a/blobs/uploads/", None, &[]).await;
    assert_eq!(r.headers()["range"], "0-0");
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    // Content-Length disagreeing with Content-Range.
    let r = t
        .req(
            Method::PATCH,
            &loc,
            Some(vec![1; 10]),
            &[("content-range", "0-4")],
        )
        .await;
    assert_eq!(
        code(r).await,
        (StatusCode::BAD_REQUEST, "SIZE_INVALID".into())
    );
    // Backwards range.
    let r = t
        .req(
            Method::PATCH,
            &loc,
            Some(vec![1; 10]),
            &[("content-range", "9-0")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    // The session is intact and still at 0.
    let r = t.req(Method::GET, &loc, None, &[]).await;
    assert_eq!(
        (r.status(), r.headers()["range"].to_str().unwrap()),
        (StatusCode::NO_CONTENT, "0-0")
    );
    // A session used under another repository is unknown there.
    let other = loc.replace("/v2/a/", "/v2/b/");
    let r = t.req(Method::PATCH, &other, Some(vec![1; 3]), &[]).await;
    assert_eq!(
        code(r).await,
        (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN".into())
    );
    // A finished session is gone.
    let data = vec![7u8; 100];
    t.req(Method::PATCH, &loc, Some(data.clone()), &[]).await;
    let r = t
        .req(
            Method::PUT,
            &format!("{loc}?digest={}", digest(&data)),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = t.req(Method::GET, &loc, None, &[]).await;
    assert_eq!(
        code(r).await,
        (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN".into())
    );
}

#[tokio::test]
async fn concurrent_chunks_at_the_same_offset_one_wins() {
    let t = T::new().await;
    let r = t.req(Method::POST, "/v2/a/blobs/uploads/", None, &[]).await;
    let loc = t.s.url(r.headers()["location"].to_str().unwrap());
    let send = |b: u8| {
        let c = t.c.clone();
        let loc = loc.clone();
        async move {
            c.patch(&loc)
                .header("content-range", "0-65535")
                .body(vec![b; 65536])
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let (a, b) = tokio::join!(send(1), send(2));
    let mut got = [a.as_u16(), b.as_u16()];
    got.sort();
    assert_eq!(got, [202, 416]);
    let r = t.c.get(&loc).send().await.unwrap();
    assert_eq!(r.headers()["range"], "0-65535");
}

#[tokio::test]
async fn a_digest_mismatch_leaves_nothing_behind() {
    let t = T::new().await;
    let wrong = digest(b"something else");
    let r = t
        .req(
            Method::POST,
            &format!("/v2/a/blobs/uploads/?digest={wrong}"),
            Some(vec![5; 5000]),
            &[],
        )
        .await;
    assert_eq!(
        code(r).await,
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID".into())
    );
    assert_eq!(
        t.req(Method::HEAD, &format!("/v2/a/blobs/{wrong}"), None, &[])
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    let objects = t.s.dir.path().join("objects");
    let files: Vec<_> = walk(&objects);
    assert!(files.is_empty(), "objects left behind: {files:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p))
            } else {
                out.push(p)
            }
        }
    }
    out
}

#[tokio::test]
async fn sha512_blobs_and_manifests() {
    use sha2::Digest as _;
    let t = T::new().await;
    let data = b"sha512 content".to_vec();
    let d = format!("sha512:{}", hex::encode(sha2::Sha512::digest(&data)));
    let r = t.req(Method::POST, "/v2/a/blobs/uploads/", None, &[]).await;
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    t.req(
        Method::PATCH,
        &loc,
        Some(data[..5].to_vec()),
        &[("content-range", "0-4")],
    )
    .await;
    let r = t
        .req(
            Method::PUT,
            &format!("{loc}?digest={d}"),
            Some(data[5..].to_vec()),
            &[],
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = t
        .req(Method::GET, &format!("/v2/a/blobs/{d}"), None, &[])
        .await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);
    let m = serde_json::to_vec(&json!({"schemaVersion":2,"mediaType":OCI_INDEX,"manifests":[]}))
        .unwrap();
    let md = format!("sha512:{}", hex::encode(sha2::Sha512::digest(&m)));
    let r = t
        .req(
            Method::PUT,
            &format!("/v2/a/manifests/{md}?tag=x512"),
            Some(m.clone()),
            &[("content-type", OCI_INDEX)],
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["docker-content-digest"].to_str().unwrap(), md);
    let r = t.req(Method::GET, "/v2/a/manifests/x512", None, &[]).await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), &m[..]);
}

#[tokio::test]
async fn manifest_rules() {
    let t = T::new().await;
    let (m, d) = t.push_image("app", "v1", "one").await;
    // Several tags in one push by digest.
    let r = t
        .req(
            Method::PUT,
            &format!("/v2/app/manifests/{d}?tag=a&tag=b&tag=c"),
            Some(m.clone()),
            &[("content-type", OCI_MANIFEST)],
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let tags: Vec<_> = r
        .headers()
        .get_all("oci-tag")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(tags, ["a", "b", "c"]);
    let list: Value = t
        .req(Method::GET, "/v2/app/tags/list", None, &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["tags"], json!(["a", "b", "c", "v1"]));
    // HEAD answers the same headers as GET, without a body.
    let r = t.req(Method::HEAD, "/v2/app/manifests/v1", None, &[]).await;
    assert_eq!(
        r.headers()["content-length"].to_str().unwrap(),
        m.len().to_string()
    );
    assert_eq!(r.headers()["docker-content-digest"].to_str().unwrap(), d);
    assert_eq!(r.headers()["content-type"], OCI_MANIFEST);
    // Conditional GET.
    let etag = format!("\"{d}\"");
    let r = t
        .req(
            Method::GET,
            "/v2/app/manifests/v1",
            None,
            &[("if-none-match", &etag)],
        )
        .await;
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    // Schema 1, unknown types and mismatched media types are refused.
    for (ct, body) in [
        (
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            r#"{"schemaVersion":1}"#.to_owned(),
        ),
        (
            "application/x-other",
            r#"{"schemaVersion":2,"layers":[]}"#.to_owned(),
        ),
        (
            "application/vnd.docker.distribution.manifest.v2+json",
            String::from_utf8(m.clone()).unwrap(),
        ),
        (OCI_MANIFEST, "[1,2]".to_owned()),
    ] {
        let r = t
            .req(
                Method::PUT,
                "/v2/app/manifests/bad",
                Some(body.into_bytes()),
                &[("content-type", ct)],
            )
            .await;
        assert_eq!(
            code(r).await,
            (StatusCode::BAD_REQUEST, "MANIFEST_INVALID".into()),
            "{ct}"
        );
    }
    // An index whose child is missing.
    let idx = serde_json::to_vec(&json!({"schemaVersion":2,"mediaType":OCI_INDEX,"manifests":[{"mediaType":OCI_MANIFEST,"digest":digest(b"nothing"),"size":7}]})).unwrap();
    let r = t
        .req(
            Method::PUT,
            "/v2/app/manifests/idx",
            Some(idx),
            &[("content-type", OCI_INDEX)],
        )
        .await;
    assert_eq!(
        code(r).await,
        (StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN".into())
    );
    // Tag moves keep the old manifest by digest.
    let (_, d2) = t.push_image("app", "v1", "two").await;
    assert_ne!(d, d2);
    let r = t.req(Method::GET, "/v2/app/manifests/v1", None, &[]).await;
    assert_eq!(r.headers()["docker-content-digest"].to_str().unwrap(), d2);
    assert_eq!(
        t.req(Method::GET, &format!("/v2/app/manifests/{d}"), None, &[])
            .await
            .status(),
        StatusCode::OK
    );
    // Deleting by digest removes its tags.
    assert_eq!(
        t.req(Method::DELETE, &format!("/v2/app/manifests/{d}"), None, &[])
            .await
            .status(),
        StatusCode::ACCEPTED
    );
    let list: Value = t
        .req(Method::GET, "/v2/app/tags/list", None, &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["tags"], json!(["v1"]));
    let r = t
        .req(Method::DELETE, "/v2/app/manifests/nope", None, &[])
        .await;
    assert_eq!(
        code(r).await,
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN".into())
    );
}

#[tokio::test]
async fn listings() {
    let t = T::new().await;
    let r = t.req(Method::GET, "/v2/none/tags/list", None, &[]).await;
    assert_eq!(
        code(r).await,
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN".into())
    );
    for n in ["-1", "x"] {
        let r = t
            .req(Method::GET, &format!("/v2/_catalog?n={n}"), None, &[])
            .await;
        assert_eq!(
            code(r).await,
            (StatusCode::BAD_REQUEST, "PAGINATION_NUMBER_INVALID".into())
        );
    }
    for repo in ["b", "a", "c/d"] {
        t.push_image(repo, "t", repo).await;
    }
    let r = t.req(Method::GET, "/v2/_catalog?n=2", None, &[]).await;
    assert_eq!(
        r.headers()["link"],
        "</v2/_catalog?last=b&n=2>; rel=\"next\""
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["repositories"], json!(["a", "b"]));
    let v: Value = t
        .req(Method::GET, "/v2/_catalog?last=b&n=2", None, &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["repositories"], json!(["c/d"]));
    let v: Value = t
        .req(Method::GET, "/v2/_catalog?n=0", None, &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["repositories"], json!([]));
    // Referrers of an unknown repository: an empty index, not an error.
    let r = t
        .req(
            Method::GET,
            &format!("/v2/ghost/referrers/{}", digest(b"x")),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
    assert!(r.headers().get("oci-filters-applied").is_none());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["manifests"], json!([]));
}

#[tokio::test]
async fn deletes_can_be_disabled() {
    let s = TestServer::start_with(|c| c.registry.delete_enabled = false).await;
    let t = T {
        s,
        c: crate::support::client(),
    };
    let (_, d) = t.push_image("a", "t", "x").await;
    let r = t
        .req(Method::DELETE, &format!("/v2/a/manifests/{d}"), None, &[])
        .await;
    assert_eq!(
        code(r).await,
        (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED".into())
    );
    assert_eq!(
        t.req(Method::GET, "/v2/a/manifests/t", None, &[])
            .await
            .status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn health_endpoints() {
    let t = T::new().await;
    assert_eq!(
        t.req(Method::GET, "/livez", None, &[]).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        t.req(Method::GET, "/readyz", None, &[]).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn metrics_count_requests_by_endpoint() {
    let t = T::new().await;
    let d = t.push_blob("m", b"metered").await;
    t.req(Method::GET, &format!("/v2/m/blobs/{d}"), None, &[])
        .await;
    t.req(Method::POST, "/v2/m/blobs/uploads/", None, &[]).await;
    let r = t.req(Method::GET, "/metrics", None, &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    for want in [
        "berth_requests_total{endpoint=\"blob\",method=\"GET\",status=\"200\"}",
        "berth_requests_total{endpoint=\"uploads\",method=\"POST\",status=\"201\"}",
        "berth_request_duration_seconds_bucket{endpoint=\"blob\",method=\"GET\"",
        "berth_bytes_received_total",
        "berth_bytes_sent_total",
        "berth_uploads_in_progress",
    ] {
        assert!(text.contains(want), "{want} missing from:\n{text}");
    }
}

/// Regression: concurrent uploads once raced on creating and removing per-session directories
/// on local disk (500 "Unable to create dir").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_uploads_all_commit() {
    let t = T::new().await;
    let mut tasks = Vec::new();
    for w in 0..16u32 {
        let (c, root) = (t.c.clone(), t.s.root());
        tasks.push(tokio::spawn(async move {
            for i in 0..25u32 {
                let data = format!("worker {w} blob {i}").into_bytes();
                let d = digest(&data);
                let r = c
                    .post(format!("{root}/v2/busy/blobs/uploads/"))
                    .send()
                    .await
                    .unwrap();
                let loc = r.headers()["location"].to_str().unwrap().to_owned();
                let r = c
                    .put(format!("{root}{loc}?digest={d}"))
                    .body(data)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::CREATED, "{:?}", r.text().await);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// Issue 20: small answers on a kept-alive connection must not wait for the client's delayed
/// ACK (TCP_NODELAY on accepted sockets). A stall shows as a median near 40 ms.
#[tokio::test]
async fn small_blobs_on_one_connection_do_not_stall() {
    let t = T::new().await;
    let blob = vec![7u8; 415];
    let d = digest(&blob);
    let r = t
        .req(
            Method::POST,
            &format!("/v2/small/blobs/uploads/?digest={d}"),
            Some(blob),
            &[],
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let one = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let url = t.s.url(&format!("/v2/small/blobs/{d}"));
    let median = crate::support::median_small_get(&one, &url, 24).await;
    assert!(
        median < std::time::Duration::from_millis(20),
        "median small GET took {median:?}: delayed-ACK stall"
    );
}

/// `GET /v2/<name>/_describe/<reference>`: what an image is made of, and an index's platforms
/// (the endpoint issue 16 added with one table row and one handler).
#[tokio::test]
async fn describe_sums_an_image_and_lists_an_index_s_platforms() {
    let t = T::new().await;
    let (m, d) = t.push_image("desc/app", "1", "describe").await;
    let r = t
        .req(Method::GET, "/v2/desc/app/_describe/1", None, &[])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    let config = "{\"seed\":\"describe\"}".len() as u64;
    let layer = "layer-describe".len() as u64;
    assert_eq!(v["digest"], d);
    assert_eq!(v["size"], m.len());
    assert_eq!(v["totalSize"], m.len() as u64 + config + layer);
    assert_eq!(v["config"]["size"], config);
    assert_eq!(v["layers"].as_array().map(Vec::len), Some(1));
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": d, "size": m.len(),
                       "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}],
    }))
    .unwrap();
    let r = t
        .req(
            Method::PUT,
            "/v2/desc/app/manifests/multi",
            Some(index),
            &[("content-type", OCI_INDEX)],
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = t
        .req(Method::GET, "/v2/desc/app/_describe/multi", None, &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["platforms"][0]["architecture"], "arm64");
    assert_eq!(v["platforms"][0]["variant"], "v8");
    let r = t
        .req(Method::GET, "/v2/desc/app/_describe/absent", None, &[])
        .await;
    assert_eq!(
        code(r).await,
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN".into())
    );
}
