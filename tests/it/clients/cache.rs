//! Clients pulling through Berth as a mirror: containerd with a `hosts.toml` per upstream
//! (`?ns=` routing) for `docker.io` and `ghcr.io`, and dockerd with `registry-mirrors`. The
//! upstreams are Distribution (standing in for Docker Hub) and a Berth with token auth
//! (standing in for ghcr.io), both on loopback; every fallback path points at a dead local
//! port, so nothing can reach the internet. One test per client over one shared mirror.

use std::process::Command;
use std::sync::Arc;

use super::{
    Shared, Suite, Tools, curl, docker, expect, sh, sh_stdin, start_containerd, start_dockerd_with,
};
use crate::support::{Layout, Proc, digest, require, spawn_berth_with, spawn_distribution};

/// Fields drop in order: servers stop before their directory goes.
struct Cache {
    mirror: Proc,
    _ghcr: Proc,
    _hub: Proc,
    /// The digest of the image both upstreams hold.
    want: String,
    _tmp: tempfile::TempDir,
}

static CACHE: Shared<Cache> = Shared::new();

fn cache() -> Arc<Cache> {
    CACHE.get(|| {
        let tmp = tempfile::tempdir().unwrap();
        let hub_dir = tmp.path().join("hub");
        std::fs::create_dir_all(&hub_dir).unwrap();
        let hub = spawn_distribution(&hub_dir);
        let users = tmp.path().join("htpasswd");
        let line = sh_stdin(
            Command::new(env!("CARGO_BIN_EXE_berth")).args(["passwd", "mirror", "--cost", "4"]),
            "mirror-pw\n",
        )
        .expect("berth passwd");
        std::fs::write(&users, line).unwrap();
        let ghcr = spawn_berth_with(
            &tmp.path().join("ghcr-data"),
            Some(&format!(
                "[auth]\nmode = \"token\"\nhtpasswd = \"{}\"\n",
                users.display()
            )),
        );
        let mirror = spawn_berth_with(
            &tmp.path().join("mirror-data"),
            Some(&format!(
                "[[proxy.upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n\n\
                 [[proxy.upstream]]\nname = \"ghcr.io\"\nurl = \"{}\"\nusername = \"mirror\"\npassword = \"mirror-pw\"\n",
                hub.root(),
                ghcr.root()
            )),
        );
        let t = Tools::new(tmp.path(), &mirror.addr.to_string(), "unqualified-search-registries = []\n");
        let mut layout = Layout::new(&tmp.path().join("src"));
        let image = layout.image("amd64", &[400_000, 3 << 20], 21);
        layout.tag("app", &image);
        let want = image["digest"].as_str().unwrap_or_default().to_owned();
        // Seed the upstreams.
        let seeded = sh(t
            .skopeo()
            .args(["copy", "--preserve-digests", "--dest-tls-verify=false"])
            .arg(layout.reference("app"))
            .arg(format!("docker://{}/library/app:1", hub.addr)))
        .and_then(|_| {
            sh(t.skopeo()
                .args(["copy", "--preserve-digests", "--dest-tls-verify=false"])
                .args(["--dest-creds", "mirror:mirror-pw"])
                .arg(layout.reference("app"))
                .arg(format!("docker://{}/org/app:1", ghcr.addr)))
        });
        if let Err(e) = seeded {
            panic!("seeding the upstreams failed: {e}");
        }
        Cache {
            mirror,
            _ghcr: ghcr,
            _hub: hub,
            want,
            _tmp: tmp,
        }
    })
}

#[test]
fn real_clients_cache_containerd() {
    let f = cache();
    let host = f.mirror.addr.to_string();
    let catalog = || -> Result<String, String> { curl(&[&format!("http://{host}/v2/_catalog")]) };
    let mut s = Suite::new();
    let dir = tempfile::tempdir().unwrap();
    match start_containerd(dir.path()) {
        Err(e) => s.op("containerd starts", || Err(e)),
        Ok((_daemon, sock)) => {
            let hosts = dir.path().join("certs.d");
            for upstream in ["docker.io", "ghcr.io"] {
                let d = hosts.join(upstream);
                std::fs::create_dir_all(&d).unwrap();
                std::fs::write(
                    d.join("hosts.toml"),
                    format!(
                        "# The real upstream is never tried: a dead local port stands in for it.\n\
                         server = \"http://127.0.0.1:9\"\n\n\
                         [host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
                    ),
                )
                .unwrap();
            }
            let ctr = || {
                let mut c = Command::new(require("ctr"));
                c.arg("-a").arg(&sock).args(["-n", "berth-mirror"]);
                c
            };
            for (what, reference, cached) in [
                (
                    "docker.io",
                    "docker.io/library/app:1",
                    "docker.io/library/app",
                ),
                (
                    "ghcr.io (token auth upstream)",
                    "ghcr.io/org/app:1",
                    "ghcr.io/org/app",
                ),
            ] {
                s.op(
                    &format!("ctr pull {what} through the mirror (hosts.toml, ns)"),
                    || {
                        sh(ctr()
                            .args(["images", "pull", "--hosts-dir"])
                            .arg(&hosts)
                            .arg(reference))?;
                        let out = sh(ctr().args(["images", "ls", "-q"]))?;
                        expect(out.contains(reference), || out.clone())?;
                        let cat = catalog()?;
                        expect(cat.contains(&format!("\"{cached}\"")), || cat.clone())
                    },
                );
            }
            s.op("ctr pull of a name no upstream has fails cleanly", || {
                let r = sh(ctr()
                    .args(["images", "pull", "--hosts-dir"])
                    .arg(&hosts)
                    .arg("docker.io/library/absent:1"));
                expect(r.is_err(), || "pulled something that does not exist".into())
            });
        }
    }
    s.op("the mirror serves the upstream's digest unchanged", || {
        let raw = curl(&[
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
            &format!("http://{host}/v2/docker.io/library/app/manifests/1"),
        ])?;
        let got = digest(raw.as_bytes());
        expect(got == f.want, || format!("{got} != {}", f.want))
    });
    s.finish();
}

#[test]
fn real_clients_cache_docker() {
    let f = cache();
    let host = f.mirror.addr.to_string();
    let mut s = Suite::new();
    let dir = tempfile::tempdir().unwrap();
    match start_dockerd_with(dir.path(), &[format!("--registry-mirror=http://{host}")]) {
        Err(e) => s.op("dockerd starts", || Err(e)),
        Ok((_daemon, dh)) => {
            s.op(
                "docker pull through registry-mirrors (a Docker Hub name)",
                || {
                    sh(docker(&dh).args(["pull", "-q", "app:1"]))?;
                    let out =
                        sh(docker(&dh).args(["image", "inspect", "--format", "{{.Id}}", "app:1"]))?;
                    expect(!out.trim().is_empty(), || out.clone())
                },
            );
            let _ = sh(docker(&dh).args(["system", "prune", "-af"]));
        }
    }
    s.finish();
}
