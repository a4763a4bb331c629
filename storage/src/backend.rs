//! Storage configuration: which object store holds the blobs, where the metadata lives.
//!
//! Local disk and memory always; S3 (and S3-compatibles: MinIO, Ceph RGW, R2), Azure Blob and
//! Google Cloud Storage through `object_store`'s cloud clients. Credentials come from the
//! configuration or, when absent there, the usual environment variables and instance metadata
//! of each cloud (`object_store`'s `from_env` builders).

use std::path::PathBuf;
use std::sync::Arc;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::signer::Signer;
use object_store::{ClientConfigKey, ObjectStore};

use crate::error::{Error, Result};

/// Settings shared by the cloud backends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloudConfig {
    /// Bucket (S3, GCS) or container (Azure).
    pub bucket: String,
    /// Key prefix inside the bucket, so several registries can share one.
    pub prefix: Option<String>,
    /// Endpoint URL for S3-compatible servers, Azurite or a private cloud.
    pub endpoint: Option<String>,
    /// S3 region.
    pub region: Option<String>,
    /// S3 access key id, or Azure storage account name.
    pub access_key_id: Option<String>,
    /// S3 secret access key, or Azure storage account key.
    pub secret_access_key: Option<String>,
    /// GCS service account key file.
    pub service_account_key: Option<PathBuf>,
    /// Allow plain HTTP to the endpoint (test servers on loopback).
    pub allow_http: bool,
    /// S3: address buckets as `bucket.host` rather than `host/bucket`.
    pub virtual_hosted_style: bool,
    /// S3: objects larger than this are copied in parts (default: AWS's 5 GiB limit).
    pub max_copy_size: Option<u64>,
}

/// Where blob bytes are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobBackend {
    /// A directory on local disk.
    Filesystem(PathBuf),
    /// Process memory (tests).
    Memory,
    /// Amazon S3 or an S3-compatible server.
    S3(CloudConfig),
    /// Azure Blob Storage (or Azurite).
    Azure(CloudConfig),
    /// Google Cloud Storage.
    Gcs(CloudConfig),
}

impl BlobBackend {
    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Filesystem(_) => "filesystem",
            Self::Memory => "memory",
            Self::S3(_) => "s3",
            Self::Azure(_) => "azure",
            Self::Gcs(_) => "gcs",
        }
    }
}

/// Where the metadata lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataBackend {
    /// A SQLite file: one process (the server, or a command beside it on the same disk).
    Sqlite(PathBuf),
    /// A PostgreSQL database: any number of replicas.
    Postgres(crate::meta::postgres::PgConfig),
}

impl MetadataBackend {
    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    /// Opens the backend (connecting, migrating the schema), with SQLite's commits durable.
    pub async fn open(&self) -> Result<Arc<dyn crate::meta::Metadata>> {
        self.open_with(true).await
    }

    /// [`MetadataBackend::open`]; without `fsync`, SQLite's commits do not wait for the disk
    /// (see [`StorageConfig::fsync`]).
    pub async fn open_with(&self, fsync: bool) -> Result<Arc<dyn crate::meta::Metadata>> {
        Ok(match self {
            Self::Sqlite(path) => {
                Arc::new(crate::meta::sqlite::SqliteMeta::open_with(path, fsync).await?)
            }
            Self::Postgres(c) => Arc::new(crate::meta::postgres::PgMeta::connect(c).await?),
        })
    }
}

/// Everything [`crate::Store::open`] needs.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// Blob storage.
    pub blobs: BlobBackend,
    /// Metadata.
    pub metadata: MetadataBackend,
    /// Whether what this node writes to its own disk reaches the disk before the write is
    /// acknowledged: blob files (fsync of the file and its directories before the metadata
    /// row that makes the blob visible) and SQLite's commits (its log synced after each).
    /// Without it a process crash still loses nothing acknowledged, but a power loss or kernel
    /// crash may lose the last seconds of pushes. Object stores and PostgreSQL keep their own
    /// promises either way.
    pub fsync: bool,
}

/// An object store, and a URL signer when the backend can presign reads.
#[derive(Debug, Clone)]
pub struct Backend {
    /// The store, with any configured prefix applied.
    pub objects: Arc<dyn ObjectStore>,
    /// Presigns URLs for direct downloads; `None` for local disk and memory.
    pub signer: Option<Arc<dyn Signer>>,
    /// The prefix to put in front of keys handed to `signer`.
    pub signer_prefix: Option<Path>,
    /// For local disk: the directory keys live under, so uploads can be written to files
    /// directly, without the buffering object stores need.
    pub local_root: Option<PathBuf>,
    /// S3 requests object_store does not make (copies in parts, open multipart uploads).
    pub s3: Option<Arc<crate::s3::S3Native>>,
}

fn cloud_err(backend: &str, e: object_store::Error) -> Error {
    Error::Internal(format!("{backend} storage: {e}"))
}

impl StorageConfig {
    /// Blobs under `<data>/objects`, metadata in `<data>/berth.db`.
    pub fn local(data: impl Into<PathBuf>) -> Self {
        let data = data.into();
        Self {
            blobs: BlobBackend::Filesystem(data.join("objects")),
            metadata: MetadataBackend::Sqlite(data.join("berth.db")),
            fsync: true,
        }
    }

