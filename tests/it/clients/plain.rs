//! Every client against a Berth on loopback (plain HTTP, no auth), one test each. They share
//! one server, seeded with `seed/small:1`, `seed/multi:1` (three layers, 50 MB) and
//! `seed/index:1` (amd64 and arm64); each client works in a namespace of its own.

use std::process::Command;
use std::sync::Arc;

use serde_json::Value;

use super::{
    DOCKER_MANIFEST, ORAS_SCRIPT, Shared, Suite, Tools, curl, docker, expect, sh, start_containerd,
    start_dockerd,
};
use crate::support::{Image, Layout, OCI_INDEX, OCI_MANIFEST, Proc, digest, require, spawn_berth};

/// The shared server and what it was seeded with. Fields drop in order: the server stops before
/// its directory goes.
struct Plain {
    berth: Proc,
    host: String,
    t: Tools,
    layout: Layout,
    small: Value,
    multi: Value,
    index: Value,
    tmp: tempfile::TempDir,
}

static PLAIN: Shared<Plain> = Shared::new();

fn plain() -> Arc<Plain> {
    PLAIN.get(|| {
        let tmp = tempfile::tempdir().unwrap();
        let berth = spawn_berth(&tmp.path().join("berth-data"));
        let host = berth.addr.to_string();
        let t = Tools::new(
            tmp.path(),
            &host,
            &format!(
                "unqualified-search-registries = []\n[[registry]]\nlocation = \"{host}\"\ninsecure = true\n"
            ),
        );
        let mut layout = Layout::new(&tmp.path().join("src"));
        let small = layout.image("amd64", &[200_000], 1);
        let multi = layout.image("amd64", &[20 << 20, 18 << 20, 12 << 20], 2);
        let amd = layout.image("amd64", &[100_000], 3);
        let arm = layout.image("arm64", &[100_000], 4);
        let index = layout.index(&[amd, arm]);
        layout.tag("small", &small);
        layout.tag("multi", &multi);
        layout.tag("index", &index);
        for tag in ["small", "multi", "index"] {
            let seeded = sh(t
                .skopeo()
                .args(["copy", "--all", "--preserve-digests"])
                .arg("--dest-tls-verify=false")
                .arg(layout.reference(tag))
                .arg(format!("docker://{host}/seed/{tag}:1")));
            if let Err(e) = seeded {
                panic!("seeding the shared registry failed: {e}");
            }
        }
        Plain {
            berth,
            host,
            t,
            layout,
            small,
            multi,
            index,
            tmp,
        }
    })
}

