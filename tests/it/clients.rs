//! Real clients against Berth. skopeo copies OCI layouts made here into Berth and back out;
//! digests must survive the round trip.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::support::{TestServer, digest, require};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Writes a blob into an OCI layout; returns its descriptor.
fn put(dir: &Path, media_type: &str, data: &[u8]) -> Value {
    let d = digest(data);
    let p = dir.join("blobs/sha256").join(&d["sha256:".len()..]);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
    json!({ "mediaType": media_type, "digest": d, "size": data.len() })
}

fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Real gzip, so that clients leave layers as they are instead of compressing them.
fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// An image with `layers` random layers for `arch`; returns the manifest descriptor.
fn image(dir: &Path, arch: &str, layers: usize, seed: u64) -> Value {
    let ls: Vec<Value> = (0..layers)
        .map(|i| {
            put(
                dir,
                "application/vnd.oci.image.layer.v1.tar+gzip",
                &gzip(&noise(300_000 + i * 1000, seed * 10 + i as u64)),
            )
        })
        .collect();
    let config = json!({
        "architecture": arch, "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": ls.iter().map(|l| l["digest"].clone()).collect::<Vec<_>>()},
        "config": {}
    });
    let c = put(
        dir,
        "application/vnd.oci.image.config.v1+json",
        &serde_json::to_vec(&config).unwrap(),
    );
    let m = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": c, "layers": ls});
    let mut d = put(dir, OCI_MANIFEST, &serde_json::to_vec(&m).unwrap());
    d["platform"] = json!({"architecture": arch, "os": "linux"});
    d
}

/// A layout holding `top` under tag `v1`.
fn layout(dir: &Path, mut top: Value) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    top["annotations"] = json!({"org.opencontainers.image.ref.name": "v1"});
    if top["mediaType"] == OCI_MANIFEST {
        top.as_object_mut().unwrap().remove("platform");
    }
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [top]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

struct Skopeo {
    bin: PathBuf,
    policy: PathBuf,
}

impl Skopeo {
    fn new(dir: &Path) -> Self {
        let policy = dir.join("policy.json");
        std::fs::write(
            &policy,
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .unwrap();
        Self {
            bin: require("skopeo"),
            policy,
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new(&self.bin)
            .arg("--policy")
            .arg(&self.policy)
            .args(args)
            .output()
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn top_digest(layout: &Path) -> String {
    let v: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    v["manifests"][0]["digest"].as_str().unwrap().to_owned()
}

async fn round_trip(all: bool) {
    let s = TestServer::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let top = if all {
        let a = image(&src, "amd64", 2, 1);
        let b = image(&src, "arm64", 2, 2);
        let idx = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [a, b]});
        put(&src, OCI_INDEX, &serde_json::to_vec(&idx).unwrap())
    } else {
        image(&src, "amd64", 4, 3)
    };
    layout(&src, top);
    let want = top_digest(&src);
    let sk = Skopeo::new(tmp.path());
    let repo = if all {
        "skopeo/multiarch"
    } else {
        "skopeo/multilayer"
    };
    let dest = format!("docker://{}/{repo}:v1", s.addr);
    let src_ref = format!("oci:{}:v1", src.display());
    let mut args = vec!["copy", "--preserve-digests", "--dest-tls-verify=false"];
    if all {
        args.push("--all");
    }
    args.extend([src_ref.as_str(), dest.as_str()]);
    sk.run(&args);
    let raw = sk.run(&["inspect", "--raw", "--tls-verify=false", &dest]);
    assert_eq!(
        digest(raw.as_bytes()),
        want,
        "the registry serves other bytes than were pushed"
    );
    let out = tmp.path().join("out");
    let out_ref = format!("oci:{}:v1", out.display());
    let mut args = vec!["copy", "--preserve-digests", "--src-tls-verify=false"];
    if all {
        args.push("--all");
    }
    args.extend([dest.as_str(), out_ref.as_str()]);
    sk.run(&args);
    assert_eq!(top_digest(&out), want, "digest changed on the way back out");
    // Every blob that went in came back out, byte for byte.
    for e in std::fs::read_dir(src.join("blobs/sha256"))
        .unwrap()
        .flatten()
    {
        let back = out.join("blobs/sha256").join(e.file_name());
        let got = std::fs::read(&back)
            .unwrap_or_else(|_| panic!("{} missing after the round trip", back.display()));
        assert_eq!(got, std::fs::read(e.path()).unwrap());
    }
    let tags = sk.run(&[
        "list-tags",
        "--tls-verify=false",
        &format!("docker://{}/{repo}", s.addr),
    ]);
    let tags: Value = serde_json::from_str(&tags).unwrap();
    assert_eq!(tags["Tags"], json!(["v1"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_a_multi_layer_image_in_and_out() {
    round_trip(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_a_multi_arch_index_in_and_out() {
    round_trip(true).await;
}
