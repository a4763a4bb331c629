//! One Berth as mirror and private registry (issue 15): its default upstream is Distribution
//! behind token auth (standing in for Docker Hub). skopeo and docker each push (a) images built
//! on layers the cache holds, to new names, (b) to names the upstream also holds and the cache
//! has pulled, (c) with the upstream hung; each pulls back with the pushed digest, and the
//! upstream (registry and token service, counted in their own logs) sees no request during any
//! push. Each test has a setup of its own: they pause the upstream and count its requests.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{Suite, Tools, docker, expect, sh, start_dockerd};
use crate::support::{
    DistributionAuth, Layout, Proc, digest, requests_logged, spawn_berth_with,
    spawn_distribution_with, start_token_server, token_requests,
};

/// Fields drop in order: servers stop before their directory goes.
struct Setup {
    _mirror: Proc,
    hub: Proc,
    tokens: Proc,
    host: String,
    up_dir: PathBuf,
    t: Tools,
    layout: Layout,
    tmp: tempfile::TempDir,
}

impl Setup {
    /// The upstream with `library/base:1`, `team/held:1` and `team/held2:1`, a mirror of it as
    /// the default upstream, and those three pulled through the mirror by skopeo.
    fn start(s: &mut Suite) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let up_dir = tmp.path().join("hub");
        std::fs::create_dir_all(&up_dir).unwrap();
        let (tokens, realm, cert) = start_token_server(&up_dir);
        let hub = spawn_distribution_with(
            &up_dir,
            Some(DistributionAuth::Token {
                realm: &realm,
                service: "berth-test",
                cert: &cert,
            }),
        );
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
        for (tag, sizes, seed) in [
            ("base", &[300_000, 200_000][..], 31),
            ("app", &[300_000, 200_000, 50_000][..], 31),
            ("held", &[150_000][..], 32),
            ("held-mine", &[150_000, 40_000][..], 32),
            ("offline", &[60_000][..], 33),
            ("held2", &[80_000][..], 34),
        ] {
            let desc = layout.image("amd64", sizes, seed);
            layout.tag(tag, &desc);
        }
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
        Self {
            _mirror: mirror,
            hub,
            tokens,
            host,
            up_dir,
            t,
            layout,
            tmp,
        }
    }

    /// Every request the upstream saw: registry and token service.
    fn upstream_requests(&self) -> usize {
        let (granted, refused) = token_requests(&self.up_dir);
        requests_logged(&self.up_dir) + granted + refused
    }

    /// Runs `push`; an error when the upstream saw a request meanwhile.
    fn quietly(&self, what: &str, push: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
        let before = self.upstream_requests();
        push()?;
        let after = self.upstream_requests();
        expect(after == before, || {
            format!("{what}: the upstream saw {} requests", after - before)
        })
    }

    /// Runs `push` with the upstream hung (SIGSTOP); an error when it took long.
    fn hung(&self, push: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
        self.hub.pause();
        self.tokens.pause();
        let start = Instant::now();
        let r = push();
        let took = start.elapsed();
        self.hub.resume();
        self.tokens.resume();
        r?;
        expect(took < Duration::from_secs(10), || format!("took {took:?}"))
    }

    /// Whether the mirror serves `want` for `name`.
    fn serves(&self, name: &str, want: &str) -> Result<(), String> {
        let got = digest(&self.t.raw(name)?);
        expect(got == want, || format!("{name}: {got} != {want}"))
    }

    fn digest_of(&self, tag: &str) -> String {
        Layout::tagged_digest(&self.layout.dir, tag).unwrap_or_default()
    }
}

#[test]
fn real_clients_mirror_push_skopeo() {
    let mut s = Suite::new();
    let m = Setup::start(&mut s);
    let (host, t) = (&m.host, &m.t);
    let push = |tag: &str, name: &str| {
        sh(t.skopeo()
            .args(["copy", "--preserve-digests", "--dest-tls-verify=false"])
            .arg(m.layout.reference(tag))
            .arg(format!("docker://{host}/{name}")))
        .map(|_| ())
    };
    s.op("skopeo push: cached layers, new name", || {
        m.quietly("skopeo (a)", || push("app", "team/skopeo-app:1"))?;
        m.serves("team/skopeo-app:1", &m.digest_of("app"))
    });
    s.op("skopeo push: a name the upstream holds", || {
        m.quietly("skopeo (b)", || push("held-mine", "team/held:mine"))?;
        m.serves("team/held:mine", &m.digest_of("held-mine"))
    });
    s.op("skopeo push: upstream hung", || {
        m.hung(|| push("offline", "team/skopeo-offline:1"))?;
        m.serves("team/skopeo-offline:1", &m.digest_of("offline"))
    });
    s.op(
        "skopeo pulls back every pushed image with its digest",
        || {
            for (name, tag) in [
                ("team/skopeo-app:1", "app"),
                ("team/held:mine", "held-mine"),
                ("team/skopeo-offline:1", "offline"),
            ] {
                let out = m.tmp.path().join("back");
                sh(t.skopeo()
                    .args(["copy", "--preserve-digests", "--src-tls-verify=false"])
                    .arg(format!("docker://{host}/{name}"))
                    .arg(format!("oci:{}:x", out.display())))?;
                let got = Layout::tagged_digest(&out, "x").unwrap_or_default();
                let want = m.digest_of(tag);
                expect(got == want, || format!("{name}: {got} != {want}"))?;
            }
            Ok(())
        },
    );
    s.finish();
}

#[test]
fn real_clients_mirror_push_docker() {
    let mut s = Suite::new();
    let m = Setup::start(&mut s);
    let (host, t) = (&m.host, &m.t);
    let dir = tempfile::tempdir().unwrap();
    match start_dockerd(dir.path()) {
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
            // docker pushes its own (schema 2) form of an image: the digest it prints is what
            // the mirror must serve.
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
            for (what, name, label) in [
                ("cached layers, new name", "team/docker-app:1", "docker (a)"),
                ("a name the upstream holds", "team/held2:mine", "docker (b)"),
            ] {
                s.op(&format!("docker push: {what}"), || {
                    let mut got = String::new();
                    m.quietly(label, || {
                        got = docker_push("library/base:1", name)?;
                        Ok(())
                    })?;
                    m.serves(name, &got)
                });
            }
            s.op("docker push: upstream hung", || {
                let archive = dir.path().join("offline.tar");
                sh(t.skopeo()
                    .arg("copy")
                    .arg(m.layout.reference("offline"))
                    .arg(format!(
                        "docker-archive:{}:{host}/team/docker-offline:1",
                        archive.display()
                    )))?;
                sh(docker(&dh).arg("load").arg("-i").arg(&archive))?;
                m.hung(|| {
                    sh(docker(&dh)
                        .arg("push")
                        .arg(format!("{host}/team/docker-offline:1")))
                    .map(|_| ())
                })?;
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
    s.finish();
}