fn d(v: &Value) -> String {
    v["digest"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn real_clients_skopeo() {
    let f = plain();
    let (host, t) = (&f.host, &f.t);
    let mut s = Suite::new();
    // Its own layout for the 1 GiB image.
    let dir = tempfile::tempdir().unwrap();
    let mut big_layout = Layout::new(&dir.path().join("big"));
    let big = big_layout.big_image("amd64", 1 << 30, 5);
    big_layout.tag("big", &big);
    for (what, layout, tag, desc, all) in [
        ("small image", &f.layout, "small", &f.small, false),
        (
            "multi-layer image (50 MB)",
            &f.layout,
            "multi",
            &f.multi,
            false,
        ),
        (
            "multi-arch index (--all)",
            &f.layout,
            "index",
            &f.index,
            true,
        ),
        ("1 GiB single-layer image", &big_layout, "big", &big, false),
    ] {
        s.op(&format!("skopeo copy OCI layout -> berth: {what}"), || {
            let mut c = t.skopeo();
            c.args(["copy", "--preserve-digests", "--dest-tls-verify=false"]);
            if all {
                c.arg("--all");
            }
            sh(c.arg(layout.reference(tag))
                .arg(format!("docker://{host}/skopeo/{tag}:1")))?;
            let got = digest(&t.raw(&format!("skopeo/{tag}:1"))?);
            expect(got == d(desc), || {
                format!("berth serves {got}, pushed {}", d(desc))
            })
        });
    }
    s.op(
        "skopeo copy berth -> OCI layout --all: same digests back",
        || {
            let out = dir.path().join("out");
            for tag in ["small", "multi", "index", "big"] {
                sh(t.skopeo()
                    .args([
                        "copy",
                        "--all",
                        "--preserve-digests",
                        "--src-tls-verify=false",
                    ])
                    .arg(format!("docker://{host}/skopeo/{tag}:1"))
                    .arg(format!("oci:{}:{tag}", out.display())))?;
            }
            for (tag, desc) in [
                ("small", &f.small),
                ("multi", &f.multi),
                ("index", &f.index),
                ("big", &big),
            ] {
                let got = Layout::tagged_digest(&out, tag).unwrap_or_default();
                expect(got == d(desc), || format!("{tag}: {got} != {}", d(desc)))?;
            }
            Ok(())
        },
    );
    s.op("skopeo copy --format v2s2", || {
        sh(t.skopeo()
            .args(["copy", "--format", "v2s2", "--dest-tls-verify=false"])
            .arg(f.layout.reference("small"))
            .arg(format!("docker://{host}/skopeo/v2s2:1")))?;
        let mt = t.media_type("skopeo/v2s2:1")?;
        expect(mt == DOCKER_MANIFEST, || format!("stored as {mt}"))
    });
    s.op("skopeo inspect", || {
        let out = sh(t
            .skopeo()
            .args(["inspect", "--tls-verify=false"])
            .arg(format!("docker://{host}/skopeo/small:1")))?;
        let v: Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
        expect(
            v["Digest"] == d(&f.small) && v["Architecture"] == "amd64",
            || format!("{v}"),
        )
    });
    s.op("skopeo inspect --raw", || {
        let v: Value =
            serde_json::from_slice(&t.raw("skopeo/index:1")?).map_err(|e| e.to_string())?;
        expect(
            v["mediaType"] == OCI_INDEX && v["manifests"].as_array().map(Vec::len) == Some(2),
            || format!("{v}"),
        )
    });
    s.op("skopeo list-tags", || {
        let out = sh(t
            .skopeo()
            .args(["list-tags", "--tls-verify=false"])
            .arg(format!("docker://{host}/skopeo/small")))?;
        let v: Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
        expect(v["Tags"] == serde_json::json!(["1"]), || format!("{v}"))
    });
    s.op(
        "skopeo copy berth -> berth (cross-repository mount)",
        || {
            sh(t.skopeo()
                .args([
                    "copy",
                    "--preserve-digests",
                    "--src-tls-verify=false",
                    "--dest-tls-verify=false",
                ])
                .arg(format!("docker://{host}/skopeo/multi:1"))
                .arg(format!("docker://{host}/skopeo/copied:1")))?;
            let got = digest(&t.raw("skopeo/copied:1")?);
            expect(got == d(&f.multi), || format!("{got} != {}", d(&f.multi)))
        },
    );
    s.op("skopeo delete", || {
        sh(t.skopeo()
            .args(["delete", "--tls-verify=false"])
            .arg(format!("docker://{host}/skopeo/v2s2:1")))?;
        expect(t.raw("skopeo/v2s2:1").is_err(), || {
            "still there after delete".into()
        })
    });
    s.op(
        "berth's peak RSS, 1 GiB pushed and pulled, stays under 64 MiB",
        || {
            let kib = f.berth.peak_rss_kib();
            println!("  berth peak RSS: {} MiB", kib / 1024);
            expect(kib > 0 && kib < 64 * 1024, || format!("{kib} KiB"))
        },
    );
    s.finish();
}

#[test]
fn real_clients_podman() {
    let f = plain();
    let (host, t) = (&f.host, &f.t);
    let mut s = Suite::new();
    s.op("podman pull", || {
        sh(t.containers("podman")
            .args(["pull", "--tls-verify=false"])
            .arg(format!("{host}/seed/small:1")))
        .map(|_| ())
    });
    for (fmt, want) in [("oci", OCI_MANIFEST), ("v2s2", DOCKER_MANIFEST)] {
        s.op(&format!("podman push --format {fmt}"), || {
            sh(t.containers("podman")
                .args(["push", "--tls-verify=false", "--format", fmt])
                .arg(format!("{host}/seed/small:1"))
                .arg(format!("{host}/podman/{fmt}:1")))?;
            let mt = t.media_type(&format!("podman/{fmt}:1"))?;
            expect(mt == want, || format!("stored as {mt}"))
        });
    }
    s.op("podman manifest create/add/push --all", || {
        let list = "berth-test-list";
        let _ = sh(t.containers("podman").args(["manifest", "rm", list]));
        sh(t.containers("podman").args(["manifest", "create", list]))?;
        sh(t.containers("podman")
            .args(["manifest", "add", "--all", "--tls-verify=false", list])
            .arg(format!("docker://{host}/seed/index:1")))?;
        sh(t.containers("podman")
            .args(["manifest", "push", "--all", "--tls-verify=false", list])
            .arg(format!("docker://{host}/podman/list:1")))?;
        let v: Value =
            serde_json::from_slice(&t.raw("podman/list:1")?).map_err(|e| e.to_string())?;
        expect(v["manifests"].as_array().map(Vec::len) == Some(2), || {
            format!("{v}")
        })
    });
    s.op("podman search --list-tags", || {
        let out = sh(t
            .containers("podman")
            .args(["search", "--list-tags", "--tls-verify=false"])
            .arg(format!("{host}/seed/small")))?;
        expect(
            out.lines()
                .any(|l| l.split_whitespace().last() == Some("1")),
            || out.clone(),
        )
    });
    s.finish();
}

#[test]
fn real_clients_buildah() {
    let f = plain();
    let (host, t) = (&f.host, &f.t);
    let mut s = Suite::new();
    s.op("buildah from / copy / commit / push", || {
        let ctr = sh(t
            .containers("buildah")
            .args(["from", "--tls-verify=false"])
            .arg(format!("{host}/seed/small:1")))?;
        let ctr = ctr.trim();
        let file = f.tmp.path().join("added.txt");
        std::fs::write(&file, "added by buildah").map_err(|e| e.to_string())?;
        sh(t.containers("buildah")
            .args(["copy", ctr])
            .arg(&file)
            .arg("/added.txt"))?;
        sh(t.containers("buildah")
            .args(["commit", ctr, "berth-buildah-img"]))?;
        sh(t.containers("buildah")
            .args(["push", "--tls-verify=false", "berth-buildah-img"])
            .arg(format!("docker://{host}/buildah/img:1")))?;
        let v: Value =
            serde_json::from_slice(&t.raw("buildah/img:1")?).map_err(|e| e.to_string())?;
        let _ = sh(t.containers("buildah").args(["rm", ctr]));
        expect(v["layers"].as_array().map(Vec::len) == Some(2), || {
            format!("expected 2 layers: {v}")
        })
    });
    s.finish();
}

#[test]
fn real_clients_containerd() {
    let f = plain();
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
            s.op("ctr images pull --plain-http", || {
                sh(ctr()
                    .args(["images", "pull", "--plain-http"])
                    .arg(format!("{host}/seed/multi:1")))
                .map(|_| ())
            });
            s.op("ctr images pull --plain-http --all-platforms", || {
                sh(ctr()
                    .args(["images", "pull", "--plain-http", "--all-platforms"])
                    .arg(format!("{host}/seed/index:1")))
                .map(|_| ())
            });
            s.op("ctr images push --plain-http", || {
                sh(ctr()
                    .args(["images", "tag"])
                    .arg(format!("{host}/seed/multi:1"))
                    .arg(format!("{host}/ctr/pushed:1")))?;
                sh(ctr()
                    .args(["images", "push", "--plain-http"])
                    .arg(format!("{host}/ctr/pushed:1")))?;
                let got = digest(&t.raw("ctr/pushed:1")?);
                expect(got == d(&f.multi), || format!("{got} != {}", d(&f.multi)))
            });
            s.op("ctr images push --plain-http (multi-arch index)", || {
                sh(ctr()
                    .args(["images", "tag"])
                    .arg(format!("{host}/seed/index:1"))
                    .arg(format!("{host}/ctr/index:1")))?;
                sh(ctr()
                    .args(["images", "push", "--plain-http"])
                    .arg(format!("{host}/ctr/index:1")))?;
                let got = digest(&t.raw("ctr/index:1")?);
                expect(got == d(&f.index), || format!("{got} != {}", d(&f.index)))
            });
        }
    }
    s.finish();
}

