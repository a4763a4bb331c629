//! Every client through haproxy over three replicas (PostgreSQL metadata, S3 blobs): each
//! request may land on another replica, so an upload's chunks and a push's manifest reach
//! processes other than the one that began it. The cluster is seeded with `seed/multi:1`
//! (three layers, 12 MB) and `seed/index:1` (amd64 and arm64); each client pushes into a
//! namespace of its own and pulls back what it pushed.

use std::process::Command;
use std::sync::Arc;

use serde_json::Value;

use super::{Shared, Suite, Tools, docker, expect, sh, start_containerd, start_dockerd};
use crate::support::cluster::Cluster;
use crate::support::{Layout, digest, require};

/// The shared cluster and what it was seeded with. Fields drop in order: the cluster stops
/// before its directory goes.
struct Replicated {
    cluster: Cluster,
    host: String,
    t: Tools,
    multi: Value,
    index: Value,
    _tmp: tempfile::TempDir,
}

static REPLICATED: Shared<Replicated> = Shared::new();

fn replicated() -> Arc<Replicated> {
    REPLICATED.get(|| {
        let tmp = tempfile::tempdir().unwrap();
        let cluster = Cluster::start("clients", 3, "");
        let host = cluster.host();
        let t = Tools::new(
            tmp.path(),
            &host,
            &format!(
                "unqualified-search-registries = []\n[[registry]]\nlocation = \"{host}\"\ninsecure = true\n"
            ),
        );
        let mut layout = Layout::new(&tmp.path().join("src"));
        let multi = layout.image("amd64", &[6 << 20, 4 << 20, 2 << 20], 21);
        let amd = layout.image("amd64", &[100_000], 22);
        let arm = layout.image("arm64", &[100_000], 23);
        let index = layout.index(&[amd, arm]);
        layout.tag("multi", &multi);
        layout.tag("index", &index);
        for tag in ["multi", "index"] {
            let seeded = sh(t
                .skopeo()
                .args(["copy", "--all", "--preserve-digests"])
                .arg("--dest-tls-verify=false")
                .arg(layout.reference(tag))
                .arg(format!("docker://{host}/seed/{tag}:1")));
            if let Err(e) = seeded {
                panic!("seeding the replicas failed: {e}");
            }
        }
        Replicated {
            cluster,
            host,
            t,
            multi,
            index,
            _tmp: tmp,
        }
    })
}

fn d(v: &Value) -> String {
    v["digest"].as_str().unwrap_or_default().to_owned()
}

/// The digest each replica serves for `reference`, straight from the replica: all must agree.
fn same_on_every_replica(f: &Replicated, reference: &str, want: &str) -> Result<(), String> {
    let (repo, tag) = reference.split_once(':').unwrap_or((reference, "latest"));
    for (i, p) in f.cluster.replicas.iter().enumerate() {
        let Some(p) = p else { continue };
        let out = sh(Command::new(require("curl")).args([
            "-sSI",
            "-H",
            "Accept: application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json",
            &format!("{}/v2/{repo}/manifests/{tag}", p.root()),
        ]))?;
        let got = out
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("docker-content-digest:")
                    .map(|v| v.trim().to_owned())
            })
            .unwrap_or_default();
        expect(got == want, || {
            format!("replica {i} serves {reference} as {got:?}, want {want}")
        })?;
    }
    Ok(())
}

#[test]
fn real_clients_replicated_skopeo() {
    let f = replicated();
    let (host, t) = (&f.host, &f.t);
    let mut s = Suite::new();
    s.op("skopeo copy --all through the balancer, both ways", || {
        for tag in ["multi", "index"] {
            sh(t.skopeo()
                .args(["copy", "--all", "--preserve-digests"])
                .args(["--src-tls-verify=false", "--dest-tls-verify=false"])
                .arg(format!("docker://{host}/seed/{tag}:1"))
                .arg(format!("docker://{host}/skopeo/{tag}:1")))?;
        }
        same_on_every_replica(&f, "skopeo/multi:1", &d(&f.multi))?;
        same_on_every_replica(&f, "skopeo/index:1", &d(&f.index))?;
        let out = tempfile::tempdir().map_err(|e| e.to_string())?;
        sh(t.skopeo()
            .args([
                "copy",
                "--all",
                "--preserve-digests",
                "--src-tls-verify=false",
            ])
            .arg(format!("docker://{host}/skopeo/index:1"))
            .arg(format!("oci:{}:index", out.path().display())))?;
        let got = Layout::tagged_digest(out.path(), "index").unwrap_or_default();
        expect(got == d(&f.index), || format!("{got} != {}", d(&f.index)))
    });
    s.finish();
}

