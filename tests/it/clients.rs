//! Real clients against the real `berth` binary: skopeo, podman, buildah, containerd's `ctr`,
//! dockerd with the docker CLI, oras (Python SDK) and curl. Every daemon is started here with
//! its own root, state and socket in a temp dir, and stopped again, also when a check fails.
//!
//! One test: it prints `PASS`/`FAIL` per client operation and a closing `N passed, N failed`
//! (`./scripts/test` runs it with `--nocapture`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::images::{Layout, OCI_INDEX, OCI_MANIFEST};
use crate::pki::Ca;
use crate::support::{digest, require, spawn_berth, spawn_berth_with};

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
    let mut c = Command::new(bin);
    c.env("DOCKER_HOST", host).env(
        "DOCKER_CONFIG",
        std::env::temp_dir().join("berth-docker-config"),
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

#[test]
fn real_clients() {
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
    let index = layout.index(&[amd.clone(), arm.clone()]);
    let big = layout.big_image("amd64", 1 << 30, 5);
    layout.tag("big", &big);
    layout.tag("small", &small);
    layout.tag("multi", &multi);
    layout.tag("index", &index);
    let d = |v: &Value| v["digest"].as_str().unwrap_or_default().to_owned();

    let mut s = Suite::new();

    // ---- skopeo
    for (what, tag, desc, all) in [
        ("small image", "small", &small, false),
        ("multi-layer image (50 MB)", "multi", &multi, false),
        ("multi-arch index (--all)", "index", &index, true),
        ("1 GiB single-layer image", "big", &big, false),
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
            let out = tmp.path().join("out");
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
                ("small", &small),
                ("multi", &multi),
                ("index", &index),
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
            .arg(layout.reference("small"))
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
            v["Digest"] == d(&small) && v["Architecture"] == "amd64",
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
            expect(got == d(&multi), || format!("{got} != {}", d(&multi)))
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

    // ---- podman and buildah
    s.op("podman pull", || {
        sh(t.containers("podman")
            .args(["pull", "--tls-verify=false"])
            .arg(format!("{host}/skopeo/small:1")))
        .map(|_| ())
    });
    for (fmt, want) in [("oci", OCI_MANIFEST), ("v2s2", DOCKER_MANIFEST)] {
        s.op(&format!("podman push --format {fmt}"), || {
            sh(t.containers("podman")
                .args(["push", "--tls-verify=false", "--format", fmt])
                .arg(format!("{host}/skopeo/small:1"))
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
            .arg(format!("docker://{host}/skopeo/index:1")))?;
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
            .arg(format!("{host}/skopeo/small")))?;
        expect(
            out.lines()
                .any(|l| l.split_whitespace().last() == Some("1")),
            || out.clone(),
        )
    });
    s.op("buildah from / copy / commit / push", || {
        let ctr = sh(t
            .containers("buildah")
            .args(["from", "--tls-verify=false"])
            .arg(format!("{host}/skopeo/small:1")))?;
        let ctr = ctr.trim();
        let file = tmp.path().join("added.txt");
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

    // ---- containerd
    let ctd_dir = tmp.path().join("containerd");
    std::fs::create_dir_all(&ctd_dir).unwrap();
    match start_containerd(&ctd_dir) {
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
                    .arg(format!("{host}/skopeo/multi:1")))
                .map(|_| ())
            });
            s.op("ctr images pull --plain-http --all-platforms", || {
                sh(ctr()
                    .args(["images", "pull", "--plain-http", "--all-platforms"])
                    .arg(format!("{host}/skopeo/index:1")))
                .map(|_| ())
            });
            s.op("ctr images push --plain-http", || {
                sh(ctr()
                    .args(["images", "tag"])
                    .arg(format!("{host}/skopeo/multi:1"))
                    .arg(format!("{host}/ctr/pushed:1")))?;
                sh(ctr()
                    .args(["images", "push", "--plain-http"])
                    .arg(format!("{host}/ctr/pushed:1")))?;
                let got = digest(&t.raw("ctr/pushed:1")?);
                expect(got == d(&multi), || format!("{got} != {}", d(&multi)))
            });
            s.op("ctr images push --plain-http (multi-arch index)", || {
                sh(ctr()
                    .args(["images", "tag"])
                    .arg(format!("{host}/skopeo/index:1"))
                    .arg(format!("{host}/ctr/index:1")))?;
                sh(ctr()
                    .args(["images", "push", "--plain-http"])
                    .arg(format!("{host}/ctr/index:1")))?;
                let got = digest(&t.raw("ctr/index:1")?);
                expect(got == d(&index), || format!("{got} != {}", d(&index)))
            });
        }
    }

    // ---- Docker engine
    let dkd_dir = tmp.path().join("dockerd");
    std::fs::create_dir_all(&dkd_dir).unwrap();
    match start_dockerd(&dkd_dir) {
        Err(e) => s.op("dockerd starts", || Err(e)),
        Ok((_daemon, dh)) => {
            s.op("docker pull", || {
                sh(docker(&dh)
                    .args(["pull", "-q"])
                    .arg(format!("{host}/skopeo/multi:1")))
                .map(|_| ())
            });
            s.op("docker push", || {
                sh(docker(&dh)
                    .arg("tag")
                    .arg(format!("{host}/skopeo/multi:1"))
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
                    .arg(format!("{host}/skopeo/multi:1")))?;
                sh(docker(&dh)
                    .args(["pull", "-q"])
                    .arg(format!("{host}/docker/pushed:1")))
                .map(|_| ())
            });
            let _ = sh(docker(&dh).args(["system", "prune", "-af"]));
        }
    }

    // ---- oras (Python SDK)
    s.op("oras push (monolithic and chunked), tags, pull", || {
        let script = tmp.path().join("oras_check.py");
        std::fs::write(&script, ORAS_SCRIPT).map_err(|e| e.to_string())?;
        let out = sh(Command::new("python3")
            .arg(&script)
            .arg(&host)
            .arg(tmp.path().join("oras"))
            .arg(d(&small)))?;
        expect(out.contains("oras ok"), || out.clone())
    });

    // ---- curl for what the others do not do
    s.op("curl: referrers of the image oras signed", || {
        let out = curl(&[&t.url(&format!("/v2/skopeo/small/referrers/{}", d(&small)))])?;
        let v: Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
        let n = v["manifests"].as_array().map(Vec::len).unwrap_or(0);
        expect(
            n == 1 && v["manifests"][0]["artifactType"] == "application/vnd.dev.berth.signature",
            || out.clone(),
        )
    });
    s.op("curl: catalog", || {
        let out = curl(&[&t.url("/v2/_catalog")])?;
        expect(
            [
                "skopeo/small",
                "podman/oci",
                "buildah/img",
                "ctr/pushed",
                "docker/pushed",
            ]
            .iter()
            .all(|r| out.contains(r)),
            || out.clone(),
        )
    });

    s.op(
        "berth's peak RSS over the whole run stays under 64 MiB",
        || {
            let kib = berth.peak_rss_kib();
            println!("  berth peak RSS: {} MiB", kib / 1024);
            expect(kib > 0 && kib < 64 * 1024, || format!("{kib} KiB"))
        },
    );
    drop(berth);
    println!("{} passed, {} failed", s.passed, s.failed.len());
    assert!(
        s.failed.is_empty(),
        "client operations failed:\n{}",
        s.failed.join("\n")
    );
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

/// Docker's per-registry CA directory, removed again on drop.
struct DockerCertsDir(PathBuf);

impl Drop for DockerCertsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every client again, against Berth with HTTPS (a CA made here, trusted through each client's
/// usual certificate directory or flag) and token auth: login, push and pull with credentials;
/// anonymous push refused; anonymous pull of public content allowed.
#[test]
fn real_clients_with_token_auth_over_tls() {
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
    let creds = "alice:alice-s3cret";
    let t = Tools::new(tmp.path(), &host, "unqualified-search-registries = []\n");
    let mut layout = Layout::new(&tmp.path().join("src"));
    let image = layout.image("amd64", &[300_000, 2 << 20], 11);
    layout.tag("app", &image);
    let want = image["digest"].as_str().unwrap_or_default().to_owned();
    let inspect = |reference: &str, with_creds: bool| -> Result<String, String> {
        let mut c = t.skopeo();
        c.args(["inspect", "--raw", "--cert-dir"]).arg(&cert_dir);
        if with_creds {
            c.args(["--creds", creds]);
        }
        let raw = sh(c.arg(format!("docker://{host}/{reference}")))?;
        Ok(digest(raw.as_bytes()))
    };
    let mut s = Suite::new();

    s.op("skopeo copy without credentials is refused", || {
        let r = sh(t
            .skopeo()
            .args(["copy", "--dest-cert-dir"])
            .arg(&cert_dir)
            .arg(layout.reference("app"))
            .arg(format!("docker://{host}/team/app:anon")));
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
                creds,
                "--dest-cert-dir",
            ])
            .arg(&cert_dir)
            .arg(layout.reference("app"))
            .arg(format!("docker://{host}/team/app:1")))?;
        let got = inspect("team/app:1", true)?;
        expect(got == want, || format!("{got} != {want}"))
    });
    s.op(
        "skopeo: private content needs credentials, public does not",
        || {
            expect(inspect("team/app:1", false).is_err(), || {
                "anonymous read of a private repository".into()
            })?;
            sh(t.skopeo()
                .args(["copy", "--dest-creds", creds, "--dest-cert-dir"])
                .arg(&cert_dir)
                .arg(layout.reference("app"))
                .arg(format!("docker://{host}/public/app:1")))?;
            let got = inspect("public/app:1", false)?;
            expect(got == want, || format!("{got} != {want}"))
        },
    );
    s.op("podman login / pull / push", || {
        sh(t.containers("podman")
            .args(["login", "--cert-dir"])
            .arg(&cert_dir)
            .args(["-u", "alice", "-p", "alice-s3cret", &host]))?;
        sh(t.containers("podman")
            .args(["pull", "-q", "--cert-dir"])
            .arg(&cert_dir)
            .arg(format!("{host}/team/app:1")))?;
        sh(t.containers("podman")
            .arg("tag")
            .arg(format!("{host}/team/app:1"))
            .arg(format!("{host}/team/podman:1")))?;
        sh(t.containers("podman")
            .args(["push", "-q", "--cert-dir"])
            .arg(&cert_dir)
            .arg(format!("{host}/team/podman:1")))?;
        inspect("team/podman:1", true).map(|_| ())
    });

    let ctd_dir = tmp.path().join("containerd");
    std::fs::create_dir_all(&ctd_dir).unwrap();
    match start_containerd(&ctd_dir) {
        Err(e) => s.op("containerd starts", || Err(e)),
        Ok((_daemon, sock)) => {
            let ctr = || {
                let mut c = Command::new(require("ctr"));
                c.arg("-a").arg(&sock).args(["-n", "berth-tls"]);
                c
            };
            // containerd's usual trust store: a hosts.toml per registry under a certs.d
            // directory. (ctr 1.6 talks plain HTTP to loopback hosts unless told otherwise.)
            let hosts_dir = tmp.path().join("certs.d");
            let reg_dir = hosts_dir.join(&host);
            std::fs::create_dir_all(&reg_dir).unwrap();
            std::fs::write(
                reg_dir.join("hosts.toml"),
                format!(
                    "server = \"https://{host}\"\n\n[host.\"https://{host}\"]\n  ca = \"{}\"\n",
                    ca.cert.display()
                ),
            )
            .unwrap();
            s.op("ctr images pull/push --user (CA from hosts.toml)", || {
                sh(ctr()
                    .args(["images", "pull", "--user", creds, "--hosts-dir"])
                    .arg(&hosts_dir)
                    .arg(format!("{host}/team/app:1")))?;
                sh(ctr()
                    .args(["images", "tag"])
                    .arg(format!("{host}/team/app:1"))
                    .arg(format!("{host}/team/ctr:1")))?;
                sh(ctr()
                    .args(["images", "push", "--user", creds, "--hosts-dir"])
                    .arg(&hosts_dir)
                    .arg(format!("{host}/team/ctr:1")))?;
                let got = inspect("team/ctr:1", true)?;
                expect(got == want, || format!("{got} != {want}"))
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

    // dockerd trusts a registry's CA from /etc/docker/certs.d/<host:port>/ca.crt.
    let certs_d = DockerCertsDir(PathBuf::from("/etc/docker/certs.d").join(&host));
    let dkd_dir = tmp.path().join("dockerd");
    std::fs::create_dir_all(&dkd_dir).unwrap();
    match std::fs::create_dir_all(&certs_d.0)
        .and_then(|()| std::fs::copy(&ca.cert, certs_d.0.join("ca.crt")))
        .map_err(|e| format!("{}: {e}", certs_d.0.display()))
        .and_then(|_| start_dockerd(&dkd_dir))
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
                    docker(&dh).args(["login", "-u", "alice", "--password-stdin", &host]),
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
                inspect("team/docker:1", true).map(|_| ())
            });
            let _ = sh(docker(&dh).args(["logout", &host]));
            let _ = sh(docker(&dh).args(["system", "prune", "-af"]));
        }
    }
    drop(certs_d);

    s.op("oras with credentials over TLS", || {
        let script = tmp.path().join("oras_auth.py");
        std::fs::write(&script, ORAS_AUTH_SCRIPT).map_err(|e| e.to_string())?;
        let out = sh(Command::new("python3")
            .arg(&script)
            .arg(&host)
            .arg(tmp.path().join("oras"))
            // oras-py keeps logins in the Docker config under $HOME: keep it in the temp dir.
            .env("HOME", tmp.path())
            .env("DOCKER_CONFIG", tmp.path().join("oras-docker"))
            .env("REQUESTS_CA_BUNDLE", &ca.cert))?;
        expect(out.contains("oras auth ok"), || out.clone())
    });

    drop(berth);
    println!("{} passed, {} failed", s.passed, s.failed.len());
    assert!(
        s.failed.is_empty(),
        "client operations failed:\n{}",
        s.failed.join("\n")
    );
}

