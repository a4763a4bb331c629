//! Every client again, against Berth with HTTPS (a CA made here, trusted through each client's
//! usual certificate directory or flag) and token auth: login, push and pull with credentials;
//! anonymous push refused; anonymous pull of public content allowed. One test per client over
//! one shared server, seeded with `team/app:1` (private) and `public/app:1`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use super::{
    ORAS_AUTH_SCRIPT, Shared, Suite, Tools, docker, expect, sh, sh_stdin, start_containerd,
    start_dockerd,
};
use crate::pki::Ca;
use crate::support::{Layout, Proc, digest, require, spawn_berth_with};

const CREDS: &str = "alice:alice-s3cret";

/// Fields drop in order: the server stops before its directory goes.
struct TlsAuth {
    _berth: Proc,
    host: String,
    t: Tools,
    layout: Layout,
    ca: Ca,
    cert_dir: PathBuf,
    /// The digest of the seeded image.
    want: String,
    _tmp: tempfile::TempDir,
}

static TLS_AUTH: Shared<TlsAuth> = Shared::new();

fn tls_auth() -> Arc<TlsAuth> {
    TLS_AUTH.get(|| {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Ca::new(tmp.path(), "ca");
        let (cert, key) = (tmp.path().join("tls.crt"), tmp.path().join("tls.key"));
        ca.server(&cert, &key);
        let cert_dir = tmp.path().join("certs");
        std::fs::create_dir_all(&cert_dir).unwrap();
        std::fs::copy(&ca.cert, cert_dir.join("ca.crt")).unwrap();
        // The user file, made with `berth passwd`.
        let line = sh_stdin(
            Command::new(env!("CARGO_BIN_EXE_berth")).args(["passwd", "alice"]),
            "alice-s3cret\n",
        )
        .expect("berth passwd");
        let htpasswd = tmp.path().join("htpasswd");
        std::fs::write(&htpasswd, line).unwrap();
        let config = format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n[auth]\nmode = \"token\"\nhtpasswd = \"{}\"\nadmins = [\"alice\"]\n\n[[auth.rule]]\nrepositories = [\"public/**\"]\nusers = [\"anonymous\", \"*\"]\nactions = [\"pull\"]\n",
            cert.display(),
            key.display(),
            htpasswd.display()
        );
        let berth = spawn_berth_with(&tmp.path().join("berth-data"), Some(&config));
        let host = berth.addr.to_string();
        let t = Tools::new(tmp.path(), &host, "unqualified-search-registries = []\n");
        let mut layout = Layout::new(&tmp.path().join("src"));
        let image = layout.image("amd64", &[300_000, 2 << 20], 11);
        layout.tag("app", &image);
        let want = image["digest"].as_str().unwrap_or_default().to_owned();
        for name in ["team/app:1", "public/app:1"] {
            let seeded = sh(t
                .skopeo()
                .args(["copy", "--preserve-digests", "--dest-creds", CREDS])
                .arg("--dest-cert-dir")
                .arg(&cert_dir)
                .arg(layout.reference("app"))
                .arg(format!("docker://{host}/{name}")));
            if let Err(e) = seeded {
                panic!("seeding the shared registry failed: {e}");
            }
        }
        TlsAuth {
            _berth: berth,
            host,
            t,
            layout,
            ca,
            cert_dir,
            want,
            _tmp: tmp,
        }
    })
}

impl TlsAuth {
    /// The digest Berth serves for `reference` (skopeo inspect --raw over TLS).
    fn inspect(&self, reference: &str, with_creds: bool) -> Result<String, String> {
        let mut c = self.t.skopeo();
        c.args(["inspect", "--raw", "--cert-dir"])
            .arg(&self.cert_dir);
        if with_creds {
            c.args(["--creds", CREDS]);
        }
        let raw = sh(c.arg(format!("docker://{}/{reference}", self.host)))?;
        Ok(digest(raw.as_bytes()))
    }
}