#[test]
fn real_clients_replicated_podman() {
    let f = replicated();
    let (host, t) = (&f.host, &f.t);
    let mut s = Suite::new();
    s.op("podman pull, push, pull back", || {
        sh(t.containers("podman")
            .args(["pull", "--tls-verify=false"])
            .arg(format!("{host}/seed/multi:1")))?;
        sh(t.containers("podman")
            .args(["push", "--tls-verify=false", "--format", "oci"])
            .arg(format!("{host}/seed/multi:1"))
            .arg(format!("{host}/podman/multi:1")))?;
        let pushed = digest(&t.raw("podman/multi:1")?);
        same_on_every_replica(&f, "podman/multi:1", &pushed)?;
        sh(t.containers("podman")
            .args(["rmi", "-f"])
            .arg(format!("{host}/seed/multi:1")))?;
        sh(t.containers("podman")
            .args(["pull", "--tls-verify=false"])
            .arg(format!("{host}/podman/multi:1")))
        .map(|_| ())
    });
    s.finish();
}

#[test]
fn real_clients_replicated_containerd() {
    let f = replicated();
    let (host, t) = (&f.host, &f.t);
    let mut s = Suite::new();
    let dir = tempfile::tempdir().unwrap();
    match start_containerd(dir.path()) {
        Err(e) => s.op("containerd starts", || Err(e)),
        Ok((_daemon, sock)) => {
            let ctr = || {
                let mut c = Command::new(require("ctr"));
                c.arg("-a").arg(&sock).args(["-n", "berth"]);
                c
            };
            s.op("ctr pull, push, pull back (multi-arch index)", || {
                sh(ctr()
                    .args(["images", "pull", "--plain-http", "--all-platforms"])
                    .arg(format!("{host}/seed/index:1")))?;
                sh(ctr()
                    .args(["images", "tag"])
                    .arg(format!("{host}/seed/index:1"))
                    .arg(format!("{host}/ctr/index:1")))?;
                sh(ctr()
                    .args(["images", "push", "--plain-http"])
                    .arg(format!("{host}/ctr/index:1")))?;
                let got = digest(&t.raw("ctr/index:1")?);
                expect(got == d(&f.index), || format!("{got} != {}", d(&f.index)))?;
                same_on_every_replica(&f, "ctr/index:1", &d(&f.index))?;
                sh(ctr()
                    .args(["images", "rm"])
                    .arg(format!("{host}/ctr/index:1"))
                    .arg(format!("{host}/seed/index:1")))?;
                sh(ctr().args(["content", "prune", "references"]))?;
                sh(ctr()
                    .args(["images", "pull", "--plain-http", "--all-platforms"])
                    .arg(format!("{host}/ctr/index:1")))
                .map(|_| ())
            });
        }
    }
    s.finish();
}

#[test]
fn real_clients_replicated_docker() {
    let f = replicated();
    let (host, t) = (&f.host, &f.t);
    let mut s = Suite::new();
    let dir = tempfile::tempdir().unwrap();
    match start_dockerd(dir.path()) {
        Err(e) => s.op("dockerd starts", || Err(e)),
        Ok((_daemon, dh)) => {
            s.op("docker pull, push, pull back", || {
                sh(docker(&dh)
                    .args(["pull", "-q"])
                    .arg(format!("{host}/seed/multi:1")))?;
                sh(docker(&dh)
                    .arg("tag")
                    .arg(format!("{host}/seed/multi:1"))
                    .arg(format!("{host}/docker/multi:1")))?;
                sh(docker(&dh)
                    .arg("push")
                    .arg(format!("{host}/docker/multi:1")))?;
                let pushed = digest(&t.raw("docker/multi:1")?);
                same_on_every_replica(&f, "docker/multi:1", &pushed)?;
                sh(docker(&dh)
                    .arg("rmi")
                    .arg(format!("{host}/docker/multi:1"))
                    .arg(format!("{host}/seed/multi:1")))?;
                sh(docker(&dh)
                    .args(["pull", "-q"])
                    .arg(format!("{host}/docker/multi:1")))
                .map(|_| ())
            });
            let _ = sh(docker(&dh).args(["system", "prune", "-af"]));
        }
    }
    s.finish();
}
