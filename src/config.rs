//! The configuration file (TOML) and its defaults. Only this module knows the file format.
//!
//! Precedence, lowest first: built-in defaults, the file, `BERTH_*` environment variables,
//! command-line flags. Every key is optional; unknown keys are an error.
//!
//! ```toml
//! listen = "0.0.0.0:5000"      # address to serve on
//! data = "./berth-data"         # metadata database and (by default) blobs live here
//! fsync = true                  # a push is on the disk before it is acknowledged (blob files
//!                               # on local disk, SQLite commits); false: a power loss may lose
//!                               # the last seconds of pushes (a crashed process loses nothing)
//!
//! [storage]
//! backend = "filesystem"        # "filesystem" (under `data`, or `root`), "memory",
//!                               # "s3", "azure" or "gcs"; each takes only its own keys
//! # root = "/srv/berth/blobs"
//! # For s3, azure and gcs:
//! # bucket = "registry"         # bucket, or Azure container
//! # prefix = "berth"            # keys go under this prefix
//! # endpoint = "http://127.0.0.1:9000"   # S3-compatible server, Azurite, private cloud
//! # region = "us-east-1"        # s3
//! # access_key_id = "..."       # s3 key id, or Azure account name
//! # secret_access_key_file = "/run/secrets/s3"   # or secret_access_key = "..."
//! # service_account_key = "/run/secrets/gcs.json"  # gcs
//! # allow_http = false          # plain HTTP to the endpoint (loopback test servers)
//! # redirect = true             # blob GETs answer 307 to a presigned URL
//! # Credentials absent here come from each cloud's usual environment variables or metadata.
//!
//! [metadata]
//! backend = "sqlite"            # "sqlite" (one process) or "postgres" (replicas)
//! # path = "<data>/berth.db"    # sqlite
//! # url = "postgres://berth@db:5432/berth"   # postgres; or url_file = "/run/secrets/db-url"
//! # pool_size = 16              # postgres connections per process
//!
//! [registry]
//! delete_enabled = true         # allow DELETE of manifests, tags and blobs
//! anonymous_mount = true        # cross-repository mount without `from`
//! upload_expiry = "24h"         # drop upload sessions untouched this long (at least 1m)
//!
//! [gc]
//! interval = "1h"               # how often the server collects garbage; "0s" turns it off
//! grace = "1h"                  # unreferenced blobs uploaded, mounted or read within this are
//!                               # kept (at least 1m: the longest a push may take)
//! # untagged_after = "7d"       # also delete manifests untagged and unread this long (>= grace)
//! orphan_referrers = false      # also delete referrers whose subject is gone
//!
//! [log]
//! format = "text"               # "text" or "json"
//! level = "info"                # a tracing filter, e.g. "info,berth=debug"
//!
//! # public_url = "https://registry.example.com"  # how clients reach Berth (behind a proxy)
//! # peer_url = "http://10.0.3.7:5000"  # how other replicas reach this one (BERTH_PEER_URL):
//!                               # a cache miss then streams from the replica fetching it
//!
//! [tls]                         # serve HTTPS; files are re-read when they change
//! # cert = "/etc/berth/tls/tls.crt"     # certificate chain, PEM
//! # key = "/etc/berth/tls/tls.key"      # private key, PEM
//! # client_ca = "/etc/berth/tls/clients.crt"  # require client certificates from this CA
//! # client_auth = "required"    # or "optional": verify a certificate when one is sent
//!
//! [auth]
//! mode = "none"                 # "none", "basic" (htpasswd, every request) or "token"
//! # htpasswd = "/etc/berth/htpasswd"    # bcrypt users (`berth passwd NAME` makes a line)
//! # admins = ["alice"]          # may do anything, see the whole catalog
//! max_failures = 10             # failed logins per client address ...
//! failure_window = "5m"         # ... within this window, then refused until it passes
//! # trusted_proxies = ["10.0.0.0/8"]  # ingress/load balancers: take the client address
//!                               # from X-Forwarded-For when the peer is one of these
//!
//! [auth.token]                  # the built-in token service at /auth/token
//! service = "berth"             # audience of tokens (`service=` in challenges)
//! issuer = "berth"
//! # key = "<data>/auth/token.key"      # PKCS#8 PEM, generated (EC P-256) when absent
//! ttl = "5m"
//! # realm = "https://auth.example.com/token"  # default: <public_url or request>/auth/token
//! # [[auth.token.trusted]]      # accept tokens of another issuer too
//! # issuer = "gitlab-issuer"
//! # key = "/etc/berth/gitlab.crt"       # public key or certificate, PEM
//! # jwks = "/etc/berth/jwks.json"       # or a JWKS file
//!
//! # [proxy]
//! # max_size = "200 GiB"        # cap on cached images: least recently pulled go first
//! # max_age = "30d"             # and those not pulled for this long (space returns at GC)
//! # prefetch_interval = "1h"    # how often upstreams' prefetch lists are refreshed
//! # [[proxy.upstream]]          # pull-through cache of another registry (read-only here)
//! # name = "docker.io"          # how clients name it: `?ns=docker.io`, `/v2/docker.io/...`
//! # url = "https://registry-1.docker.io"   # default: https://<name> (Docker Hub built in)
//! # urls = ["https://mirror.corp", "https://registry-1.docker.io"]  # or several, in order
//! # prefetch = ["library/alpine:3.20", "org/app:1.*"]   # kept warm on a schedule
//! # aliases = []                # more path prefixes (names with a port need one)
//! # default = true              # plain names not pushed here come from it (registry-mirrors)
//! # username = "..."            # credentials for the upstream (password or password_file)
//! # tag_ttl = "5m"              # how long a tag is trusted before a HEAD revalidates it
//! # max_stale = "7d"            # serve cached tags this long past the TTL when upstream fails
//! # read_ahead = true           # a manifest fetched on a GET starts fetching its layers too
//!
//! # [auth.groups]
//! # dev = ["alice", "bob"]
//! # [[auth.rule]]               # none: signed-in users may do everything
//! # repositories = ["team/**"]  # globs; `*` one component, `**` any, `${user}` the user
//! # users = ["@dev"]            # names, @group, "*" (signed in) or "anonymous"
//! # actions = ["pull", "push"]  # pull, push, delete
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_storage::StorageConfig;
use berth_storage::backend::{BlobBackend, CloudConfig, MetadataBackend};
use berth_storage::meta::postgres::PgConfig;
use serde::Deserialize;

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid configuration.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line and column.
        message: String,
    },
    /// Values that parse but cannot work together.
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Directory for the metadata database and, by default, blob storage.
    pub data: PathBuf,
    /// Local writes reach the disk before they are acknowledged (see
    /// [`StorageConfig::fsync`]).
    pub fsync: bool,
    /// Blob storage.
    pub storage: StorageSection,
    /// Metadata.
    pub metadata: MetadataSection,
    /// Registry behaviour.
    pub registry: RegistrySection,
    /// Garbage collection.
    pub gc: GcSection,
    /// Logging.
    pub log: LogSection,
    /// The URL clients use to reach Berth, when a proxy or ingress sits in front of it.
    pub public_url: Option<String>,
    /// How other replicas reach this process directly (not through the balancer): a replica
    /// that misses a blob another is fetching streams it from there instead of waiting.
    pub peer_url: Option<String>,
    /// HTTPS.
    pub tls: TlsSection,
    /// Authentication and access control.
    pub auth: AuthSection,
    /// Pull-through cache.
    pub proxy: ProxySection,
    /// What one client may hold: connections, uploads, time to send a request.
    pub limits: LimitsSection,
    /// The web UI.
    pub ui: UiSection,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 5000)),
            data: PathBuf::from("./berth-data"),
            fsync: true,
            storage: StorageSection::default(),
            metadata: MetadataSection::default(),
            registry: RegistrySection::default(),
            gc: GcSection::default(),
            log: LogSection::default(),
            public_url: None,
            peer_url: None,
            tls: TlsSection::default(),
            auth: AuthSection::default(),
            proxy: ProxySection::default(),
            limits: LimitsSection::default(),
            ui: UiSection::default(),
        }
    }
}