#[test]
fn real_clients_tls_skopeo() {
    let f = tls_auth();
    let (host, t) = (&f.host, &f.t);
    let mut s = Suite::new();
    s.op("skopeo copy without credentials is refused", || {
        let r = sh(t
            .skopeo()
            .args(["copy", "--dest-cert-dir"])
            .arg(&f.cert_dir)
            .arg(f.layout.reference("app"))
            .arg(format!("docker://{host}/team/skopeo:anon")));
        match r {
            Ok(_) => Err("anonymous push succeeded".into()),
            Err(e) => expect(
                ["authentication required", "unauthorized", "denied"]
                    .iter()
                    .any(|w| e.contains(w)),
                || e.clone(),
            ),
        }
    });
    s.op("skopeo copy --dest-creds over TLS", || {
        sh(t.skopeo()
            .args([
                "copy",
                "--preserve-digests",
                "--dest-creds",
                CREDS,
                "--dest-cert-dir",
            ])
            .arg(&f.cert_dir)
            .arg(f.layout.reference("app"))
            .arg(format!("docker://{host}/team/skopeo:1")))?;
        let got = f.inspect("team/skopeo:1", true)?;
        expect(got == f.want, || format!("{got} != {}", f.want))
    });
    s.op(
        "skopeo: private content needs credentials, public does not",
        || {
            expect(f.inspect("team/app:1", false).is_err(), || {
                "anonymous read of a private repository".into()
            })?;
            let got = f.inspect("public/app:1", false)?;
            expect(got == f.want, || format!("{got} != {}", f.want))
        },
    );
    s.finish();
}

#[test]
fn real_clients_tls_podman() {
    let f = tls_auth();
    let (host, t) = (&f.host, &f.t);
    let mut s = Suite::new();
    s.op("podman login / pull / push", || {
        sh(t.containers("podman")
            .args(["login", "--cert-dir"])
            .arg(&f.cert_dir)
            .args(["-u", "alice", "-p", "alice-s3cret", host]))?;
        sh(t.containers("podman")
            .args(["pull", "-q", "--cert-dir"])
            .arg(&f.cert_dir)
            .arg(format!("{host}/team/app:1")))?;
        sh(t.containers("podman")
            .arg("tag")
            .arg(format!("{host}/team/app:1"))
            .arg(format!("{host}/team/podman:1")))?;
        sh(t.containers("podman")
            .args(["push", "-q", "--cert-dir"])
            .arg(&f.cert_dir)
            .arg(format!("{host}/team/podman:1")))?;
        f.inspect("team/podman:1", true).map(|_| ())
    });
    s.finish();
}

#[test]
fn real_clients_tls_containerd() {
    let f = tls_auth();
    let host = &f.host;
    let mut s = Suite::new();
    let dir = tempfile::tempdir().unwrap();
    match start_containerd(dir.path()) {
        Err(e) => s.op("containerd starts", || Err(e)),
        Ok((_daemon, sock)) => {
            let ctr = || {
                let mut c = Command::new(require("ctr"));
                c.arg("-a").arg(&sock).args(["-n", "berth-tls"]);
                c
            };
            // containerd's usual trust store: a hosts.toml per registry under a certs.d
            // directory. (ctr 1.6 talks plain HTTP to loopback hosts unless told otherwise.)
            let hosts_dir = dir.path().join("certs.d");
            let reg_dir = hosts_dir.join(host);
            std::fs::create_dir_all(&reg_dir).unwrap();
            std::fs::write(
                reg_dir.join("hosts.toml"),
                format!(
                    "server = \"https://{host}\"\n\n[host.\"https://{host}\"]\n  ca = \"{}\"\n",
                    f.ca.cert.display()
                ),
            )
            .unwrap();
            s.op("ctr images pull/push --user (CA from hosts.toml)", || {
                sh(ctr()
                    .args(["images", "pull", "--user", CREDS, "--hosts-dir"])
                    .arg(&hosts_dir)
                    .arg(format!("{host}/team/app:1")))?;
                sh(ctr()
                    .args(["images", "tag"])
                    .arg(format!("{host}/team/app:1"))
                    .arg(format!("{host}/team/ctr:1")))?;
                sh(ctr()
                    .args(["images", "push", "--user", CREDS, "--hosts-dir"])
                    .arg(&hosts_dir)
                    .arg(format!("{host}/team/ctr:1")))?;
                let got = f.inspect("team/ctr:1", true)?;
                expect(got == f.want, || format!("{got} != {}", f.want))
            });
            s.op("ctr pull without credentials is refused", || {
                let r = sh(ctr()
                    .args(["images", "pull", "--hosts-dir"])
                    .arg(&hosts_dir)
                    .arg(format!("{host}/team/ctr:1")));
                expect(r.is_err(), || "anonymous pull of a private image".into())
            });
        }
    }
    s.finish();
}