    /// Builds the object store (and signer).
    pub fn backend(&self) -> Result<Backend> {
        Ok(match &self.blobs {
            BlobBackend::Filesystem(root) => {
                std::fs::create_dir_all(root)?;
                let fs = LocalFileSystem::new_with_prefix(root).map_err(|e| {
                    Error::Internal(format!("storage root {}: {e}", root.display()))
                })?;
                let mut b = Backend::local(Arc::new(fs));
                b.local_root = Some(root.canonicalize()?);
                b
            }
            BlobBackend::Memory => Backend::local(Arc::new(InMemory::new())),
            BlobBackend::S3(c) => {
                install_crypto();
                let mut b = AmazonS3Builder::from_env()
                    .with_config(
                        AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                        REQUEST_TIMEOUT,
                    )
                    .with_config(
                        AmazonS3ConfigKey::Client(ClientConfigKey::ReadTimeout),
                        READ_TIMEOUT,
                    )
                    .with_retry(retry_config())
                    .with_bucket_name(&c.bucket)
                    .with_allow_http(c.allow_http)
                    .with_virtual_hosted_style_request(c.virtual_hosted_style);
                if let Some(v) = &c.region {
                    b = b.with_region(v);
                }
                if let Some(v) = &c.endpoint {
                    b = b.with_endpoint(v);
                }
                if let Some(v) = &c.access_key_id {
                    b = b.with_access_key_id(v);
                }
                if let Some(v) = &c.secret_access_key {
                    b = b.with_secret_access_key(v);
                }
                let store = Arc::new(b.clone().build().map_err(|e| cloud_err("s3", e))?);
                let native = crate::s3::S3Native::new(
                    &b,
                    store.clone(),
                    cloud_prefix(c),
                    c.max_copy_size.unwrap_or(crate::s3::MAX_COPY),
                )?;
                let mut backend = Backend::cloud(store, c);
                backend.s3 = Some(Arc::new(native));
                backend
            }
            BlobBackend::Azure(c) => {
                install_crypto();
                let mut b = MicrosoftAzureBuilder::from_env()
                    .with_config(
                        AzureConfigKey::Client(ClientConfigKey::Timeout),
                        REQUEST_TIMEOUT,
                    )
                    .with_config(
                        AzureConfigKey::Client(ClientConfigKey::ReadTimeout),
                        READ_TIMEOUT,
                    )
                    .with_retry(retry_config())
                    .with_container_name(&c.bucket)
                    .with_allow_http(c.allow_http);
                if let Some(v) = &c.access_key_id {
                    b = b.with_account(v);
                }
                if let Some(v) = &c.secret_access_key {
                    b = b.with_access_key(v);
                }
                if let Some(v) = &c.endpoint {
                    b = b.with_endpoint(v.clone());
                }
                Backend::cloud(Arc::new(b.build().map_err(|e| cloud_err("azure", e))?), c)
            }
            BlobBackend::Gcs(c) => {
                install_crypto();
                let mut b = GoogleCloudStorageBuilder::from_env()
                    .with_config(
                        GoogleConfigKey::Client(ClientConfigKey::Timeout),
                        REQUEST_TIMEOUT,
                    )
                    .with_config(
                        GoogleConfigKey::Client(ClientConfigKey::ReadTimeout),
                        READ_TIMEOUT,
                    )
                    .with_config(
                        GoogleConfigKey::Client(ClientConfigKey::AllowHttp),
                        if c.allow_http { "true" } else { "false" },
                    )
                    .with_retry(retry_config())
                    .with_bucket_name(&c.bucket);
                if let Some(v) = &c.service_account_key {
                    b = b.with_service_account_path(v.to_string_lossy());
                }
                if let Some(v) = &c.endpoint {
                    // The endpoint is the API's base URL (an emulator, a private endpoint);
                    // `with_url` would read it as a `gs://bucket` location.
                    b = b.with_base_url(v);
                }
                Backend::cloud(Arc::new(b.build().map_err(|e| cloud_err("gcs", e))?), c)
            }
        })
    }
}

impl Backend {
    fn local(objects: Arc<dyn ObjectStore>) -> Self {
        Self {
            objects,
            signer: None,
            signer_prefix: None,
            local_root: None,
            s3: None,
        }
    }

    /// A cloud store that can presign, under the configured prefix.
    fn cloud<S: ObjectStore + Signer>(store: Arc<S>, c: &CloudConfig) -> Self {
        let prefix = cloud_prefix(c);
        let objects: Arc<dyn ObjectStore> = match &prefix {
            Some(p) => Arc::new(PrefixStore::new(store.clone(), p.clone())),
            None => store.clone(),
        };
        Self {
            objects,
            signer: Some(store),
            signer_prefix: prefix,
            local_root: None,
            s3: None,
        }
    }
}

/// The configured key prefix, if any.
fn cloud_prefix(c: &CloudConfig) -> Option<Path> {
    c.prefix
        .as_deref()
        .filter(|p| !p.is_empty())
        .map(Path::from)
}

/// The longest an object-store request may take in all. object_store's default, 30 s, cuts
/// off a streamed download of a multi-GiB layer and a CompleteMultipartUpload of many parts
/// (which S3 answers slowly, sending blanks meanwhile); a store that hangs is caught by
/// [`READ_TIMEOUT`] instead.
const REQUEST_TIMEOUT: &str = "10m";
/// The longest silence within an object-store request: a hung store is given up on (and the
/// request retried) after this.
const READ_TIMEOUT: &str = "30s";

/// How object-store requests are retried: server errors (5xx, 429), timeouts and dropped
/// connections are retried with jittered exponential backoff from 100 ms up to 2 s between
/// tries, at most 6 retries and never past 15 s from the first try. A store that keeps failing
/// is reported to the client within about 15 s (`503 UNAVAILABLE`) instead of after
/// object_store's default of 3 minutes, and a client's own retry (docker retries a failed
/// layer) starts sooner.
pub fn retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: std::time::Duration::from_millis(100),
            max_backoff: std::time::Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 6,
        retry_timeout: std::time::Duration::from_secs(15),
    }
}

/// The cloud clients use rustls; pick its ring provider once per process.
fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
