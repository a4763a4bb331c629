//! The same registry on every blob backend: local disk and memory (elsewhere), S3 against a
//! real S3-protocol server (moto), Azure against Azurite, and GCS against fake-gcs-server
//! behind `tests/gcs/gateway.py` (which serves the XML API object_store's GCS client speaks,
//! and checks its service-account tokens and signed URLs). `./scripts/test` starts them on
//! loopback and passes their endpoints in `BERTH_TEST_S3_ENDPOINT`,
//! `BERTH_TEST_AZURE_ENDPOINT` and `BERTH_TEST_GCS_ENDPOINT` (with the service account key in
//! `BERTH_TEST_GCS_KEY`).

use std::process::Command;

use berth::config::{AzureSection, Config, GcsSection, S3Section, StorageSection};
use berth_conformance::run;
use reqwest::{Client, StatusCode};

use crate::support::{Layout, noise};
use crate::support::{TestServer, digest, require};

/// Azurite's well-known development account.
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

pub(crate) fn endpoint(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: ./scripts/test starts the S3, Azure and GCS test servers and sets it"
        )
    })
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Cloud {
    S3,
    Azure,
    Gcs,
}

/// Points `c` at the test server for `cloud`, under a fresh prefix.
pub(crate) fn configure(cloud: Cloud, prefix: &str, redirect: bool) -> impl FnOnce(&mut Config) {
    let prefix = prefix.to_owned();
    move |c: &mut Config| {
        c.storage = match cloud {
            Cloud::S3 => StorageSection::S3(S3Section {
                bucket: "registry".into(),
                prefix: Some(prefix),
                endpoint: Some(endpoint("BERTH_TEST_S3_ENDPOINT")),
                region: Some("us-east-1".into()),
                access_key_id: Some("test".into()),
                secret_access_key: Some("test".into()),
                allow_http: true,
                redirect: Some(redirect),
                ..S3Section::default()
            }),
            Cloud::Azure => StorageSection::Azure(AzureSection {
                bucket: "registry".into(),
                prefix: Some(prefix),
                endpoint: Some(endpoint("BERTH_TEST_AZURE_ENDPOINT")),
                access_key_id: Some(AZURITE_ACCOUNT.into()),
                secret_access_key: Some(AZURITE_KEY.into()),
                allow_http: true,
                redirect: Some(redirect),
                ..AzureSection::default()
            }),
            Cloud::Gcs => StorageSection::Gcs(GcsSection {
                bucket: "registry".into(),
                prefix: Some(prefix),
                endpoint: Some(endpoint("BERTH_TEST_GCS_ENDPOINT")),
                service_account_key: Some(endpoint("BERTH_TEST_GCS_KEY").into()),
                allow_http: true,
                redirect: Some(redirect),
                ..GcsSection::default()
            }),
        };
    }
}

pub(crate) fn unique(what: &str) -> String {
    format!(
        "{what}-{}",
        &digest(format!("{:?}", std::time::SystemTime::now()).as_bytes())[7..19]
    )
}

