//! The `berth` binary: parse the command line, load the configuration, run.

use anyhow::Context;
use berth::cli::{Cli, Command, FsckArgs, GcArgs, MigrateArgs, PrefetchArgs, ServeArgs};
use berth::config::Config;
use clap::Parser;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("Error: {}", report(&e));
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: a message that already quotes its
/// cause (`opening storage: <cause>`) is not followed by that cause again.
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file, no_files } => {
            let config = Config::read(&file)?;
            let problems = if no_files {
                match config.validate() {
                    Ok(()) => Vec::new(),
                    Err(berth::config::ConfigError::Invalid(p)) => p,
                    Err(e) => vec![e.to_string()],
                }
            } else {
                berth::preflight::check(&config)
            };
            if !problems.is_empty() {
                return Err(berth::config::ConfigError::Invalid(problems).into());
            }
            eprintln!("{}: ok", file.display());
            Ok(())
        }
        Command::Serve(args) => {
            tune_malloc();
            serve(args)
        }
        Command::Gc(args) => gc(args),
        Command::Fsck(args) => fsck(args),
        Command::MigrateMetadata(args) => migrate_metadata(args),
        Command::Prefetch(args) => prefetch(args),
        Command::Healthcheck { listen } => healthcheck(listen),
        Command::Passwd { user, cost } => passwd(&user, cost),
    }
}

/// glibc malloc settings for the server: buffers up to 2 MiB come from the heap and stay there
/// (up to 16 MiB of free heap top per arena), instead of each buffer over 128 KiB being fresh
/// pages from the kernel, faulted in and zeroed and given back. Left to its defaults, a 1 GiB
/// push faulted in about 100,000 pages, a tenth of its CPU; with these, under 2,000.
const MALLOC_TUNABLES: &str =
    "glibc.malloc.mmap_threshold=2097152:glibc.malloc.trim_threshold=16777216";

/// glibc reads its malloc tunables once, from the environment, as the process starts, and
/// setting them from inside would take `unsafe` (`mallopt`), which this workspace forbids. So a
/// server started without `GLIBC_TUNABLES` starts itself again, once, with
/// [`MALLOC_TUNABLES`] (the same process: `exec` keeps its id). Setting `GLIBC_TUNABLES`, even
/// to nothing, keeps whatever it says instead. When the binary cannot be run again (replaced
/// on disk while running), the server runs with glibc's defaults.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt as _;
        if std::env::var_os("GLIBC_TUNABLES").is_some() {
            return;
        }
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let mut args = std::env::args_os();
        let mut cmd = std::process::Command::new(exe);
        if let Some(arg0) = args.next() {
            cmd.arg0(arg0);
        }
        // Returns only when the exec failed; the server then runs untuned.
        let _ = cmd.args(args).env("GLIBC_TUNABLES", MALLOC_TUNABLES).exec();
    }
}

/// Says in the log how malloc is tuned, when it is not as [`tune_malloc`] meant.
fn log_malloc_tuning() {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return;
    }
    match std::env::var_os("GLIBC_TUNABLES") {
        Some(t) if t == MALLOC_TUNABLES => {}
        Some(t) if t.is_empty() => {
            tracing::info!("GLIBC_TUNABLES is empty: malloc keeps glibc's defaults")
        }
        Some(t) => tracing::info!(
            tunables = %t.to_string_lossy(),
            "malloc tuned by GLIBC_TUNABLES from the environment"
        ),
        None => {
            tracing::warn!("could not restart with malloc tuned; running with glibc's defaults")
        }
    }
}

/// Reads a password from standard input and prints `user:<bcrypt hash>`.
fn passwd(user: &str, cost: u32) -> anyhow::Result<()> {
    anyhow::ensure!(
        !user.is_empty() && !user.contains(':'),
        "a user name must be non-empty and must not contain ':'"
    );
    let mut password = String::new();
    std::io::stdin().read_line(&mut password)?;
    let password = password.trim_end_matches(['\r', '\n']);
    anyhow::ensure!(!password.is_empty(), "no password on standard input");
    let hash = berth_auth::htpasswd::hash(password, cost)?;
    #[allow(clippy::print_stdout)]
    {
        println!("{user}:{hash}");
    }
    Ok(())
}