/// Docker's per-registry CA directory, removed again on drop.
struct DockerCertsDir(PathBuf);

impl Drop for DockerCertsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn real_clients_tls_docker() {
    let f = tls_auth();
    let host = &f.host;
    let mut s = Suite::new();
    // dockerd trusts a registry's CA from /etc/docker/certs.d/<host:port>/ca.crt.
    let certs_d = DockerCertsDir(PathBuf::from("/etc/docker/certs.d").join(host));
    let dir = tempfile::tempdir().unwrap();
    match std::fs::create_dir_all(&certs_d.0)
        .and_then(|()| std::fs::copy(&f.ca.cert, certs_d.0.join("ca.crt")))
        .map_err(|e| format!("{}: {e}", certs_d.0.display()))
        .and_then(|_| start_dockerd(dir.path()))
    {
        Err(e) => s.op("dockerd starts", || Err(e)),
        Ok((_daemon, dh)) => {
            s.op("docker push without login is refused", || {
                sh(docker(&dh)
                    .args(["pull", "-q"])
                    .arg(format!("{host}/public/app:1")))?;
                sh(docker(&dh)
                    .arg("tag")
                    .arg(format!("{host}/public/app:1"))
                    .arg(format!("{host}/team/docker:1")))?;
                let r = sh(docker(&dh).arg("push").arg(format!("{host}/team/docker:1")));
                expect(r.is_err(), || "anonymous docker push succeeded".into())
            });
            s.op("docker login / push / pull", || {
                sh_stdin(
                    docker(&dh).args(["login", "-u", "alice", "--password-stdin", host]),
                    "alice-s3cret",
                )?;
                sh(docker(&dh).arg("push").arg(format!("{host}/team/docker:1")))?;
                sh(docker(&dh)
                    .arg("rmi")
                    .arg(format!("{host}/team/docker:1"))
                    .arg(format!("{host}/public/app:1")))?;
                sh(docker(&dh)
                    .args(["pull", "-q"])
                    .arg(format!("{host}/team/docker:1")))?;
                f.inspect("team/docker:1", true).map(|_| ())
            });
            let _ = sh(docker(&dh).args(["logout", host]));
            let _ = sh(docker(&dh).args(["system", "prune", "-af"]));
        }
    }
    drop(certs_d);
    s.finish();
}

#[test]
fn real_clients_tls_oras() {
    let f = tls_auth();
    let mut s = Suite::new();
    let dir = tempfile::tempdir().unwrap();
    s.op("oras with credentials over TLS", || {
        let script = dir.path().join("oras_auth.py");
        std::fs::write(&script, ORAS_AUTH_SCRIPT).map_err(|e| e.to_string())?;
        let out = sh(Command::new("python3")
            .arg(&script)
            .arg(&f.host)
            .arg(dir.path().join("oras"))
            // oras-py keeps logins in the Docker config under $HOME: keep it in the temp dir.
            .env("HOME", dir.path())
            .env("DOCKER_CONFIG", dir.path().join("oras-docker"))
            .env("REQUESTS_CA_BUNDLE", &f.ca.cert))?;
        expect(out.contains("oras auth ok"), || out.clone())
    });
    s.finish();
}
