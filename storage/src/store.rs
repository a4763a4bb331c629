//! [`Store`]: blob objects plus metadata, and what its operations share. The operations
//! themselves live by concern: [`crate::blobs`], [`crate::uploads`], [`crate::manifests`],
//! [`crate::gc`], [`crate::evict`], [`crate::pulls`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::area::UploadArea;
use crate::backend::{MetadataBackend, StorageConfig};
use crate::error::{Error, Result};
use crate::meta::Metadata;
use crate::names::Hasher;

/// The registry's storage: blob objects plus metadata.
pub struct Store {
    pub(crate) objects: Arc<dyn ObjectStore>,
    pub(crate) meta: Arc<dyn Metadata>,
    /// Where upload sessions keep their bytes.
    pub(crate) area: UploadArea,
    /// Running SHA-256 state of uploads whose chunks passed through this process, keyed by
    /// session id, with the offset it has hashed up to. Only an optimisation: without it the
    /// chunks are re-read when the upload finishes.
    pub(crate) hashers: Mutex<HashMap<String, (u64, Hasher)>>,
    /// In-place upload areas take one writer per session.
    pub(crate) writing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Pull times not yet written: reads never wait on a database write (see
    /// [`Store::flush_access`]).
    pub(crate) pulls: Mutex<PendingPulls>,
    /// Presigns direct download URLs on object stores that can.
    pub(crate) signer: Option<Arc<dyn object_store::signer::Signer>>,
    pub(crate) signer_prefix: Option<Path>,
    /// On S3: copies in parts and open multipart uploads.
    pub(crate) s3: Option<Arc<crate::s3::S3Native>>,
    /// On local disk with `fsync` on: the root under which placed blobs are synced to the disk
    /// before their rows make them visible.
    pub(crate) sync_root: Option<std::path::PathBuf>,
    /// This process as a lease holder (see `lease`).
    pub(crate) instance: String,
    /// Collections in this process run one at a time (the lease keeps other processes out).
    pub(crate) gc_turn: tokio::sync::Mutex<()>,
    /// The secret the processes sharing the metadata agree on, once read.
    pub(crate) secret: tokio::sync::OnceCell<Vec<u8>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("objects", &self.objects.to_string())
            .field("meta", &self.meta)
            .field("area", &self.area)
            .finish()
    }
}

/// Pulls recorded since the last flush: (repository, digest) → unix time of the latest.
#[derive(Debug, Default)]
pub struct PendingPulls {
    pub(crate) manifests: HashMap<(String, String), i64>,
}

/// Where the process holding a lease as `holder` can be reached, when it said
/// ([`Store::set_peer_url`]).
pub fn holder_peer(holder: &str) -> Option<&str> {
    holder.split(' ').nth(4)
}

pub(crate) fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl Store {
    /// Opens storage as configured, creating what is missing.
    pub async fn open(config: &StorageConfig) -> Result<Self> {
        let backend = config.backend()?;
        if !matches!(config.blobs, crate::backend::BlobBackend::Memory) {
            match check_writable(&backend.objects).await {
                Ok(()) => {}
                // A full store still serves reads, deletes and collection: they are what
                // frees space.
                Err(e) if e.is_storage_full() => tracing::error!(
                    error = %e,
                    "blob storage is full: reads, deletes and garbage collection work, writes \
                     fail until space is freed"
                ),
                Err(e) => {
                    return Err(Error::Internal(format!(
                        "{} storage is not usable: {e}",
                        config.blobs.name()
                    )));
                }
            }
        }
        let meta = config.metadata.open_with(config.fsync).await?;
        let mut store = Self::new(backend.objects, meta);
        store.signer = backend.signer;
        store.signer_prefix = backend.signer_prefix;
        store.s3 = backend.s3;
        store.sync_root = backend.local_root.clone().filter(|_| config.fsync);
        // Appending to a file in place needs every chunk of a session on this machine: only
        // with SQLite, which is single-node. With PostgreSQL a session's chunks may reach any
        // replica, so they are kept as parts in the object store even on a shared disk.
        if let (Some(root), MetadataBackend::Sqlite(_)) = (backend.local_root, &config.metadata) {
            store.area = UploadArea::File(root);
        }
        Ok(store)
    }

    /// A store over an existing object store and metadata, with uploads as objects.
    pub fn new(objects: Arc<dyn ObjectStore>, meta: Arc<dyn Metadata>) -> Self {
        Self {
            objects,
            meta,
            area: UploadArea::Objects,
            hashers: Mutex::new(HashMap::new()),
            writing: Mutex::new(HashMap::new()),
            pulls: Mutex::new(Default::default()),
            signer: None,
            signer_prefix: None,
            s3: None,
            sync_root: None,
            instance: crate::instance::instance_id(),
            gc_turn: tokio::sync::Mutex::new(()),
            secret: tokio::sync::OnceCell::new(),
        }
    }

    /// A secret every process sharing this metadata holds (the first to ask stores a random
    /// one): what replicas sign for each other with (relayed blobs, UI sessions). Read once
    /// per process.
    pub async fn shared_secret(&self) -> Result<&[u8]> {
        let s = self
            .secret
            .get_or_try_init(|| async {
                let candidate = uuid::Uuid::new_v4().simple().to_string()
                    + &uuid::Uuid::new_v4().simple().to_string();
                Ok::<_, crate::error::Error>(
                    self.meta.shared_secret(&candidate).await?.into_bytes(),
                )
            })
            .await?;
        Ok(s.as_slice())
    }

    /// Says where other replicas reach this process (`http://10.0.0.7:5000`): it becomes
    /// part of this process's lease holder name, so a replica waiting on a lease this process
    /// holds can ask it directly (see [`holder_peer`]).
    pub fn set_peer_url(&mut self, url: &str) {
        let url: String = url.chars().filter(|c| !c.is_whitespace()).collect();
        if !url.is_empty() {
            self.instance = format!("{} {url}", self.instance);
        }
    }

    /// This process as a lease holder.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The metadata backend (for tools and tests that need it directly).
    pub fn meta(&self) -> &Arc<dyn Metadata> {
        &self.meta
    }

    /// Checks that metadata and object store both answer.
    pub async fn ping(&self) -> Result<()> {
        self.meta.ping().await?;
        match self
            .objects
            .head(&Path::from("berth-readiness-probe"))
            .await
        {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) async fn delete_quietly(&self, key: &Path) {
        crate::area::delete_quietly(&self.objects, key).await;
    }
}

/// Writes, reads back and deletes a probe object, so that a misconfigured bucket fails at
/// start-up rather than on the first push.
async fn check_writable(objects: &Arc<dyn ObjectStore>) -> Result<()> {
    let key = Path::from(format!("_berth/probe-{}", new_id()));
    objects
        .put(&key, bytes::Bytes::from_static(b"berth").into())
        .await?;
    objects.get(&key).await?.bytes().await?;
    objects.delete(&key).await?;
    Ok(())
}
