//! Replicas: several `berth` processes over one PostgreSQL database and one S3 prefix, behind
//! Debian's haproxy (round robin, a health check on `/readyz`, connection failures retried on
//! another replica). Every part listens on 127.0.0.1, on ports picked free at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::postgres::fresh_database;
use super::servers::{Proc, free_port, require, spawn_berth_at, wait_listening};
use crate::backends::{endpoint, unique};

/// Replicas behind a balancer. Fields drop in order: the balancer, then the replicas, then
/// their directory.
pub(crate) struct Cluster {
    pub balancer: Proc,
    /// `None` once killed.
    pub replicas: Vec<Option<Proc>>,
    /// The configuration file every replica (and `berth gc` from outside) runs with.
    pub config: PathBuf,
    /// The metadata database's URL.
    pub db: String,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// `n` replicas for a test named `what`, their configuration `extra` added after the
    /// storage and metadata sections (TOML: top-level keys are not allowed there).
    pub(crate) fn start(what: &str, n: usize, extra: &str) -> Self {
        Self::start_on(n, &unique(what), &blocking_fresh_database(what), extra)
    }

    /// `n` replicas over the S3 `prefix` and the database at `db`.
    pub(crate) fn start_on(n: usize, prefix: &str, db: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = db.to_owned();
        let text = format!(
            "{}\n[metadata]\nbackend = \"postgres\"\nurl = \"{db}\"\npool_size = 8\n\n{extra}\n",
            s3_storage(prefix)
        );
        let config = dir.path().join("berth.toml");
        std::fs::write(&config, &text).expect("write config");
        let addrs: Vec<SocketAddr> = (0..n)
            .map(|_| format!("127.0.0.1:{}", free_port()).parse().expect("addr"))
            .collect();
        let replicas = addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                Some(spawn_berth_at(
                    *addr,
                    &dir.path().join(format!("replica-{i}")),
                    Some(&text),
                    &["--peer-url".to_owned(), format!("http://{addr}")],
                ))
            })
            .collect();
        let balancer = spawn_haproxy(dir.path(), &addrs);
        Self {
            balancer,
            replicas,
            config,
            db,
            dir,
        }
    }

    /// The balancer's URL.
    pub(crate) fn root(&self) -> String {
        self.balancer.root()
    }

    /// `host:port` of the balancer, as clients name a registry.
    pub(crate) fn host(&self) -> String {
        self.balancer.addr.to_string()
    }

    /// The URL of replica `i`, bypassing the balancer.
    pub(crate) fn replica(&self, i: usize) -> String {
        self.replicas[i]
            .as_ref()
            .expect("replica is running")
            .root()
    }

    /// kill -9 of replica `i`.
    pub(crate) fn kill(&mut self, i: usize) {
        if let Some(p) = self.replicas[i].take() {
            p.sigkill();
        }
    }

    /// What replica `i` logged.
    pub(crate) fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("replica-{i}.log")))
            .unwrap_or_default()
    }

    /// Requests each running replica has answered (from its `/metrics`).
    pub(crate) async fn requests_per_replica(&self) -> Vec<u64> {
        let c = super::client();
        let mut out = Vec::new();
        for p in self.replicas.iter().flatten() {
            let text = c
                .get(format!("{}/metrics", p.root()))
                .send()
                .await
                .expect("metrics")
                .text()
                .await
                .expect("metrics body");
            // Registry requests only: not the balancer's health checks.
            let n: f64 = text
                .lines()
                .filter(|l| l.starts_with("berth_requests_total{"))
                .filter(|l| !l.contains("endpoint=\"other\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            out.push(n as u64);
        }
        out
    }

    /// Runs `berth gc` from outside the replicas, on their configuration; its report.
    pub(crate) fn gc_from_outside(&self) -> Result<String, String> {
        let out = Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("gc")
            .arg("--config")
            .arg(&self.config)
            .arg("--data")
            .arg(self.dir.path().join("gc-cli"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            Ok(text)
        } else {
            Err(text)
        }
    }
}

impl Drop for Cluster {
    /// A failing test shows every replica's last warnings and errors.
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 0..self.replicas.len() {
                let log = self.log(i);
                let tail: Vec<&str> = log
                    .lines()
                    .rev()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .take(20)
                    .collect();
                eprintln!("--- replica {i}, last warnings and errors:");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// The `[storage]` section for the test S3 server under `prefix`.
pub(crate) fn s3_storage(prefix: &str) -> String {
    format!(
        "[storage]\nbackend = \"s3\"\nbucket = \"registry\"\nprefix = \"{prefix}\"\n\
         endpoint = \"{s3}\"\nregion = \"us-east-1\"\naccess_key_id = \"test\"\n\
         secret_access_key = \"test\"\nallow_http = true\n",
        s3 = endpoint("BERTH_TEST_S3_ENDPOINT"),
    )
}

/// A fresh database, from synchronous code (client tests) or inside a runtime alike.
pub(crate) fn blocking_fresh_database(what: &str) -> String {
    let what = what.replace(['-', '/'], "_");
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(fresh_database(&what))
    })
    .join()
    .expect("creating a database")
}

/// haproxy in front of `servers`: round robin per request, `/readyz` checked every 300 ms,
/// a connection that fails retried on another server. A check may take up to 5 s: without
/// `timeout check` haproxy gives it only `inter`, and the test S3 server, shared by every test
/// and answering one request at a time, can make a readiness probe slower than 300 ms, which
/// would take every replica out of rotation (`503` from haproxy) with nothing wrong.
pub(crate) fn spawn_haproxy(dir: &Path, servers: &[SocketAddr]) -> Proc {
    let bin = require("haproxy");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut cfg = format!(
        "global\n  maxconn 4096\n\
         defaults\n  mode http\n  timeout connect 2s\n  timeout client 300s\n  \
         timeout server 300s\n  timeout check 5s\n  retries 3\n  option redispatch 1\n\
         frontend registry\n  bind {addr}\n  default_backend replicas\n\
         backend replicas\n  balance roundrobin\n  option httpchk GET /readyz\n"
    );
    for (i, s) in servers.iter().enumerate() {
        cfg += &format!("  server r{i} {s} check inter 300ms fall 2 rise 2\n");
    }
    let file = dir.join("haproxy.cfg");
    std::fs::write(&file, cfg).expect("write haproxy.cfg");
    let log = dir.join("haproxy.log");
    let child = Command::new(bin)
        .arg("-db")
        .arg("-f")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn haproxy");
    wait_listening(addr, "haproxy", &log);
    Proc { child, addr }
}
