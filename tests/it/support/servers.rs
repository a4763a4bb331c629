//! Test servers: Berth in-process or as a child process, Distribution (Debian's
//! `docker-registry`) as a reference or an upstream, and a token server. Everything listens on
//! 127.0.0.1 only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth::config::Config;
use tokio::sync::oneshot;

/// Berth running inside the test process.
pub(crate) struct TestServer {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub state: berth::AppState,
    /// Dropping it shuts the server down.
    _stop: oneshot::Sender<()>,
}

impl TestServer {
    pub(crate) async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub(crate) async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        // Warnings and failures of in-process servers show in a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("warn")
            .with_ansi(false)
            .try_init();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config {
            data: dir.path().to_owned(),
            ..Config::default()
        };
        tweak(&mut config);
        let state = berth::AppState::open(config).await.expect("open storage");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel();
        tokio::spawn(berth::serve(listener, state.clone(), async {
            let _ = rx.await;
        }));
        Self {
            addr,
            dir,
            state,
            _stop: tx,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub(crate) fn root(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A child process, killed on drop.
pub(crate) struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub(crate) fn root(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Peak resident set size (VmHWM) in KiB.
    pub(crate) fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Page faults the process has taken that needed no disk read (fresh or reclaimed pages).
    pub(crate) fn minor_faults(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("/proc/<pid>/stat");
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        fields
            .get(7)
            .and_then(|v| v.parse().ok())
            .expect("minflt in /proc/<pid>/stat")
    }

    /// Bytes the process has put in the page cache to be written to storage so far (the
    /// kernel's `write_bytes`, counted when a page is dirtied, so a file removed before it
    /// reaches the disk counts too).
    pub(crate) fn write_bytes(&self) -> u64 {
        let io = std::fs::read_to_string(format!("/proc/{}/io", self.child.id()))
            .expect("/proc/<pid>/io: the kernel keeps no I/O accounting");
        io.lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("write_bytes in /proc/<pid>/io")
    }

    /// Stops the process (SIGSTOP): it keeps its sockets, so connections are accepted by the
    /// kernel and then hang, as with a wedged upstream.
    pub(crate) fn pause(&self) {
        signal(self.child.id(), "STOP");
    }

    /// Lets a paused process run again (SIGCONT).
    pub(crate) fn resume(&self) {
        signal(self.child.id(), "CONT");
    }

    pub(crate) fn sigkill(mut self) {
        let _ = self.child.kill(); // SIGKILL on Unix
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

/// Requests Distribution (started by [`spawn_distribution`]) logged in `dir`.
pub(crate) fn requests_logged(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("access.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" HTTP/1.1\""))
        .count()
}

/// A loopback port nothing listens on.
///
/// The kernel hands a port that was just freed to the next asker, so two tests asking at once
/// could both start servers on it (a token server and another test's Distribution did): a port
/// is given out at most once in this process.
pub(crate) fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if given.insert(port) {
            return port;
        }
    }
}

/// Waits until something accepts connections on `addr`.
pub(crate) fn wait_listening(addr: SocketAddr, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{what} did not start listening on {addr}; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// Runs the `berth` binary on a free loopback port with `data` as its data directory.
pub(crate) fn spawn_berth(data: &Path) -> Proc {
    spawn_berth_with(data, None)
}

/// Like [`spawn_berth`], with a configuration file's text.
pub(crate) fn spawn_berth_with(data: &Path, config: Option<&str>) -> Proc {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    spawn_berth_at(addr, data, config, &[])
}

/// Runs the `berth` binary on `addr`, with a configuration file's text and further `serve`
/// arguments.
pub(crate) fn spawn_berth_at(
    addr: SocketAddr,
    data: &Path,
    config: Option<&str>,
    args: &[String],
) -> Proc {
    let log = data.with_extension("log");
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
    cmd.args(["serve", "--listen", &addr.to_string(), "--data"])
        .arg(data);
    if let Some(text) = config {
        let file = data.with_extension("toml");
        std::fs::write(&file, text).expect("write config");
        cmd.arg("--config").arg(file);
    }
    cmd.args(args);
    let child = cmd
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .expect("spawn berth");
    wait_listening(addr, "berth", &log);
    Proc { child, addr }
}

/// The reference registry (CNCF Distribution 2.8, Debian's `docker-registry`), deletes on.
pub(crate) fn spawn_distribution(dir: &Path) -> Proc {
    spawn_distribution_with(dir, None)
}

/// How a test Distribution authenticates clients.
pub(crate) enum DistributionAuth<'a> {
    /// Basic auth from an htpasswd file.
    Htpasswd(&'a Path),
    /// Docker token auth: the realm URL, the service, and the certificate tokens are signed with.
    Token {
        realm: &'a str,
        service: &'a str,
        cert: &'a Path,
    },
}

/// Distribution with the given client authentication.
pub(crate) fn spawn_distribution_with(dir: &Path, auth: Option<DistributionAuth<'_>>) -> Proc {
    let bin = which("docker-registry").expect(
        "docker-registry is not installed: `apt-get install docker-registry` (./scripts/test does it)",
    );
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let config = dir.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{}",
            dir.join("data").display(),
            match auth {
                None => String::new(),
                Some(DistributionAuth::Htpasswd(p)) =>
                    format!("auth:\n  htpasswd:\n    realm: berth-test\n    path: {}\n", p.display()),
                Some(DistributionAuth::Token { realm, service, cert }) => format!(
                    "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: berth-test-issuer\n    rootcertbundle: {}\n",
                    cert.display()
                ),
            }
        ),
    )
    .expect("write config");
    let log = dir.join("registry.log");
    let out = std::fs::File::create(&log).expect("log");
    // Its access log (one line per request, on stdout) lets tests count upstream requests.
    let access = std::fs::File::create(dir.join("access.log")).expect("access log");
    let child = Command::new(bin)
        .arg("serve")
        .arg(&config)
        .stdout(access)
        .stderr(out)
        .spawn()
        .expect("spawn docker-registry");
    wait_listening(addr, "docker-registry", &log);
    Proc { child, addr }
}

/// Finds a program on PATH (or in /usr/sbin, /usr/bin).
pub(crate) fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/usr/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// A program the test needs; a clear failure when absent.
pub(crate) fn require(name: &str) -> PathBuf {
    which(name).unwrap_or_else(|| {
        panic!("{name} is not installed; ./scripts/test installs the test dependencies")
    })
}

/// `sha256:<hex>`.
pub(crate) fn digest(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// An HTTP client (installs the TLS crypto provider the build uses, once).
pub(crate) fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// The body of a GET of `url` (whatever its status; callers check the bytes).
pub(crate) async fn get_bytes(
    client: &reqwest::Client,
    url: impl reqwest::IntoUrl,
) -> bytes::Bytes {
    client.get(url).send().await.unwrap().bytes().await.unwrap()
}

/// Times `n` sequential GETs of `url` over one kept-alive connection of `client`; returns the
/// median. A server that leaves Nagle's algorithm on answers about half of them ~40 ms late
/// (its body waits for the client's delayed ACK of the headers).
pub(crate) async fn median_small_get(client: &reqwest::Client, url: &str, n: usize) -> Duration {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let r = client.get(url).send().await.expect("GET");
        assert_eq!(r.status(), reqwest::StatusCode::OK, "{url}");
        r.bytes().await.expect("body");
        times.push(start.elapsed());
    }
    times.sort();
    times[n / 2]
}

/// Starts tests/it/fixtures/token_server.py (an external Docker token server signing RS256
/// tokens with an `x5c` header, issuer `berth-test-issuer`, service `berth-test`, user
/// `tester`/`s3cret`); the process, its realm URL and its certificate. Each request it
/// answers is a line in `<dir>/token-requests.log` ([`token_requests`] counts them).
pub(crate) fn start_token_server(dir: &Path) -> (Proc, String, PathBuf) {
    let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
    let out = std::process::Command::new(require("openssl"))
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=berth-test-token",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/fixtures/token_server.py");
    let log = dir.join("token.log");
    let child = std::process::Command::new("python3")
        .arg(script)
        .arg(port.to_string())
        .args(["berth-test", "tester", "s3cret"])
        .arg(&key)
        .arg(&cert)
        .stdout(std::fs::File::create(dir.join("token-requests.log")).expect("log"))
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("token server");
    let token_server = Proc {
        child,
        addr: format!("127.0.0.1:{port}").parse().expect("addr"),
    };
    wait_listening(token_server.addr, "token server", &log);
    let realm = format!("http://127.0.0.1:{port}/token");
    (token_server, realm, cert)
}

/// Logins the token server of `dir` saw: (granted, refused).
pub(crate) fn token_requests(dir: &Path) -> (usize, usize) {
    let log = std::fs::read_to_string(dir.join("token-requests.log")).unwrap_or_default();
    (
        log.lines().filter(|l| *l == "granted").count(),
        log.lines().filter(|l| *l == "refused").count(),
    )
}

/// Turns authentication on in `c` (`mode`) with `users` (name, password) in an htpasswd file
/// under its data directory.
pub(crate) fn with_users(c: &mut Config, mode: berth::config::AuthMode, users: &[(&str, &str)]) {
    let lines: String = users
        .iter()
        .map(|(u, p)| format!("{u}:{}\n", berth_auth::htpasswd::hash(p, 4).expect("hash")))
        .collect();
    let path = c.data.join("htpasswd");
    std::fs::write(&path, lines).expect("htpasswd");
    c.auth.mode = mode;
    c.auth.htpasswd = Some(path);
}