/// `[storage]`: where blob bytes live. `backend` (default `filesystem`) decides which keys
/// apply: a key of another backend is refused by name, as any unknown key is.
#[derive(Debug, Clone, PartialEq)]
pub enum StorageSection {
    /// Local disk.
    Filesystem(FilesystemSection),
    /// Process memory: everything is lost on exit (tests, experiments).
    Memory,
    /// Amazon S3 or an S3-compatible server.
    S3(S3Section),
    /// Azure Blob Storage (or Azurite).
    Azure(AzureSection),
    /// Google Cloud Storage.
    Gcs(GcsSection),
}

impl Default for StorageSection {
    fn default() -> Self {
        Self::Filesystem(FilesystemSection::default())
    }
}

/// The keys of `[storage]` per backend, as the file spells them.
#[derive(Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
enum TaggedStorage {
    Filesystem(FilesystemSection),
    Memory {},
    S3(S3Section),
    Azure(AzureSection),
    Gcs(GcsSection),
}

impl<'de> Deserialize<'de> for StorageSection {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let mut v = toml::Value::deserialize(d)?;
        if let Some(t) = v.as_table_mut() {
            t.entry("backend")
                .or_insert_with(|| toml::Value::String("filesystem".into()));
        }
        let tagged = TaggedStorage::deserialize(v)
            .map_err(|e| D::Error::custom(format!("storage: {}", e.message())))?;
        Ok(match tagged {
            TaggedStorage::Filesystem(f) => Self::Filesystem(f),
            TaggedStorage::Memory {} => Self::Memory,
            TaggedStorage::S3(c) => Self::S3(c),
            TaggedStorage::Azure(c) => Self::Azure(c),
            TaggedStorage::Gcs(c) => Self::Gcs(c),
        })
    }
}

/// `[metadata]`: where repositories, tags, manifests and upload sessions are recorded.
/// `backend` (default `sqlite`) decides which keys apply.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataSection {
    /// A SQLite file: one Berth process.
    Sqlite(SqliteSection),
    /// A PostgreSQL database: any number of Berth replicas.
    Postgres(PostgresSection),
}

impl Default for MetadataSection {
    fn default() -> Self {
        Self::Sqlite(SqliteSection::default())
    }
}

impl MetadataSection {
    /// Whether several processes may share this metadata (and so must share everything else
    /// that decides correctness).
    pub fn replicated(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }
}

#[derive(Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
enum TaggedMetadata {
    Sqlite(SqliteSection),
    Postgres(PostgresSection),
}

impl<'de> Deserialize<'de> for MetadataSection {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let mut v = toml::Value::deserialize(d)?;
        if let Some(t) = v.as_table_mut() {
            t.entry("backend")
                .or_insert_with(|| toml::Value::String("sqlite".into()));
        }
        let tagged = TaggedMetadata::deserialize(v)
            .map_err(|e| D::Error::custom(format!("metadata: {}", e.message())))?;
        Ok(match tagged {
            TaggedMetadata::Sqlite(s) => Self::Sqlite(s),
            TaggedMetadata::Postgres(p) => Self::Postgres(p),
        })
    }
}

/// `[metadata]` with `backend = "sqlite"`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SqliteSection {
    /// The database file (default `<data>/berth.db`).
    pub path: Option<PathBuf>,
}

/// `[metadata]` with `backend = "postgres"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresSection {
    /// `postgres://user:password@host:port/database` (or libpq's key=value form).
    pub url: Option<String>,
    /// A file holding `url` (a mounted Secret), so the password stays out of the config.
    pub url_file: Option<PathBuf>,
    /// Connections per process.
    pub pool_size: usize,
}

