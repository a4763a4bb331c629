//! The same registry on every blob backend: local disk and memory (elsewhere), S3 against a
//! real S3-protocol server (moto) and Azure against Azurite, both started by `./scripts/test`
//! on loopback, which passes their endpoints in `BERTH_TEST_S3_ENDPOINT` and
//! `BERTH_TEST_AZURE_ENDPOINT`. GCS has no emulator in the registries this project can reach.

use std::process::Command;

use berth::config::{AzureSection, Config, S3Section, StorageSection};
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
        panic!("{var} is not set: ./scripts/test starts the S3 and Azure test servers and sets it")
    })
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Cloud {
    S3,
    Azure,
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
async fn blob_gets_redirect_to_presigned_urls_or_stream() {
    for redirect in [true, false] {
        let s = TestServer::start_with(configure(Cloud::S3, &unique("redirect"), redirect)).await;
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
            let loc = r.headers()["location"].to_str().unwrap().to_owned();
            assert!(
                loc.starts_with(&endpoint("BERTH_TEST_S3_ENDPOINT")),
                "{loc}"
            );
            let body = c.get(&loc).send().await.unwrap().bytes().await.unwrap();
            assert_eq!(digest(&body), d);
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
    let r = c
        .patch(s.url(&loc))
        .header("content-range", format!("0-{}", half - 1))
        .body(blob[..half].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    drop(s); // the server goes away; its session lives in SQLite and S3
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let s = TestServer::start_with(tweak(data_dir, prefix)).await;
    crate::durability::resume_upload(&c, &s.root(), "resume", &loc, &blob, half).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_multi_arch_round_trip_on_s3() {
    for redirect in [true, false] {
        let s = TestServer::start_with(configure(Cloud::S3, &unique("skopeo"), redirect)).await;
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
                "redirect={redirect}: {}",
                String::from_utf8_lossy(&st.stderr)
            );
        }
        assert_eq!(
            Layout::tagged_digest(&out, "v1").unwrap(),
            idx["digest"].as_str().unwrap(),
            "redirect={redirect}"
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
    let config = dir.path().join("berth.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\n[storage]\nbackend = \"s3\"\nbucket = \"no-such-bucket\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\nallow_http = true\n",
            endpoint("BERTH_TEST_S3_ENDPOINT")
        ),
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
            panic!("berth kept running with an unusable bucket");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("s3 storage is not usable"), "{err}");
}