/// Clients pulling through Berth as a mirror: containerd with a `hosts.toml` per upstream
/// (`?ns=` routing) for `docker.io` and `ghcr.io`, and dockerd with `registry-mirrors`. The
/// upstreams are Distribution (standing in for Docker Hub) and a Berth with token auth
/// (standing in for ghcr.io), both on loopback; every fallback path points at a dead local
/// port, so nothing can reach the internet.
#[test]
fn real_clients_through_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let hub_dir = tmp.path().join("hub");
    std::fs::create_dir_all(&hub_dir).unwrap();
    let hub = crate::support::spawn_distribution(&hub_dir);
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
    let host = mirror.addr.to_string();
    let t = Tools::new(tmp.path(), &host, "unqualified-search-registries = []\n");
    let mut layout = Layout::new(&tmp.path().join("src"));
    let image = layout.image("amd64", &[400_000, 3 << 20], 21);
    layout.tag("app", &image);
    let want = image["digest"].as_str().unwrap_or_default().to_owned();
    let mut s = Suite::new();
    s.op("seed the upstreams with skopeo", || {
        sh(t.skopeo()
            .args(["copy", "--preserve-digests", "--dest-tls-verify=false"])
            .arg(layout.reference("app"))
            .arg(format!("docker://{}/library/app:1", hub.addr)))?;
        sh(t.skopeo()
            .args(["copy", "--preserve-digests", "--dest-tls-verify=false"])
            .args(["--dest-creds", "mirror:mirror-pw"])
            .arg(layout.reference("app"))
            .arg(format!("docker://{}/org/app:1", ghcr.addr)))
        .map(|_| ())
    });
    let catalog = || -> Result<String, String> { curl(&[&format!("http://{host}/v2/_catalog")]) };

    let ctd_dir = tmp.path().join("containerd");
    std::fs::create_dir_all(&ctd_dir).unwrap();
    match start_containerd(&ctd_dir) {
        Err(e) => s.op("containerd starts", || Err(e)),
        Ok((_daemon, sock)) => {
            let hosts = tmp.path().join("certs.d");
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

    let dkd_dir = tmp.path().join("dockerd");
    std::fs::create_dir_all(&dkd_dir).unwrap();
    match start_dockerd_with(&dkd_dir, &[format!("--registry-mirror=http://{host}")]) {
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
    s.op("the mirror serves the upstream's digest unchanged", || {
        let raw = curl(&[
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
            &format!("http://{host}/v2/docker.io/library/app/manifests/1"),
        ])?;
        let got = digest(raw.as_bytes());
        expect(got == want, || format!("{got} != {want}"))
    });
    drop(mirror);
    println!("{} passed, {} failed", s.passed, s.failed.len());
    assert!(
        s.failed.is_empty(),
        "client operations failed:\n{}",
        s.failed.join("\n")
    );
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

/// Pushes an artifact with oras-py monolithically and in chunks (one a signature of the small
/// image), lists tags and pulls the artifact back.
const ORAS_SCRIPT: &str = r#"
import hashlib, json, os, sys
import oras.client
host, work, subject = sys.argv[1], sys.argv[2], sys.argv[3]
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
r = requests.get(f"http://{host}/v2/skopeo/small/manifests/{subject}", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
r.raise_for_status()
sub = oras.oci.Subject(mediaType=r.headers["Content-Type"], digest=subject, size=len(r.content))
with open("sig.txt", "w") as f:
    f.write("signature")
with open("sigconfig.json", "w") as f:
    f.write("{}")
c.push(target=f"{host}/skopeo/small:sig", files=["sig.txt"], manifest_config="sigconfig.json:application/vnd.dev.berth.signature", subject=sub)
print("oras ok")
"#;

/// One Berth as mirror and private registry (issue 15): its default upstream is Distribution
/// behind token auth (standing in for Docker Hub). skopeo and docker push (a) images built on
/// layers the cache holds, to new names, (b) to names the upstream also holds and the cache has
/// pulled, (c) with the upstream hung; each pulls back with the pushed digest, and the upstream
/// (registry and token service, counted in their own logs) sees no request during any push.
#[test]
fn real_clients_push_to_a_mirror_with_a_default_upstream() {
    let tmp = tempfile::tempdir().unwrap();
    let up_dir = tmp.path().join("hub");
    std::fs::create_dir_all(&up_dir).unwrap();
    let (tokens, realm, cert) = crate::support::start_token_server(&up_dir);
    let hub = crate::support::spawn_distribution_with(
        &up_dir,
        Some(crate::support::DistributionAuth::Token {
            realm: &realm,
            service: "berth-test",
            cert: &cert,
        }),
    );
    let upstream_requests = || {
        let (granted, refused) = crate::support::token_requests(&up_dir);
        crate::support::requests_logged(&up_dir) + granted + refused
    };
    let mirror = spawn_berth_with(
        &tmp.path().join("mirror-data"),
        Some(&format!(
            "[gc]\ninterval = \"0s\"\n[[proxy.upstream]]\nname = \"docker.io\"\nurl = \"{}\"\n\
             default = true\nusername = \"tester\"\npassword = \"s3cret\"\ntimeout = \"3s\"\n",
            hub.root()
        )),
    );
    let host = mirror.addr.to_string();
    let t = Tools::new(tmp.path(), &host, "unqualified-search-registries = []\n");
    let mut layout = Layout::new(&tmp.path().join("src"));
    // Images sharing layers: an image with one more layer of the same seed is built on it.
    let base = layout.image("amd64", &[300_000, 200_000], 31);
    let app = layout.image("amd64", &[300_000, 200_000, 50_000], 31);
    let held = layout.image("amd64", &[150_000], 32);
    let held_mine = layout.image("amd64", &[150_000, 40_000], 32);
    let offline = layout.image("amd64", &[60_000], 33);
    let held2 = layout.image("amd64", &[80_000], 34);
    for (tag, desc) in [
        ("base", &base),
        ("app", &app),
        ("held", &held),
        ("held-mine", &held_mine),
        ("offline", &offline),
        ("held2", &held2),
    ] {
        layout.tag(tag, desc);
    }
    let d = |v: &Value| v["digest"].as_str().unwrap_or_default().to_owned();
    let mut s = Suite::new();
    s.op("seed the upstream (token auth) with skopeo", || {
        for (tag, name) in [
            ("base", "library/base:1"),
            ("held", "team/held:1"),
            ("held2", "team/held2:1"),
        ] {
            sh(t.skopeo()
                .args(["copy", "--preserve-digests", "--dest-tls-verify=false"])
                .args(["--dest-creds", "tester:s3cret"])
                .arg(layout.reference(tag))
                .arg(format!("docker://{}/{name}", hub.addr)))?;
        }
        Ok(())
    });
    s.op("skopeo pulls through the mirror (plain names)", || {
        for name in ["library/base:1", "team/held:1", "team/held2:1"] {
            sh(t.skopeo()
                .args(["copy", "--src-tls-verify=false"])
                .arg(format!("docker://{host}/{name}"))
                .arg(format!("oci:{}:x", tmp.path().join("pulled").display())))?;
        }
        Ok(())
    });
    // A push, with the upstream's request count before and after.
    let quiet = |what: &str, push: &mut dyn FnMut() -> Result<(), String>| -> Result<(), String> {
        let before = upstream_requests();
        push()?;
        let after = upstream_requests();
        expect(after == before, || {
            format!("{what}: the upstream saw {} requests", after - before)
        })
    };
    let pushed = |name: &str, want: &str| -> Result<(), String> {
        let got = digest(&t.raw(name)?);
        expect(got == want, || format!("{name}: {got} != {want}"))
    };
    let skopeo_push = |tag: &str, name: &str| {
        sh(t.skopeo()
            .args(["copy", "--preserve-digests", "--dest-tls-verify=false"])
            .arg(layout.reference(tag))
            .arg(format!("docker://{host}/{name}")))
        .map(|_| ())
    };
    s.op("skopeo push: cached layers, new name", || {
        quiet("skopeo (a)", &mut || {
            skopeo_push("app", "team/skopeo-app:1")
        })?;
        pushed("team/skopeo-app:1", &d(&app))
    });
    s.op("skopeo push: a name the upstream holds", || {
        quiet("skopeo (b)", &mut || {
            skopeo_push("held-mine", "team/held:mine")
        })?;
        pushed("team/held:mine", &d(&held_mine))
    });
    s.op("skopeo push: upstream hung", || {
        hub.pause();
        tokens.pause();
        let start = Instant::now();
        let r = skopeo_push("offline", "team/skopeo-offline:1");
        let took = start.elapsed();
        hub.resume();
        tokens.resume();
        r?;
        expect(took < Duration::from_secs(10), || format!("took {took:?}"))?;
        pushed("team/skopeo-offline:1", &d(&offline))
    });

    let dkd_dir = tmp.path().join("dockerd");
    std::fs::create_dir_all(&dkd_dir).unwrap();
    match start_dockerd(&dkd_dir) {
        Err(e) => s.op("dockerd starts", || Err(e)),
        Ok((_daemon, dh)) => {
            // docker pulls through the mirror as a registry: the cache fills, docker keeps
            // the layers and remembers where they came from (it mounts from there on push).
            s.op("docker pull through the mirror (plain names)", || {
                for name in ["library/base:1", "team/held2:1"] {
                    sh(docker(&dh)
                        .args(["pull", "-q"])
                        .arg(format!("{host}/{name}")))?;
                }
                Ok(())
            });
            let docker_push = |src: &str, name: &str| -> Result<String, String> {
                sh(docker(&dh)
                    .arg("tag")
                    .arg(format!("{host}/{src}"))
                    .arg(format!("{host}/{name}")))?;
                let out = sh(docker(&dh).arg("push").arg(format!("{host}/{name}")))?;
                // "<tag>: digest: sha256:… size: N"
                out.split_whitespace()
                    .skip_while(|w| *w != "digest:")
                    .nth(1)
                    .map(str::to_owned)
                    .ok_or(out)
            };
            s.op("docker push: cached layers, new name", || {
                let mut got = String::new();
                quiet("docker (a)", &mut || {
                    got = docker_push("library/base:1", "team/docker-app:1")?;
                    Ok(())
                })?;
                // docker pushes its own (schema 2) form of the image: the mirror serves that.
                pushed("team/docker-app:1", &got)
            });
            s.op("docker push: a name the upstream holds", || {
                let mut got = String::new();
                quiet("docker (b)", &mut || {
                    got = docker_push("library/base:1", "team/held2:mine")?;
                    Ok(())
                })?;
                pushed("team/held2:mine", &got)
            });
            s.op("docker push: upstream hung", || {
                let archive = tmp.path().join("offline.tar");
                sh(t.skopeo()
                    .arg("copy")
                    .arg(layout.reference("offline"))
                    .arg(format!(
                        "docker-archive:{}:{host}/team/docker-offline:1",
                        archive.display()
                    )))?;
                sh(docker(&dh).arg("load").arg("-i").arg(&archive))?;
                hub.pause();
                tokens.pause();
                let start = Instant::now();
                let r = sh(docker(&dh)
                    .arg("push")
                    .arg(format!("{host}/team/docker-offline:1")));
                let took = start.elapsed();
                hub.resume();
                tokens.resume();
                r?;
                expect(took < Duration::from_secs(10), || format!("took {took:?}"))?;
                t.raw("team/docker-offline:1").map(|_| ())
            });
            s.op("docker pull of what docker pushed", || {
                let _ = sh(docker(&dh).args(["system", "prune", "-af"]));
                for name in [
                    "team/docker-app:1",
                    "team/held2:mine",
                    "team/docker-offline:1",
                ] {
                    sh(docker(&dh)
                        .args(["pull", "-q"])
                        .arg(format!("{host}/{name}")))?;
                }
                Ok(())
            });
            let _ = sh(docker(&dh).args(["system", "prune", "-af"]));
        }
    }
    s.op(
        "skopeo pulls back every pushed image with its digest",
        || {
            for (name, want) in [
                ("team/skopeo-app:1", d(&app)),
                ("team/held:mine", d(&held_mine)),
                ("team/skopeo-offline:1", d(&offline)),
            ] {
                let out = tmp.path().join("back");
                sh(t.skopeo()
                    .args(["copy", "--preserve-digests", "--src-tls-verify=false"])
                    .arg(format!("docker://{host}/{name}"))
                    .arg(format!("oci:{}:x", out.display())))?;
                let got = Layout::tagged_digest(&out, "x").unwrap_or_default();
                expect(got == want, || format!("{name}: {got} != {want}"))?;
            }
            Ok(())
        },
    );
    drop(mirror);
    println!("{} passed, {} failed", s.passed, s.failed.len());
    assert!(
        s.failed.is_empty(),
        "client operations failed:\n{}",
        s.failed.join("\n")
    );
}