#[test]
fn real_clients_docker() {
    let f = plain();
    let (host, t) = (&f.host, &f.t);
    let mut s = Suite::new();
    let dir = tempfile::tempdir().unwrap();
    match start_dockerd(dir.path()) {
        Err(e) => s.op("dockerd starts", || Err(e)),
        Ok((_daemon, dh)) => {
            s.op("docker pull", || {
                sh(docker(&dh)
                    .args(["pull", "-q"])
                    .arg(format!("{host}/seed/multi:1")))
                .map(|_| ())
            });
            s.op("docker push", || {
                sh(docker(&dh)
                    .arg("tag")
                    .arg(format!("{host}/seed/multi:1"))
                    .arg(format!("{host}/docker/pushed:1")))?;
                sh(docker(&dh)
                    .arg("push")
                    .arg(format!("{host}/docker/pushed:1")))?;
                let v: Value = serde_json::from_slice(&t.raw("docker/pushed:1")?)
                    .map_err(|e| e.to_string())?;
                expect(v["layers"].as_array().map(Vec::len) == Some(3), || {
                    format!("{v}")
                })
            });
            s.op("docker pull of what docker pushed", || {
                sh(docker(&dh)
                    .arg("rmi")
                    .arg(format!("{host}/docker/pushed:1"))
                    .arg(format!("{host}/seed/multi:1")))?;
                sh(docker(&dh)
                    .args(["pull", "-q"])
                    .arg(format!("{host}/docker/pushed:1")))
                .map(|_| ())
            });
            let _ = sh(docker(&dh).args(["system", "prune", "-af"]));
        }
    }
    s.finish();
}