impl Default for PostgresSection {
    fn default() -> Self {
        Self {
            url: None,
            url_file: None,
            pool_size: 16,
        }
    }
}

/// `[storage]` with `backend = "filesystem"`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilesystemSection {
    /// Where blobs go (default `<data>/objects`).
    pub root: Option<PathBuf>,
}

/// `[storage]` with `backend = "s3"`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Section {
    /// The bucket.
    pub bucket: String,
    /// Key prefix inside the bucket.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Endpoint URL of an S3-compatible server (MinIO, Ceph RGW, R2) or a private cloud.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The region.
    #[serde(default)]
    pub region: Option<String>,
    /// Access key id.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// Secret access key.
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// A file holding `secret_access_key`.
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
    /// Allow plain HTTP to `endpoint`.
    #[serde(default)]
    pub allow_http: bool,
    /// Virtual-hosted-style bucket addressing (`bucket.host`).
    #[serde(default)]
    pub virtual_hosted_style: bool,
    /// Objects larger than this are copied in parts (UploadPartCopy) rather than with one
    /// CopyObject: AWS copies at most 5 GiB in one request (the default); some S3-compatible
    /// servers allow less.
    #[serde(default)]
    pub max_copy_size: Option<bytesize::ByteSize>,
    /// Redirect blob downloads to presigned URLs (default on).
    #[serde(default)]
    pub redirect: Option<bool>,
    /// How long presigned URLs stay valid (default 20m; at most 7d on S3).
    #[serde(default, with = "humantime_serde")]
    pub redirect_expiry: Option<Duration>,
}

/// `[storage]` with `backend = "azure"`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureSection {
    /// The container.
    pub bucket: String,
    /// Key prefix inside the container.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Endpoint URL, including the account path (Azurite:
    /// `http://127.0.0.1:10000/devstoreaccount1`).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The storage account name.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// The storage account key.
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// A file holding `secret_access_key`.
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
    /// Allow plain HTTP to `endpoint`.
    #[serde(default)]
    pub allow_http: bool,
    /// Redirect blob downloads to presigned (SAS) URLs (default on).
    #[serde(default)]
    pub redirect: Option<bool>,
    /// How long presigned URLs stay valid (default 20m).
    #[serde(default, with = "humantime_serde")]
    pub redirect_expiry: Option<Duration>,
}

/// `[storage]` with `backend = "gcs"`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcsSection {
    /// The bucket.
    pub bucket: String,
    /// Key prefix inside the bucket.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Endpoint URL (an emulator or a private endpoint).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Service account key file.
    #[serde(default)]
    pub service_account_key: Option<PathBuf>,
    /// Allow plain HTTP to `endpoint`.
    #[serde(default)]
    pub allow_http: bool,
    /// Redirect blob downloads to presigned URLs (default on).
    #[serde(default)]
    pub redirect: Option<bool>,
    /// How long presigned URLs stay valid (default 20m; at most 7d).
    #[serde(default, with = "humantime_serde")]
    pub redirect_expiry: Option<Duration>,
}

/// Longest validity of a presigned URL that S3 and GCS accept.
pub const MAX_REDIRECT_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);

impl StorageSection {
    /// The backend's name as the file spells it.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Filesystem(_) => "filesystem",
            Self::Memory => "memory",
            Self::S3(_) => "s3",
            Self::Azure(_) => "azure",
            Self::Gcs(_) => "gcs",
        }
    }

    /// Whether this is an object store reached over the network.
    pub fn is_cloud(&self) -> bool {
        matches!(self, Self::S3(_) | Self::Azure(_) | Self::Gcs(_))
    }

    fn redirect_settings(&self) -> (Option<bool>, Option<Duration>) {
        match self {
            Self::S3(c) => (c.redirect, c.redirect_expiry),
            Self::Azure(c) => (c.redirect, c.redirect_expiry),
            Self::Gcs(c) => (c.redirect, c.redirect_expiry),
            Self::Filesystem(_) | Self::Memory => (Some(false), None),
        }
    }

    /// Whether blob GETs are redirected to the object store.
    pub fn redirects(&self) -> bool {
        self.is_cloud() && self.redirect_settings().0.unwrap_or(true)
    }

    /// Validity of presigned URLs.
    pub fn redirect_ttl(&self) -> Duration {
        self.redirect_settings()
            .1
            .unwrap_or(Duration::from_secs(20 * 60))
    }
}

/// `[registry]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrySection {
    /// Allow deleting manifests, tags and blobs.
    pub delete_enabled: bool,
    /// Mount a blob from any repository when a client asks for a mount without `from`.
    pub anonymous_mount: bool,
    /// Upload sessions untouched for this long are dropped with their data.
    #[serde(with = "humantime_serde")]
    pub upload_expiry: Duration,
}

impl Default for RegistrySection {
    fn default() -> Self {
        Self {
            delete_enabled: true,
            anonymous_mount: true,
            upload_expiry: Duration::from_secs(24 * 3600),
        }
    }
}

/// `[gc]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GcSection {
    /// How often the server runs a collection; zero turns scheduled runs off.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Unreferenced blobs uploaded, mounted, unlinked or read within this are kept: the longest
    /// a push may take between checking its blobs and pushing its manifest.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// Delete manifests that nothing keeps once untagged (and not read by digest) this long;
    /// absent = keep them.
    #[serde(with = "humantime_serde")]
    pub untagged_after: Option<Duration>,
    /// Delete referrers whose subject was deleted.
    pub orphan_referrers: bool,
}

impl Default for GcSection {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(3600),
            grace: Duration::from_secs(3600),
            untagged_after: None,
            orphan_referrers: false,
        }
    }
}