/// One `GET /livez` over HTTP/1.0 with a short timeout.
fn healthcheck(mut addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let timeout = std::time::Duration::from_secs(2);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"GET /livez HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut head = [0u8; 32];
    let n = s.read(&mut head)?;
    let line = String::from_utf8_lossy(&head[..n]);
    anyhow::ensure!(
        line.starts_with("HTTP/1.") && line.contains(" 200"),
        "unhealthy: {line}"
    );
    Ok(())
}

fn load(config: Option<&std::path::Path>) -> anyhow::Result<Config> {
    Ok(match config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    })
}

fn migrate_metadata(args: MigrateArgs) -> anyhow::Result<()> {
    use berth_storage::meta::migrate;
    berth::telemetry::init(&berth::config::LogSection::default());
    let url = match (args.to, args.to_file) {
        (Some(u), _) => u,
        (None, Some(f)) => std::fs::read_to_string(&f)
            .with_context(|| format!("reading {}", f.display()))?
            .trim()
            .to_owned(),
        (None, None) => anyhow::bail!("give --to <postgres url> or --to-file <file>"),
    };
    let to = berth_storage::meta::postgres::PgConfig { url, pool_size: 2 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let last = std::sync::Mutex::new(std::time::Instant::now());
    let progress = |table: &str, done: u64, total: u64| {
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        if done == total || last.elapsed() >= std::time::Duration::from_secs(1) {
            *last = std::time::Instant::now();
            eprintln!("{table}: {done}/{total}");
        }
    };
    let report = rt.block_on(migrate::sqlite_to_postgres(
        &args.from,
        &to,
        args.dry_run,
        &progress,
    ))?;
    println!("{report}");
    Ok(())
}

fn gc(args: GcArgs) -> anyhow::Result<()> {
    let (config, rt) = tool(args.config.as_deref(), args.data)?;
    rt.block_on(async move {
        // Storage only: no proxy spool, no auth keys. Safe beside a running server: everything
        // that protects content (acknowledged blobs, the gc lease) lives in the database.
        // On a full disk, the reserve makes room for the collection's own bookkeeping.
        berth::disk::Disk::new(&config.data, config.limits.disk_reserve.as_u64()).prepare();
        let store = open_store(&config).await?;
        let report = match store.gc(&config.gc_policy(), args.dry_run).await {
            Ok(r) => r,
            Err(e @ berth_storage::Error::Busy { .. }) => {
                anyhow::bail!("{e}; try again when it has finished")
            }
            Err(e) if e.is_storage_full() => anyhow::bail!(
                "{e}: the disk is full to the last byte, and a collection needs a little room to \
                 record its work (Berth's reserve in the data directory is already spent); free \
                 a few MiB (other files on this disk), then run it again"
            ),
            Err(e) => return Err(e.into()),
        };
        #[allow(clippy::print_stdout)]
        {
            println!("{report}");
        }
        Ok(())
    })
}

/// What `gc`, `fsck` and `prefetch` share: the configuration (with `--data` applied), logging,
/// and a runtime.
fn tool(
    config: Option<&std::path::Path>,
    data: Option<std::path::PathBuf>,
) -> anyhow::Result<(Config, tokio::runtime::Runtime)> {
    let mut config = load(config)?;
    if let Some(d) = data {
        config.data = d;
    }
    berth::telemetry::init(&config.log);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    Ok((config, rt))
}

/// Storage as a tool opens it, beside a running server or without one.
async fn open_store(config: &Config) -> anyhow::Result<berth_storage::Store> {
    let storage = config.storage_config()?;
    berth_storage::Store::open(&storage)
        .await
        .context("opening storage")
}

fn fsck(args: FsckArgs) -> anyhow::Result<()> {
    let (config, rt) = tool(args.config.as_deref(), args.data)?;
    let clean = rt.block_on(async move {
        let store = open_store(&config).await?;
        // Cached repositories may name content not fetched yet: their references are not
        // problems.
        let caches = berth::proxy::cache_namespaces(&config);
        let opts = berth_storage::FsckOptions {
            verify_digests: args.verify_digests,
            repair: args.repair,
            grace: args.grace.unwrap_or(config.gc.grace),
            is_cache: Box::new(move |name| {
                let first = berth::proxy::first_component(name);
                caches.iter().any(|c| c == first)
            }),
            progress: Some(Box::new(|p| {
                let secs = p.elapsed.as_secs_f64().max(1e-3);
                #[allow(clippy::print_stderr)]
                {
                    eprintln!(
                        "verified {}/{} blobs, {} of {} ({:.0}%), {}/s",
                        p.blobs,
                        p.blobs_total,
                        bytesize::ByteSize::b(p.bytes),
                        bytesize::ByteSize::b(p.bytes_total),
                        if p.bytes_total == 0 {
                            100.0
                        } else {
                            p.bytes as f64 * 100.0 / p.bytes_total as f64
                        },
                        bytesize::ByteSize::b((p.bytes as f64 / secs) as u64)
                    );
                }
            })),
        };
        let report = store.fsck(&opts).await?;
        #[allow(clippy::print_stdout)]
        {
            println!("{report}");
        }
        anyhow::Ok(report.unrepaired == 0)
    })?;
    if !clean {
        std::process::exit(1);
    }
    Ok(())
}

fn prefetch(args: PrefetchArgs) -> anyhow::Result<()> {
    let (config, rt) = tool(args.config.as_deref(), args.data)?;
    rt.block_on(async move {
        use berth::proxy::prefetch::{LEASE, LEASE_TTL};
        let store = std::sync::Arc::new(open_store(&config).await?);
        // A spool of its own: the server's is in use by its own fetches.
        let spool = tempfile_dir(&config.data)?;
        let proxy = berth::proxy::Proxy::from_config(
            &config,
            store.clone(),
            berth::proxy::Spool::At(spool.clone()),
        )
        .map_err(anyhow::Error::msg)?
        .filter(berth::proxy::Proxy::has_prefetch)
        .context("no [[proxy.upstream]] lists images to prefetch")?;
        let held = match store.hold_lease(LEASE, LEASE_TTL).await {
            Ok(h) => h,
            Err(e @ berth_storage::Error::Busy { .. }) => {
                anyhow::bail!("{e}; try again when it has finished")
            }
            Err(e) => return Err(e.into()),
        };
        let done = proxy
            .prefetch(|p| {
                #[allow(clippy::print_stdout)]
                {
                    println!("{p}");
                }
            })
            .await;
        held.release().await?;
        let _ = std::fs::remove_dir_all(&spool);
        let failed = done.iter().filter(|p| p.error.is_some()).count();
        let bytes: u64 = done.iter().map(|p| p.bytes).sum();
        #[allow(clippy::print_stdout)]
        {
            println!(
                "prefetch: {} images, {} failed, {bytes} bytes fetched",
                done.len(),
                failed
            );
        }
        anyhow::ensure!(failed == 0, "{failed} images could not be prefetched");
        Ok(())
    })
}

/// A fresh directory under `data` for this process's use.
fn tempfile_dir(data: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let dir = data.join(format!("proxy-spool-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Validated below, after the command line's overrides, with the file-level checks.
    let mut config = match args.config.as_deref() {
        Some(path) => Config::read(path)?,
        None => Config::default(),
    };
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(d) = args.data {
        config.data = d;
    }
    if let Some(p) = args.peer_url {
        config.peer_url = Some(p);
    }
    // The same checks as `berth check-config`, every problem at once, before anything starts.
    let problems = berth::preflight::check(&config);
    if !problems.is_empty() {
        return Err(berth::config::ConfigError::Invalid(problems).into());
    }
    berth::telemetry::init(&config.log);
    log_malloc_tuning();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(64)
        .build()?;
    rt.block_on(async move {
        let listen = config.listen;
        let summary = config.summary();
        let data = config.data.display().to_string();
        let peer_url = config.peer_url.clone().unwrap_or_default();
        // Its errors say what failed: storage, authentication, the cache.
        let state = berth::AppState::open(config).await?;
        let listener = bind(listen).with_context(|| format!("binding {listen}"))?;
        tracing::info!(
            addr = %listener.local_addr()?,
            data,
            storage = summary.storage,
            metadata = summary.metadata,
            auth = summary.auth,
            upstreams = summary.upstreams,
            peer_url,
            "berth listening"
        );
        berth::serve(listener, state, shutdown_signal()).await?;
        tracing::info!("berth stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
}

/// How many connections the kernel may queue before the server accepts them. tokio's `bind`
/// asks for 1,024; a fleet of nodes starting at once can open more, and connections the queue
/// drops wait seconds for the kernel's retransmits. The kernel caps it at `somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// A listener on `addr` with address reuse (a restart does not wait out TIME_WAIT) and a
/// [`LISTEN_BACKLOG`] queue.
fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
