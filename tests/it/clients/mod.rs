//! Real clients against the real `berth` binary: skopeo, podman, buildah, containerd's `ctr`,
//! dockerd with the docker CLI, oras (Python SDK) and curl. Every daemon is started here with
//! its own root, state and socket in a temp dir, and stopped again, also when a check fails.
//!
//! One test per client and scenario, so that one failing client hides none of the others:
//! [`plain`] (a registry on loopback), [`tls_auth`] (HTTPS with token auth), [`cache`] (pulls
//! through Berth as a mirror), [`mirror_push`] (pushes beside a default upstream),
//! [`replicated`] (three replicas behind haproxy). The tests of a scenario share its servers
//! ([`Shared`]) when they run at the same time. Each prints
//! `PASS`/`FAIL` per client operation and a closing `N passed, N failed` (`./scripts/test`
//! runs them with `--nocapture`).

mod cache;
mod mirror_push;
mod plain;
mod replicated;
mod tls_auth;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{OCI_MANIFEST, require};

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

struct Suite {
    passed: usize,
    failed: Vec<String>,
}

impl Suite {
    fn new() -> Self {
        Self {
            passed: 0,
            failed: Vec::new(),
        }
    }

    /// Prints the closing line and fails the test when an operation failed.
    fn finish(self) {
        println!("{} passed, {} failed", self.passed, self.failed.len());
        assert!(
            self.failed.is_empty(),
            "client operations failed:\n{}",
            self.failed.join("\n")
        );
    }

    fn op(&mut self, name: &str, f: impl FnOnce() -> Result<(), String>) {
        match f() {
            Ok(()) => {
                println!("PASS {name}");
                self.passed += 1;
            }
            Err(e) => {
                println!("FAIL {name}: {e}");
                self.failed.push(format!("{name}: {e}"));
            }
        }
    }
}

/// Runs a command; its stdout on success, else what it printed.
fn sh(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: String = err
            .chars()
            .rev()
            .take(1500)
            .collect::<String>()
            .chars()
            .rev()
            .collect();
        Err(format!(
            "{:?} exited {}: {tail}",
            cmd.get_program(),
            out.status
        ))
    }
}

fn expect(cond: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(msg()) }
}

/// A daemon stopped with SIGTERM (then SIGKILL) on drop.
struct Daemon {
    child: Child,
    name: &'static str,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(what: &str, log: &Path, mut ready: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!(
        "{what} did not come up: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    ))
}

fn start_containerd(dir: &Path) -> Result<(Daemon, PathBuf), String> {
    let bin = require("containerd");
    let sock = dir.join("containerd.sock");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{sock}\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = sock.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let log = dir.join("containerd.log");
    let child = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| e.to_string())?;
    let d = Daemon {
        child,
        name: "containerd",
    };
    wait_for("containerd", &log, || {
        sh(Command::new("ctr").arg("-a").arg(&sock).arg("version")).is_ok()
    })?;
    Ok((d, sock))
}

fn start_dockerd(dir: &Path) -> Result<(Daemon, String), String> {
    start_dockerd_with(dir, &[])
}

/// dockerd with extra flags. Its registry traffic goes through a dead proxy (only loopback
/// is exempt), so nothing can fall through to Docker Hub.
fn start_dockerd_with(dir: &Path, extra: &[String]) -> Result<(Daemon, String), String> {
    let bin = require("dockerd");
    let host = format!("unix://{}", dir.join("docker.sock").display());
    let log = dir.join("dockerd.log");
    let child = Command::new(bin)
        .arg("--data-root")
        .arg(dir.join("data"))
        .arg("--exec-root")
        .arg(dir.join("exec"))
        .arg("--pidfile")
        .arg(dir.join("docker.pid"))
        .args(["-H", &host])
        .args([
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--ip-forward=false",
            "--ip-masq=false",
        ])
        .args(["--storage-driver", "overlay2"])
        .args(extra)
        .env("HTTP_PROXY", "http://127.0.0.1:9")
        .env("HTTPS_PROXY", "http://127.0.0.1:9")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| e.to_string())?;
    let d = Daemon {
        child,
        name: "dockerd",
    };
    wait_for("dockerd", &log, || sh(docker(&host).arg("version")).is_ok())?;
    Ok((d, host))
}

fn docker(host: &str) -> Command {
    // Debian's docker.io client matches its dockerd.
    let bin = if Path::new("/usr/bin/docker").exists() {
        PathBuf::from("/usr/bin/docker")
    } else {
        require("docker")
    };
    // The client's config, with what `docker login` stores, sits beside the daemon's socket
    // in the test's own directory: not shared with another run, and gone with the test.
    let sock = host.strip_prefix("unix://").map(Path::new);
    let config = sock.and_then(Path::parent).map(|d| d.join("docker-config"));
    let mut c = Command::new(bin);
    c.env("DOCKER_HOST", host).env(
        "DOCKER_CONFIG",
        config.expect("dockerd listens on a socket in its test's directory"),
    );
    c
}

struct Tools {
    tmp: PathBuf,
    policy: PathBuf,
    host: String,
}