/// `[limits]`: bounds that keep slow or hostile clients from exhausting the process.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Time a client has to send a request's headers, counted from when the server starts
    /// waiting for them; on a kept-alive connection that is the end of the previous answer, so
    /// this is also how long an idle connection stays open.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Longest wait for the next piece of a request body: a client that stops sending in the
    /// middle of an upload gets an error and its connection and upload file are released (the
    /// session stays, and can be resumed).
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Connections served at once; more are answered 503 and closed at once. Lowered at start-up
    /// to what the open-file limit allows (a descriptor per connection, one more per upload).
    pub max_connections: usize,
    /// Request bodies written to storage at once (blob uploads and manifest pushes); more are
    /// answered 429 TOOMANYREQUESTS with `Retry-After`.
    pub max_uploads: usize,
    /// Space kept free in the data directory (a file released when the disk fills, so deletes
    /// and garbage collection can still write their metadata); 0 turns it off.
    pub disk_reserve: bytesize::ByteSize,
    /// The most a request's line and headers may take; more is answered `431`. It is hyper's
    /// read buffer, so it is also the largest piece of a body read at once (at least 8 KiB).
    pub max_header_size: bytesize::ByteSize,
}

/// hyper's own default read buffer: 8 KiB plus 100 pages.
pub const DEFAULT_MAX_HEADER_SIZE: u64 = 8192 + 4096 * 100;

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_uploads: 512,
            disk_reserve: bytesize::ByteSize::mib(64),
            max_header_size: bytesize::ByteSize::b(DEFAULT_MAX_HEADER_SIZE),
        }
    }
}

/// `[ui]`: the pages at `/ui/`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UiSection {
    /// Serve the web UI (on the API's port, with the API's users and rights).
    pub enabled: bool,
    /// How long a sign-in lasts.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
}

impl Default for UiSection {
    fn default() -> Self {
        Self {
            enabled: true,
            session_ttl: Duration::from_secs(12 * 3600),
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    /// Output format.
    pub format: LogFormat,
    /// A `tracing` filter directive; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Log formats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[tls]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// Certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Private key (PEM).
    pub key: Option<PathBuf>,
    /// CA certificates that sign client certificates (PEM).
    pub client_ca: Option<PathBuf>,
    /// Whether client certificates are required or only checked when sent.
    pub client_auth: ClientAuth,
}

impl TlsSection {
    /// Whether HTTPS is on.
    pub fn enabled(&self) -> bool {
        self.cert.is_some()
    }
}

/// Client certificate requirement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Every client must present a certificate signed by `client_ca`.
    #[default]
    Required,
    /// A certificate is verified when sent; clients without one are let through.
    Optional,
}

/// `[auth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// How clients authenticate.
    pub mode: AuthMode,
    /// bcrypt users.
    pub htpasswd: Option<PathBuf>,
    /// Users who may do anything.
    pub admins: Vec<String>,
    /// Group name → members.
    pub groups: std::collections::HashMap<String, Vec<String>>,
    /// Access rules.
    pub rule: Vec<RuleSection>,
    /// Failed logins allowed per client address within `failure_window`.
    pub max_failures: u32,
    /// The failed-login window.
    #[serde(with = "humantime_serde")]
    pub failure_window: Duration,
    /// Networks of proxies whose `X-Forwarded-For` names the real client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The token service.
    pub token: TokenSection,
}

impl Default for AuthSection {
    fn default() -> Self {
        Self {
            mode: AuthMode::None,
            htpasswd: None,
            admins: Vec::new(),
            groups: Default::default(),
            rule: Vec::new(),
            max_failures: 10,
            failure_window: Duration::from_secs(300),
            trusted_proxies: Vec::new(),
            token: TokenSection::default(),
        }
    }
}

/// Authentication modes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Everyone may do everything.
    #[default]
    None,
    /// HTTP Basic with htpasswd users on every request.
    Basic,
    /// Docker token authentication (Bearer), with the built-in token service.
    Token,
}

/// `[[auth.rule]]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuleSection {
    /// Repository globs.
    pub repositories: Vec<String>,
    /// User names, `@group`, `*` or `anonymous`.
    pub users: Vec<String>,
    /// `pull`, `push`, `delete`.
    pub actions: Vec<String>,
}

/// `[auth.token]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenSection {
    /// The registry's service name: the tokens' audience.
    pub service: String,
    /// The `iss` of tokens we issue.
    pub issuer: String,
    /// Signing key (default `<data>/auth/token.key`).
    pub key: Option<PathBuf>,
    /// Access token lifetime.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Token endpoint URL announced in challenges.
    pub realm: Option<String>,
    /// Other issuers whose tokens are accepted.
    pub trusted: Vec<TrustedSection>,
}

impl Default for TokenSection {
    fn default() -> Self {
        Self {
            service: "berth".into(),
            issuer: "berth".into(),
            key: None,
            ttl: Duration::from_secs(300),
            realm: None,
            trusted: Vec::new(),
        }
    }
}

/// `[[auth.token.trusted]]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrustedSection {
    /// The issuer's `iss`.
    pub issuer: String,
    /// Its public key or certificate (PEM).
    pub key: Option<PathBuf>,
    /// Its keys as a JWKS file.
    pub jwks: Option<PathBuf>,
}

/// `[proxy]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxySection {
    /// Upstream registries.
    pub upstream: Vec<UpstreamSection>,
    /// Cap on cached content; least recently pulled images go first.
    pub max_size: Option<bytesize::ByteSize>,
    /// Cached images not pulled for this long go.
    #[serde(with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// How often the upstreams' `prefetch` lists are brought up to date.
    #[serde(with = "humantime_serde")]
    pub prefetch_interval: Duration,
}

impl Default for ProxySection {
    fn default() -> Self {
        Self {
            upstream: Vec::new(),
            max_size: None,
            max_age: None,
            prefetch_interval: Duration::from_secs(3600),
        }
    }
}