async fn conformance(cloud: Cloud, redirect: bool) {
    let s = TestServer::start_with(configure(cloud, &unique("conformance"), redirect)).await;
    let report = run(
        berth_conformance::Config::new(&s.root(), "conformance/cloud"),
        false,
    )
    .await
    .expect("run");
    let failures: Vec<_> = report
        .failures()
        .iter()
        .map(|o| format!("{}: {:?}", o.name, o.result))
        .collect();
    assert!(
        failures.is_empty(),
        "{cloud:?} redirect={redirect}: {}\n{}",
        report.summary(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_s3_with_redirects() {
    conformance(Cloud::S3, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_s3_streaming_through_berth() {
    conformance(Cloud::S3, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_azure_with_redirects() {
    conformance(Cloud::Azure, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_azure_streaming_through_berth() {
    conformance(Cloud::Azure, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_gcs_with_redirects() {
    let before = gcs_gateway_count("signed_url").await;
    conformance(Cloud::Gcs, true).await;
    // The redirected downloads went to URLs the gateway checked against the account's key.
    assert!(gcs_gateway_count("signed_url").await > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_gcs_streaming_through_berth() {
    conformance(Cloud::Gcs, false).await;
}

/// What the GCS gateway has served so far, by kind (`signed_url`, `multipart_complete`, ...).
pub(crate) async fn gcs_gateway_count(what: &str) -> u64 {
    let stats: serde_json::Value = reqwest::get(format!(
        "{}/_gateway/stats",
        endpoint("BERTH_TEST_GCS_ENDPOINT")
    ))
    .await
    .expect("gateway stats")
    .json()
    .await
    .expect("gateway stats json");
    stats[what].as_u64().unwrap_or(0)
}

/// The stores that presign downloads, each with redirects on and off.
const S3_AND_GCS: [(Cloud, bool); 4] = [
    (Cloud::S3, true),
    (Cloud::S3, false),
    (Cloud::Gcs, true),
    (Cloud::Gcs, false),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_gets_redirect_to_presigned_urls_or_stream() {
    for (cloud, redirect) in S3_AND_GCS {
        let s = TestServer::start_with(configure(cloud, &unique("redirect"), redirect)).await;
        let _ = crate::support::client();
        let c = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let data = noise(10_000, 1);
        let d = digest(&data);
        let r = c
            .post(s.url(&format!("/v2/r/blobs/uploads/?digest={d}")))
            .body(data.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let r = c
            .get(s.url(&format!("/v2/r/blobs/{d}")))
            .send()
            .await
            .unwrap();
        if redirect {
            assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
            let mut loc = r.headers()["location"].to_str().unwrap().to_owned();
            let store = match cloud {
                Cloud::Gcs => endpoint("BERTH_TEST_GCS_ENDPOINT"),
                _ => endpoint("BERTH_TEST_S3_ENDPOINT"),
            };
            assert!(loc.starts_with(&store), "{cloud:?}: {loc}");
            let body = crate::support::get_bytes(&c, &loc).await;
            assert_eq!(digest(&body), d, "{cloud:?}");
            if let Cloud::Gcs = cloud {
                // The gateway checks signatures as GCS does: one changed digit is refused.
                let last = loc.pop().unwrap();
                loc.push(if last == '0' { '1' } else { '0' });
                let r = c.get(&loc).send().await.unwrap();
                assert_eq!(r.status(), StatusCode::FORBIDDEN, "tampered URL: {loc}");
            }
            // HEAD and ranged reads are answered by Berth itself.
            let r = c
                .head(s.url(&format!("/v2/r/blobs/{d}")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let r = c
                .get(s.url(&format!("/v2/r/blobs/{d}")))
                .header("range", "bytes=-10")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
            assert_eq!(r.bytes().await.unwrap().as_ref(), &data[data.len() - 10..]);
        } else {
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(digest(&r.bytes().await.unwrap()), d);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_upload_resumes_on_s3_after_a_restart() {
    let prefix = unique("resume");
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_owned();
    let c = crate::support::client();
    let blob = noise(12 << 20, 9);
    let half = 6 << 20;
    let tweak = |data: std::path::PathBuf, prefix: String| {
        move |cfg: &mut Config| {
            configure(Cloud::S3, &prefix, false)(cfg);
            cfg.data = data;
        }
    };
    let s = TestServer::start_with(tweak(data_dir.clone(), prefix.clone())).await;
    let r = c
        .post(s.url("/v2/resume/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    crate::support::send_chunk(&c, &s.url(&loc), 0, &blob[..half]).await;
    drop(s); // the server goes away; its session lives in SQLite and S3
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let s = TestServer::start_with(tweak(data_dir, prefix)).await;
    crate::durability::resume_upload(&c, &s.root(), "resume", &loc, &blob, half).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_multi_arch_round_trip_on_s3_and_gcs() {
    for (cloud, redirect) in S3_AND_GCS {
        let s = TestServer::start_with(configure(cloud, &unique("skopeo"), redirect)).await;
        let tmp = tempfile::tempdir().unwrap();
        let mut l = Layout::new(&tmp.path().join("src"));
        let a = l.image("amd64", &[300_000, 200_000], 11);
        let b = l.image("arm64", &[300_000], 12);
        let idx = l.index(&[a, b]);
        l.tag("v1", &idx);
        let policy = tmp.path().join("policy.json");
        std::fs::write(
            &policy,
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .unwrap();
        let dest = format!("docker://{}/s3/multiarch:v1", s.addr);
        let out = tmp.path().join("out");
        for (from, to, tls) in [
            (l.reference("v1"), dest.clone(), "--dest-tls-verify=false"),
            (
                dest.clone(),
                format!("oci:{}:v1", out.display()),
                "--src-tls-verify=false",
            ),
        ] {
            let st = Command::new(require("skopeo"))
                .arg("--policy")
                .arg(&policy)
                .args(["copy", "--all", "--preserve-digests", tls, &from, &to])
                .output()
                .unwrap();
            assert!(
                st.status.success(),
                "{cloud:?} redirect={redirect}: {}",
                String::from_utf8_lossy(&st.stderr)
            );
        }
        assert_eq!(
            Layout::tagged_digest(&out, "v1").unwrap(),
            idx["digest"].as_str().unwrap(),
            "{cloud:?} redirect={redirect}"
        );
    }
}

/// A 1 GiB push to S3 through the real binary: peak RSS stays bounded (multipart parts of
/// 5 MiB, one in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1gib_push_to_s3_keeps_memory_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[storage]\nbackend = \"s3\"\nbucket = \"registry\"\nprefix = \"{}\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\nallow_http = true\n",
        unique("big"),
        endpoint("BERTH_TEST_S3_ENDPOINT")
    );
    let p = crate::support::spawn_berth_with(&dir.path().join("data"), Some(&config));
    let peak = crate::durability::push_1gib(&p).await;
    eprintln!("peak RSS during a 1 GiB push to S3: {} MiB", peak / 1024);
    assert!(
        peak > 0 && peak < 64 * 1024,
        "peak RSS {peak} KiB exceeds 64 MiB"
    );
}

/// A bucket that cannot be reached stops Berth at start-up with a clear error, instead of a
/// server that fails on the first push.
#[test]
fn an_unusable_bucket_fails_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    // A service account the store does not know: a key of its own, made here.
    let pem = dir.path().join("stranger.pem");
    let st = Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&pem)
        .arg("2048")
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "openssl genrsa");
    let stranger = dir.path().join("stranger.json");
    std::fs::write(
        &stranger,
        serde_json::json!({
            "type": "service_account",
            "private_key_id": "stranger",
            "private_key": std::fs::read_to_string(&pem).unwrap(),
            "client_email": "stranger@elsewhere.iam.gserviceaccount.com",
        })
        .to_string(),
    )
    .unwrap();
    for (name, storage, expect) in [
        (
            "s3, a missing bucket",
            format!(
                "backend = \"s3\"\nbucket = \"no-such-bucket\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\nallow_http = true\n",
                endpoint("BERTH_TEST_S3_ENDPOINT")
            ),
            "s3 storage is not usable",
        ),
        (
            "gcs, an unknown service account",
            format!(
                "backend = \"gcs\"\nbucket = \"registry\"\nendpoint = \"{}\"\nservice_account_key = \"{}\"\nallow_http = true\n",
                endpoint("BERTH_TEST_GCS_ENDPOINT"),
                stranger.display()
            ),
            "gcs storage is not usable",
        ),
    ] {
        let config = dir.path().join("berth.toml");
        std::fs::write(
            &config,
            format!("listen = \"127.0.0.1:0\"\n[storage]\n{storage}"),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(["serve", "--data"])
            .arg(dir.path().join("data"))
            .arg("--config")
            .arg(&config)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{name}: berth kept running with an unusable bucket");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "{name}");
        assert!(err.contains(expect), "{name}: {err}");
    }
}

/// A fresh [`Env`](berth_storage::suite::Env) for the storage suite: blobs on `cloud` under a
/// prefix of their own, metadata in SQLite.
fn cloud_suite_env(
    cloud: Cloud,
) -> futures_util::future::BoxFuture<'static, berth_storage::suite::Env> {
    use futures_util::FutureExt as _;
    async move {
        let mut config = Config::default();
        configure(cloud, &unique("suite"), false)(&mut config);
        let dir = tempfile::tempdir().unwrap();
        let mut storage = config.storage_config().expect("storage config");
        storage.metadata = berth_storage::backend::MetadataBackend::Sqlite(dir.path().join("m.db"));
        let objects = storage.backend().expect("backend").objects;
        let meta = storage.metadata.open().await.expect("metadata");
        let sibling = storage.metadata.open().await.expect("metadata");
        berth_storage::suite::Env {
            objects,
            meta,
            sibling,
            guard: Box::new(dir),
        }
    }
    .boxed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_storage_suite_passes_on_gcs() {
    berth_storage::suite::run("gcs", &|| cloud_suite_env(Cloud::Gcs)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_storage_suite_passes_on_s3() {
    berth_storage::suite::run("s3", &|| cloud_suite_env(Cloud::S3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_storage_suite_passes_on_azure() {
    berth_storage::suite::run("azure", &|| cloud_suite_env(Cloud::Azure)).await;
}
