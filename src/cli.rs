//! Command-line interface.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Berth: a container registry and pull-through image cache.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the registry.
    Serve(ServeArgs),
    /// Collect garbage once and print what was removed. Safe against a stopped or a running
    /// Berth on the same data: the metadata database serialises it with the server's writes.
    Gc(GcArgs),
    /// Check that the registry is whole: every blob's object exists with its size (and, with
    /// `--verify-digests`, its digest), no blob object lacks its row, every manifest reference
    /// resolves, upload sessions have their chunks. Prints a summary; exits 1 on problems.
    /// `--repair` makes the safe repairs and says what it did. Safe beside a running server.
    Fsck(FsckArgs),
    /// Bring every upstream's `prefetch` list into the cache once, printing each image; exits 1
    /// when an image could not be fetched. Safe beside a running server on the same data.
    Prefetch(PrefetchArgs),
    /// Exit 0 when the Berth on this host answers `/livez` (for container health checks,
    /// where no curl is at hand).
    Healthcheck {
        /// Address Berth listens on; a wildcard address is probed on loopback.
        #[arg(long, env = "BERTH_LISTEN", default_value = "127.0.0.1:5000")]
        listen: SocketAddr,
    },
    /// Print an htpasswd line (bcrypt) for a user; the password is read from standard input.
    Passwd {
        /// The user name.
        user: String,
        /// bcrypt cost (work factor).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(4..=16))]
        cost: u32,
    },
    /// Copy a single-node install's metadata (SQLite) into an empty PostgreSQL database, for
    /// replicas; checks the copy by counts and digests. Blobs stay where they are: replicas
    /// need them on an object store (copy `<data>/blobs/` to the bucket under the same keys).
    MigrateMetadata(MigrateArgs),
    /// Check a configuration file as `serve` would (values, and the files it names: TLS,
    /// htpasswd, keys, secrets, directories) and exit: 0 when `serve` can start with it, else
    /// every problem at once.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
        /// Check the values only, not the files they name (a configuration checked away from
        /// the machine that will run it, as in CI).
        #[arg(long)]
        no_files: bool,
    },
}

/// `berth serve` options; each overrides the configuration file.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on [default: 0.0.0.0:5000].
    #[arg(long, env = "BERTH_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Data directory [default: ./berth-data].
    #[arg(long, env = "BERTH_DATA")]
    pub data: Option<PathBuf>,
    /// Configuration file (TOML).
    #[arg(long, env = "BERTH_CONFIG")]
    pub config: Option<PathBuf>,
    /// How other replicas reach this one (`peer_url`), e.g. `http://$(POD_IP):5000`.
    #[arg(long, env = "BERTH_PEER_URL")]
    pub peer_url: Option<String>,
}

/// `berth migrate-metadata` options.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// The SQLite file (the server's is `<data>/berth.db`). Stop pushes while it is copied:
    /// what is written after the copy's snapshot stays behind.
    #[arg(long)]
    pub from: PathBuf,
    /// The PostgreSQL URL of an empty database.
    #[arg(long, env = "BERTH_MIGRATE_TO", conflicts_with = "to_file")]
    pub to: Option<String>,
    /// A file holding the PostgreSQL URL (when it carries a password).
    #[arg(long)]
    pub to_file: Option<PathBuf>,
    /// Count what would move and check the target is reachable and empty; write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `berth gc` options.
#[derive(Debug, clap::Args)]
pub struct GcArgs {
    /// Data directory [default: ./berth-data].
    #[arg(long, env = "BERTH_DATA")]
    pub data: Option<PathBuf>,
    /// Configuration file (TOML); its `[gc]` section is the policy.
    #[arg(long, env = "BERTH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Report what would be removed without removing anything.
    #[arg(long)]
    pub dry_run: bool,
}

/// `berth fsck` options.
#[derive(Debug, clap::Args)]
pub struct FsckArgs {
    /// Data directory [default: ./berth-data].
    #[arg(long, env = "BERTH_DATA")]
    pub data: Option<PathBuf>,
    /// Configuration file (TOML).
    #[arg(long, env = "BERTH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Read every blob and check its digest (streamed; progress on standard error).
    #[arg(long)]
    pub verify_digests: bool,
    /// Drop rows of missing or corrupt blobs (clients upload them again), record orphan
    /// objects for garbage collection, end upload sessions whose chunks are gone.
    #[arg(long)]
    pub repair: bool,
    /// Objects younger than this are not called orphans (a commit in progress writes its
    /// object first) [default: gc.grace]. With every server stopped, "0s" checks everything.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub grace: Option<std::time::Duration>,
}

/// `berth prefetch` options.
#[derive(Debug, clap::Args)]
pub struct PrefetchArgs {
    /// Data directory [default: ./berth-data].
    #[arg(long, env = "BERTH_DATA")]
    pub data: Option<PathBuf>,
    /// Configuration file (TOML); its `[proxy]` section lists what to prefetch.
    #[arg(long, env = "BERTH_CONFIG")]
    pub config: Option<PathBuf>,
}