/// `[[proxy.upstream]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamSection {
    /// The registry host as clients name it (`docker.io`, `ghcr.io`, `host:5000`).
    pub name: String,
    /// Its API base URL.
    pub url: Option<String>,
    /// Several API base URLs for it (a mirror, then the registry itself), tried in order;
    /// one that fails is skipped until its backoff passes.
    pub urls: Vec<String>,
    /// Images kept warm: `repository:tag`, the tag may hold `*` and `?`.
    pub prefetch: Vec<String>,
    /// Further path prefixes selecting it.
    pub aliases: Vec<String>,
    /// Plain repository names (no `ns`, no host prefix) not pushed here come from it.
    pub default: bool,
    /// User name at the upstream.
    pub username: Option<String>,
    /// Password or token at the upstream.
    pub password: Option<String>,
    /// A file holding `password`.
    pub password_file: Option<PathBuf>,
    /// How long a cached tag is served before it is revalidated.
    #[serde(with = "humantime_serde")]
    pub tag_ttl: Duration,
    /// How long past its TTL a cached tag is still served while the upstream fails;
    /// absent: no limit.
    #[serde(with = "humantime_serde")]
    pub max_stale: Option<Duration>,
    /// Timeout to connect, to get response headers, for each read of a body, and for the whole
    /// of an answer read into memory (a manifest, a tag list, a token).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// A manifest GET the cache had to fetch starts fetching the image's config and layers
    /// it lacks, in the background, before the client asks for them.
    pub read_ahead: bool,
}

impl Default for UpstreamSection {
    fn default() -> Self {
        Self {
            name: String::new(),
            url: None,
            urls: Vec::new(),
            prefetch: Vec::new(),
            aliases: Vec::new(),
            default: false,
            username: None,
            password: None,
            password_file: None,
            tag_ttl: Duration::from_secs(300),
            max_stale: None,
            timeout: Duration::from_secs(30),
            read_ahead: true,
        }
    }
}

/// What a server runs with, for its start-up log line: names only, never a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The blob backend (`filesystem`, `memory`, `s3`, `azure`, `gcs`).
    pub storage: &'static str,
    /// The metadata backend (`sqlite` or `postgres`).
    pub metadata: &'static str,
    /// The auth mode (`none`, `basic`, `token`).
    pub auth: &'static str,
    /// The upstreams' names, comma-separated (empty: no cache).
    pub upstreams: String,
}