#[test]
fn real_clients_oras() {
    let f = plain();
    let (host, t) = (&f.host, &f.t);
    let mut s = Suite::new();
    let dir = tempfile::tempdir().unwrap();
    s.op(
        "oras push (monolithic and chunked), tags, pull, sign",
        || {
            // A subject of its own, mounted from the seed.
            sh(t.skopeo()
                .args(["copy", "--preserve-digests"])
                .args(["--src-tls-verify=false", "--dest-tls-verify=false"])
                .arg(format!("docker://{host}/seed/small:1"))
                .arg(format!("docker://{host}/oras/small:1")))?;
            let script = dir.path().join("oras_check.py");
            std::fs::write(&script, ORAS_SCRIPT).map_err(|e| e.to_string())?;
            let out = sh(Command::new("python3")
                .arg(&script)
                .arg(host)
                .arg(dir.path().join("oras"))
                .arg(d(&f.small))
                .arg("oras/small"))?;
            expect(out.contains("oras ok"), || out.clone())?;
            let listed = curl(&[&t.url(&format!("/v2/oras/small/referrers/{}", d(&f.small)))])?;
            expect(
                listed.contains("application/vnd.dev.berth.signature"),
                || listed.clone(),
            )
        },
    );
    s.finish();
}

/// curl for what the other clients do not do: referrers with their filter, the catalog.
#[test]
fn real_clients_curl() {
    let f = plain();
    let t = &f.t;
    let mut s = Suite::new();
    s.op(
        "curl: referrers of a signed image, filtered by type",
        || {
            let subject = d(&f.small);
            let sig = signature(&subject);
            let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
            rt.block_on(sig.try_push(
                &format!("http://{}", f.host),
                "seed/small",
                &sig.digest(),
                crate::support::Push::default(),
            ))?;
            let all = curl(&[&t.url(&format!("/v2/seed/small/referrers/{subject}"))])?;
            let v: Value = serde_json::from_str(&all).map_err(|e| e.to_string())?;
            let found = v["manifests"].as_array().is_some_and(|m| {
                m.iter().any(|r| {
                    r["digest"] == sig.digest()
                        && r["artifactType"] == "application/vnd.dev.berth.curl"
                })
            });
            expect(found, || all.clone())?;
            let none = curl(&[&t.url(&format!(
                "/v2/seed/small/referrers/{subject}?artifactType=application/x-none"
            ))])?;
            let v: Value = serde_json::from_str(&none).map_err(|e| e.to_string())?;
            expect(v["manifests"] == serde_json::json!([]), || none.clone())
        },
    );
    s.op("curl: catalog", || {
        let out = curl(&[&t.url("/v2/_catalog")])?;
        expect(
            ["seed/small", "seed/multi", "seed/index"]
                .iter()
                .all(|r| out.contains(r)),
            || out.clone(),
        )
    });
    s.finish();
}

/// A signature-like artifact of `subject` (seed/small's manifest).
fn signature(subject: &str) -> Image {
    let payload = b"signed by curl's test".to_vec();
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.dev.berth.curl",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest(b"{}"), "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": digest(&payload), "size": payload.len()}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 1},
    })
    .to_string();
    Image::with_manifest(m, OCI_MANIFEST, vec![b"{}".to_vec(), payload])
}