impl Tools {
    /// Tools for `host` with their own files in `tmp`: a policy accepting anything, an empty
    /// auth file, and `registries` as the containers registries.conf.
    fn new(tmp: &Path, host: &str, registries: &str) -> Self {
        let policy = tmp.join("policy.json");
        std::fs::write(
            &policy,
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .unwrap();
        std::fs::write(tmp.join("registries.conf"), registries).unwrap();
        std::fs::write(tmp.join("auth.json"), "{}").unwrap();
        Self {
            tmp: tmp.to_owned(),
            policy,
            host: host.to_owned(),
        }
    }

    fn skopeo(&self) -> Command {
        let mut c = Command::new(require("skopeo"));
        c.arg("--policy").arg(&self.policy);
        c
    }

    fn containers(&self, tool: &str) -> Command {
        let mut c = Command::new(require(tool));
        c.arg("--root").arg(self.tmp.join("storage/root"));
        c.arg("--runroot").arg(self.tmp.join("storage/run"));
        c.args(["--storage-driver", "vfs"]);
        c.env(
            "CONTAINERS_REGISTRIES_CONF",
            self.tmp.join("registries.conf"),
        );
        c.env("REGISTRY_AUTH_FILE", self.tmp.join("auth.json"));
        c.env("CONTAINERS_POLICY_JSON", &self.policy);
        c.env("BUILDAH_ISOLATION", "chroot");
        if tool == "podman" {
            c.args(["--cgroup-manager", "cgroupfs", "--events-backend", "none"]);
        }
        c
    }

    /// The raw manifest Berth serves for `reference`, via skopeo.
    fn raw(&self, reference: &str) -> Result<Vec<u8>, String> {
        let out = self
            .skopeo()
            .args([
                "inspect",
                "--raw",
                "--tls-verify=false",
                &format!("docker://{}/{reference}", self.host),
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        expect(out.status.success(), || {
            String::from_utf8_lossy(&out.stderr).into_owned()
        })?;
        Ok(out.stdout)
    }

    fn media_type(&self, reference: &str) -> Result<String, String> {
        let v: Value = serde_json::from_slice(&self.raw(reference)?).map_err(|e| e.to_string())?;
        Ok(v["mediaType"].as_str().unwrap_or(OCI_MANIFEST).to_owned())
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.host)
    }
}

fn curl(args: &[&str]) -> Result<String, String> {
    sh(Command::new(require("curl"))
        .args(["-sS", "--fail-with-body"])
        .args(args))
}

/// A fixture shared by the tests of one scenario that run at the same time: the first starts
/// it, the last to let go stops it.
struct Shared<T> {
    slot: Mutex<Weak<T>>,
}

impl<T> Shared<T> {
    const fn new() -> Self {
        Self {
            slot: Mutex::new(Weak::new()),
        }
    }

    fn get(&self, start: impl FnOnce() -> T) -> Arc<T> {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = slot.upgrade() {
            return t;
        }
        let t = Arc::new(start());
        *slot = Arc::downgrade(&t);
        t
    }
}

/// Runs `cmd` with `input` on its standard input.
fn sh_stdin(cmd: &mut Command, input: &str) -> Result<String, String> {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{:?} exited {}: {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// oras-py over HTTPS with token auth: anonymous push fails, login, push, pull back.
const ORAS_AUTH_SCRIPT: &str = r#"
import hashlib, os, sys
import oras.client
host, work = sys.argv[1], sys.argv[2]
os.makedirs(work, exist_ok=True)
os.chdir(work)
data = os.urandom(1024 * 1024 + 3)
with open("artifact.bin", "wb") as f:
    f.write(data)
anon = oras.client.OrasClient(hostname=host)
try:
    anon.push(target=f"{host}/team/oras:anon", files=["artifact.bin"])
    raise SystemExit("anonymous push succeeded")
except SystemExit:
    raise
except Exception:
    pass
# oras-py's token backend reuses a token after a 401 for a wider scope (it only refreshes on
# 403), so it is used with Basic credentials, which Berth accepts in token mode too.
c = oras.client.OrasClient(hostname=host, auth_backend="basic")
c.login(username="alice", password="alice-s3cret", hostname=host)
c.push(target=f"{host}/team/oras:1", files=["artifact.bin"])
files = c.pull(target=f"{host}/team/oras:1", outdir=os.path.join(work, "pulled"))
assert hashlib.sha256(open(files[0], "rb").read()).digest() == hashlib.sha256(data).digest()
print("oras auth ok")
"#;

/// Pushes an artifact with oras-py monolithically and in chunks, lists tags and pulls the
/// artifact back, and signs image `subject` of repository `repo` (arguments: host, work
/// directory, subject digest, repository).
const ORAS_SCRIPT: &str = r#"
import hashlib, json, os, sys
import oras.client
host, work, subject, repo = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
os.makedirs(work, exist_ok=True)
os.chdir(work)
data = os.urandom(3 * 1024 * 1024 + 17)
with open("artifact.bin", "wb") as f:
    f.write(data)
c = oras.client.OrasClient(hostname=host, insecure=True)
c.push(target=f"{host}/oras/artifact:mono", files=["artifact.bin"])
c.push(target=f"{host}/oras/artifact:chunked", files=["artifact.bin"], do_chunked=True, chunk_size=1024 * 1024)
tags = c.get_tags(f"{host}/oras/artifact")
assert sorted(tags) == ["chunked", "mono"], tags
for tag in ["mono", "chunked"]:
    out = os.path.join(work, "pulled-" + tag)
    files = c.pull(target=f"{host}/oras/artifact:{tag}", outdir=out)
    got = open(files[0], "rb").read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), tag
# A signature-like referrer of the small image.
import requests, oras.oci
r = requests.get(f"http://{host}/v2/{repo}/manifests/{subject}", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
r.raise_for_status()
sub = oras.oci.Subject(mediaType=r.headers["Content-Type"], digest=subject, size=len(r.content))
with open("sig.txt", "w") as f:
    f.write("signature")
with open("sigconfig.json", "w") as f:
    f.write("{}")
c.push(target=f"{host}/{repo}:sig", files=["sig.txt"], manifest_config="sigconfig.json:application/vnd.dev.berth.signature", subject=sub)
print("oras ok")
"#;