impl Config {
    /// Names of what this configuration runs with (see [`Summary`]).
    pub fn summary(&self) -> Summary {
        Summary {
            storage: match &self.storage {
                StorageSection::Filesystem(_) => "filesystem",
                StorageSection::Memory => "memory",
                StorageSection::S3(_) => "s3",
                StorageSection::Azure(_) => "azure",
                StorageSection::Gcs(_) => "gcs",
            },
            metadata: if self.metadata.replicated() {
                "postgres"
            } else {
                "sqlite"
            },
            auth: match self.auth.mode {
                AuthMode::None => "none",
                AuthMode::Basic => "basic",
                AuthMode::Token => "token",
            },
            upstreams: self
                .proxy
                .upstream
                .iter()
                .map(|u| u.name.as_str())
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg = Self::read(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and parses a configuration file without validating it (see
    /// [`crate::preflight`], which reports every problem at once).
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what the types cannot, reporting every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.data.as_os_str().is_empty() {
            problems.push("data: must not be empty".to_owned());
        }
        let st = &self.storage;
        let (key, key_file) = match st {
            StorageSection::S3(c) => (&c.secret_access_key, &c.secret_access_key_file),
            StorageSection::Azure(c) => (&c.secret_access_key, &c.secret_access_key_file),
            _ => (&None, &None),
        };
        if key.is_some() && key_file.is_some() {
            problems.push(
                "storage: give secret_access_key or secret_access_key_file, not both".to_owned(),
            );
        }
        match st {
            StorageSection::S3(S3Section { bucket, .. })
            | StorageSection::Azure(AzureSection { bucket, .. })
            | StorageSection::Gcs(GcsSection { bucket, .. })
                if bucket.is_empty() =>
            {
                problems.push(format!(
                    "storage.bucket: required for the {} backend",
                    st.backend()
                ));
            }
            _ => {}
        }
        if matches!(st, StorageSection::S3(_) | StorageSection::Gcs(_))
            && st.redirect_ttl() > MAX_REDIRECT_EXPIRY
        {
            problems.push(format!(
                "storage.redirect_expiry: {} presigns URLs for at most 7d; {} would fail every redirected download",
                st.backend(),
                humantime::format_duration(st.redirect_ttl())
            ));
        }
        if let StorageSection::S3(c) = st
            && let Some(m) = c.max_copy_size
            && !(5 * 1024 * 1024..=berth_storage::s3::MAX_COPY).contains(&m.as_u64())
        {
            problems.push(format!(
                "storage.max_copy_size: {m} is outside 5MiB..=5GiB (S3's smallest part and largest copy)"
            ));
        }
        let (endpoint, allow_http) = match st {
            StorageSection::S3(c) => (&c.endpoint, Some(c.allow_http)),
            StorageSection::Azure(c) => (&c.endpoint, Some(c.allow_http)),
            StorageSection::Gcs(c) => (&c.endpoint, Some(c.allow_http)),
            _ => (&None, None),
        };
        if let Some(e) = endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                problems.push(format!(
                    "storage.endpoint: {e:?} must start with https:// (or http:// with allow_http = true)"
                ));
            } else if e.starts_with("http://") && allow_http == Some(false) {
                problems.push(format!(
                    "storage.endpoint: {e:?} is plain HTTP; set allow_http = true to allow it (test servers), or use https://"
                ));
            }
        }
        self.validate_metadata(&mut problems);
        if self.registry.upload_expiry < Duration::from_secs(60) {
            problems.push("registry.upload_expiry: must be at least 1m".to_owned());
        }
        if self.gc.grace < Duration::from_secs(60) {
            problems.push("gc.grace: must be at least 1m (pushes in progress need it)".to_owned());
        }
        if let Some(u) = self.gc.untagged_after
            && u < self.gc.grace
        {
            problems.push(
                "gc.untagged_after: must not be shorter than gc.grace (a multi-arch push sends \
                 its platform manifests untagged before the index)"
                    .to_owned(),
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            problems.push(format!("log.level: {e}"));
        }
        for (key, url) in [
            ("public_url", &self.public_url),
            ("peer_url", &self.peer_url),
        ] {
            if let Some(u) = url
                && !(u.starts_with("http://") || u.starts_with("https://"))
            {
                problems.push(format!("{key}: {u:?} must start with http:// or https://"));
            }
        }
        let tls = &self.tls;
        if tls.cert.is_some() != tls.key.is_some() {
            problems.push("tls: cert and key go together".to_owned());
        }
        if tls.client_ca.is_some() && !tls.enabled() {
            problems.push("tls.client_ca: needs tls.cert and tls.key".to_owned());
        }
        let l = &self.limits;
        for (key, d) in [
            ("limits.header_timeout", l.header_timeout),
            ("limits.body_timeout", l.body_timeout),
        ] {
            if d < Duration::from_secs(1) {
                problems.push(format!("{key}: must be at least 1s"));
            }
        }
        for (key, n) in [
            ("limits.max_connections", l.max_connections),
            ("limits.max_uploads", l.max_uploads),
        ] {
            if n == 0 {
                problems.push(format!("{key}: must be at least 1"));
            }
        }
        if !(8 * 1024..=64 * 1024 * 1024).contains(&l.max_header_size.as_u64()) {
            problems.push(format!(
                "limits.max_header_size: {} is outside 8KiB..=64MiB",
                l.max_header_size
            ));
        }
        self.validate_auth(&mut problems);
        self.validate_proxy(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    fn validate_metadata(&self, problems: &mut Vec<String>) {
        let MetadataSection::Postgres(p) = &self.metadata else {
            return;
        };
        if p.url.is_some() == p.url_file.is_some() {
            problems.push("metadata: give url or url_file (one of them) for postgres".to_owned());
        }
        if p.pool_size == 0 {
            problems.push("metadata.pool_size: must be at least 1".to_owned());
        }
        // Replicas share the metadata; whatever else decides correctness must be shared too.
        if matches!(self.storage, StorageSection::Memory) {
            problems.push(
                "storage.backend: \"memory\" holds blobs in one process, which other replicas \
                 of a postgres registry cannot see; use an object store"
                    .to_owned(),
            );
        }
        if self.auth.mode == AuthMode::Token
            && self.auth.htpasswd.is_some()
            && self.auth.token.key.is_none()
        {
            problems.push(
                "auth.token.key: replicas must all sign tokens with one key; with postgres \
                 metadata give a key file (a mounted Secret) instead of a generated one"
                    .to_owned(),
            );
        }
    }

    fn validate_auth(&self, problems: &mut Vec<String>) {
        let a = &self.auth;
        if a.token.ttl < Duration::from_secs(1) {
            problems.push("auth.token.ttl: must be at least 1s".to_owned());
        }
        if a.mode != AuthMode::None && a.htpasswd.is_none() && a.token.trusted.is_empty() {
            problems.push(
                format!(
                    "auth.htpasswd: required for mode {:?} (or trust an external token issuer)",
                    a.mode
                )
                .to_lowercase(),
            );
        }
        if a.mode == AuthMode::Basic && !a.token.trusted.is_empty() {
            problems.push("auth.token.trusted: only applies to mode \"token\"".to_owned());
        }
        if a.max_failures == 0 {
            problems.push("auth.max_failures: must be at least 1".to_owned());
        }
        for (i, t) in a.token.trusted.iter().enumerate() {
            if t.issuer.is_empty() {
                problems.push(format!("auth.token.trusted[{i}].issuer: required"));
            }
            if t.key.is_some() == t.jwks.is_some() {
                problems.push(format!(
                    "auth.token.trusted[{i}]: give key or jwks (one of them)"
                ));
            }
        }
        if let Err(e) = self
            .policy_config()
            .and_then(|p| berth_auth::Policy::new(&p).map_err(|e| e.to_string()))
        {
            problems.push(format!("auth.rule: {e}"));
        }
    }

    fn validate_proxy(&self, problems: &mut Vec<String>) {
        let ups = &self.proxy.upstream;
        let mut seen = std::collections::HashSet::new();
        for (i, u) in ups.iter().enumerate() {
            let at = format!("proxy.upstream[{i}]");
            if u.name.is_empty()
                || u.name.contains('/')
                || u.name
                    .chars()
                    .any(|c| c.is_ascii_uppercase() || c.is_whitespace())
            {
                problems.push(format!(
                    "{at}.name: a lower-case registry host like \"docker.io\""
                ));
            }
            if u.url.is_some() && !u.urls.is_empty() {
                problems.push(format!("{at}: give url or urls, not both"));
            }
            for url in u.url.iter().chain(&u.urls) {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    problems.push(format!(
                        "{at}.url: {url:?} must start with http:// or https://"
                    ));
                }
            }
            for p in &u.prefetch {
                let (repo, tag) = p.rsplit_once(':').unwrap_or((p, "latest"));
                if repo.parse::<berth_storage::RepoName>().is_err() {
                    problems.push(format!(
                        "{at}.prefetch: {p:?} is not repository:tag (a tag may hold * and ?)"
                    ));
                } else if let Err(e) = glob::Pattern::new(tag) {
                    problems.push(format!("{at}.prefetch: {p:?}: {e}"));
                }
            }
            if u.password.is_some() && u.password_file.is_some() {
                problems.push(format!("{at}: give password or password_file, not both"));
            }
            if (u.password.is_some() || u.password_file.is_some()) && u.username.is_none() {
                problems.push(format!("{at}.username: required with a password"));
            }
            for p in std::iter::once(&u.name).chain(&u.aliases) {
                if !seen.insert(p.clone()) {
                    problems.push(format!("{at}: {p:?} names two upstreams"));
                }
            }
            for a in &u.aliases {
                if a.parse::<berth_storage::RepoName>().is_err() || a.contains('/') {
                    problems.push(format!(
                        "{at}.aliases: {a:?} is not one repository name component"
                    ));
                }
            }
        }
        if self.proxy.prefetch_interval < Duration::from_secs(60) {
            problems.push("proxy.prefetch_interval: must be at least 1m".to_owned());
        }
        if ups.iter().filter(|u| u.default).count() > 1 {
            problems.push("proxy.upstream: only one upstream can be the default".to_owned());
        }
    }

    /// The access policy as the auth crate takes it.
    pub fn policy_config(&self) -> Result<berth_auth::PolicyConfig, String> {
        let mut rules = Vec::new();
        for r in &self.auth.rule {
            let mut actions = berth_auth::Actions::NONE;
            for w in &r.actions {
                match berth_auth::Actions::parse_one(w) {
                    Some(a) if a != berth_auth::Actions::ALL => actions = actions | a,
                    _ => return Err(format!("unknown action {w:?} (pull, push, delete)")),
                }
            }
            rules.push(berth_auth::Rule {
                repositories: r.repositories.clone(),
                users: r.users.clone(),
                actions,
            });
        }
        Ok(berth_auth::PolicyConfig {
            admins: self.auth.admins.clone(),
            groups: self.auth.groups.clone(),
            rules,
        })
    }

    /// The garbage collection policy.
    pub fn gc_policy(&self) -> berth_storage::GcPolicy {
        berth_storage::GcPolicy {
            grace: self.gc.grace,
            untagged_after: self.gc.untagged_after,
            orphan_referrers: self.gc.orphan_referrers,
            upload_expiry: self.registry.upload_expiry,
        }
    }

    /// What the storage layer needs (reads `secret_access_key_file`).
    pub fn storage_config(&self) -> Result<StorageConfig, ConfigError> {
        let mut s = StorageConfig::local(&self.data);
        s.fsync = self.fsync;
        s.metadata = match &self.metadata {
            MetadataSection::Sqlite(SqliteSection { path: Some(p) }) => {
                MetadataBackend::Sqlite(p.clone())
            }
            MetadataSection::Sqlite(_) => s.metadata,
            MetadataSection::Postgres(p) => MetadataBackend::Postgres(PgConfig {
                url: match (&p.url, &p.url_file) {
                    (_, Some(f)) => std::fs::read_to_string(f)
                        .map(|t| t.trim().to_owned())
                        .map_err(|source| ConfigError::Read {
                            path: f.clone(),
                            source,
                        })?,
                    (Some(u), None) => u.clone(),
                    (None, None) => String::new(),
                },
                pool_size: p.pool_size,
            }),
        };
        let secret = |inline: &Option<String>, file: &Option<PathBuf>| match file {
            Some(f) => std::fs::read_to_string(f)
                .map(|t| Some(t.trim().to_owned()))
                .map_err(|source| ConfigError::Read {
                    path: f.clone(),
                    source,
                }),
            None => Ok(inline.clone()),
        };
        s.blobs = match &self.storage {
            StorageSection::Memory => BlobBackend::Memory,
            StorageSection::Filesystem(f) => match &f.root {
                Some(root) => BlobBackend::Filesystem(root.clone()),
                None => s.blobs,
            },
            StorageSection::S3(c) => BlobBackend::S3(CloudConfig {
                bucket: c.bucket.clone(),
                prefix: c.prefix.clone(),
                endpoint: c.endpoint.clone(),
                region: c.region.clone(),
                access_key_id: c.access_key_id.clone(),
                secret_access_key: secret(&c.secret_access_key, &c.secret_access_key_file)?,
                service_account_key: None,
                allow_http: c.allow_http,
                virtual_hosted_style: c.virtual_hosted_style,
                max_copy_size: c.max_copy_size.map(|b| b.as_u64()),
            }),
            StorageSection::Azure(c) => BlobBackend::Azure(CloudConfig {
                bucket: c.bucket.clone(),
                prefix: c.prefix.clone(),
                endpoint: c.endpoint.clone(),
                access_key_id: c.access_key_id.clone(),
                secret_access_key: secret(&c.secret_access_key, &c.secret_access_key_file)?,
                allow_http: c.allow_http,
                ..CloudConfig::default()
            }),
            StorageSection::Gcs(c) => BlobBackend::Gcs(CloudConfig {
                bucket: c.bucket.clone(),
                prefix: c.prefix.clone(),
                endpoint: c.endpoint.clone(),
                service_account_key: c.service_account_key.clone(),
                allow_http: c.allow_http,
                ..CloudConfig::default()
            }),
        };
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.listen.port(), 5000);
        assert!(c.registry.delete_enabled);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let e = Config::parse("listen = \"127.0.0.1:1\"\nlistne = 3\n").unwrap_err();
        assert!(e.to_string().contains("listne"), "{e}");
        let e = Config::parse("[registry]\ndelete = true\n").unwrap_err();
        assert!(e.to_string().contains("delete"), "{e}");
    }

    #[test]
    fn durations_are_human() {
        let c = Config::parse("[registry]\nupload_expiry = \"12h\"\n").unwrap();
        assert_eq!(c.registry.upload_expiry, Duration::from_secs(12 * 3600));
        assert!(Config::parse("[registry]\nupload_expiry = \"5s\"\n").is_err());
    }

    #[test]
    fn gc_section() {
        let c = Config::parse("[gc]\ninterval = \"0s\"\nuntagged_after = \"7d\"\n").unwrap();
        assert_eq!(c.gc.interval, Duration::ZERO);
        assert_eq!(
            c.gc_policy().untagged_after,
            Some(Duration::from_secs(7 * 86400))
        );
        assert_eq!(Config::default().gc_policy().untagged_after, None);
        assert!(Config::parse("[gc]\ngrace = \"1s\"\n").is_err());
        let e = Config::parse("[gc]\ngrace = \"2h\"\nuntagged_after = \"1h\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("gc.untagged_after"), "{e}");
    }

    #[test]
    fn storage_keys_are_checked_against_the_backend() {
        let c = Config::parse(
            "[storage]\nbackend = \"s3\"\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:9\"\nallow_http = true\n",
        )
        .unwrap();
        assert!(c.storage.redirects());
        // An endpoint without a scheme, or plain HTTP without allow_http, is named.
        for (endpoint, says) in [
            ("minio.local:9000", "must start with https://"),
            ("http://minio.local:9000", "set allow_http = true"),
        ] {
            let e = Config::parse(&format!(
                "[storage]\nbackend = \"s3\"\nbucket = \"b\"\nendpoint = \"{endpoint}\"\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("storage.endpoint") && e.contains(says), "{e}");
        }
        let e = Config::parse("[storage]\nbackend = \"s3\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bucket"), "{e}");
        // A key of another backend is refused by name.
        for (backend, key) in [
            ("filesystem", "bucket = \"b\""),
            ("memory", "root = \"/x\""),
            ("s3", "service_account_key = \"/k.json\""),
            ("azure", "region = \"eu\""),
            ("gcs", "region = \"eu\""),
            ("gcs", "access_key_id = \"x\""),
        ] {
            let name = key.split(' ').next().unwrap();
            let bucket = if matches!(backend, "filesystem" | "memory") {
                ""
            } else {
                "bucket = \"b\"\n"
            };
            let text = format!("[storage]\nbackend = \"{backend}\"\n{bucket}{key}\n");
            let e = Config::parse(&text).unwrap_err().to_string();
            assert!(e.contains(name), "{backend} took {name}: {e}");
        }
        // No backend: local disk, with its own keys only.
        assert!(Config::parse("[storage]\nroot = \"/srv\"\n").is_ok());
        let c = Config::parse("[storage]\nbackend = \"azure\"\nbucket = \"c\"\nredirect = false\n")
            .unwrap();
        assert!(!c.storage.redirects());
        // S3 refuses presigned URLs valid for more than 7 days.
        let e = Config::parse(
            "[storage]\nbackend = \"s3\"\nbucket = \"b\"\nredirect_expiry = \"30d\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("storage.redirect_expiry"), "{e}");
    }

    #[test]
    fn every_problem_is_reported() {
        let e = Config::parse("data = \"\"\n[gc]\ngrace = \"1s\"\n").unwrap_err();
        let s = e.to_string();
        assert!(s.contains("data:") && s.contains("gc.grace"), "{s}");
    }

    #[test]
    fn auth_and_tls_sections() {
        let c = Config::parse(
            "[auth]\nmode = \"token\"\nhtpasswd = \"/h\"\nadmins = [\"root\"]\n\
             [auth.groups]\ndev = [\"a\"]\n\
             [[auth.rule]]\nrepositories = [\"team/**\"]\nusers = [\"@dev\", \"anonymous\"]\nactions = [\"pull\"]\n",
        )
        .unwrap();
        assert_eq!(c.auth.mode, AuthMode::Token);
        assert_eq!(c.auth.token.service, "berth");
        let p = berth_auth::Policy::new(&c.policy_config().unwrap()).unwrap();
        assert!(p.anonymous_allowed());

        let e = Config::parse(
            "[auth]\nmode = \"basic\"\n[[auth.rule]]\nrepositories = [\"a\"]\nusers = [\"@nobody\"]\nactions = [\"fly\"]\n\
             [tls]\ncert = \"/c\"\n",
        )
        .unwrap_err()
        .to_string();
        for want in ["auth.htpasswd", "unknown action", "tls: cert and key"] {
            assert!(e.contains(want), "{want} missing from {e}");
        }
        let e = Config::parse("[auth]\nmode = \"token\"\n[[auth.token.trusted]]\nissuer = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("give key or jwks"), "{e}");
        assert!(Config::parse("public_url = \"registry.example\"\n").is_err());
        assert!(Config::parse("peer_url = \"10.0.0.1:5000\"\n").is_err());
        assert!(Config::parse("peer_url = \"http://10.0.0.1:5000\"\n").is_ok());
    }
}

/// Properties over generated input (`PROPTEST_CASES` sets how many).
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// A configuration that touches most sections.
    const SEED: &str = r#"listen = "127.0.0.1:5000"
[registry]
upload_expiry = "12h"
[storage]
backend = "s3"
bucket = "b"
endpoint = "http://127.0.0.1:9000"
allow_http = true
max_copy_size = "1GiB"
[auth]
mode = "token"
htpasswd = "/etc/berth/htpasswd"
[auth.groups]
team = ["carol"]
[[auth.rule]]
repositories = ["team/**"]
users = ["@team"]
actions = ["pull", "push"]
[gc]
interval = "1h"
[limits]
body_timeout = "60s"
[[proxy.upstream]]
name = "docker.io"
url = "http://127.0.0.1:1"
"#;

    #[test]
    fn the_seed_is_valid() {
        let c = Config::parse(SEED).unwrap();
        c.validate().unwrap();
    }

    proptest! {
        /// Any text: a configuration or an error naming what is wrong, never a panic.
        #[test]
        fn any_text_is_a_config_or_an_error(s in "\\PC{0,400}") {
            if let Err(e) = Config::parse(&s) {
                prop_assert!(!e.to_string().is_empty());
            }
        }

        /// The seed with a few characters changed: judged without panicking; validating what
        /// parses does not panic either.
        #[test]
        fn mutated_configs(edits in proptest::collection::vec((any::<usize>(), any::<char>()), 1..6)) {
            let mut chars: Vec<char> = SEED.chars().collect();
            for (at, c) in edits {
                let at = at % chars.len();
                chars[at] = c;
            }
            let text: String = chars.into_iter().collect();
            if let Ok(c) = Config::parse(&text) {
                let _ = c.validate();
            }
        }
    }
}
