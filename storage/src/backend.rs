//! Storage configuration: which object store holds the blobs, where the metadata lives.

use std::path::PathBuf;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;

use crate::error::{Error, Result};

/// Where blob bytes are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobBackend {
    /// A directory on local disk.
    Filesystem(PathBuf),
    /// Process memory (tests).
    Memory,
}

/// Everything [`crate::Store::open`] needs.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// Blob storage.
    pub blobs: BlobBackend,
    /// Path of the SQLite metadata database.
    pub database: PathBuf,
}

impl StorageConfig {
    /// Blobs under `<data>/blobs-root`, metadata in `<data>/berth.db`.
    pub fn local(data: impl Into<PathBuf>) -> Self {
        let data = data.into();
        Self {
            blobs: BlobBackend::Filesystem(data.join("objects")),
            database: data.join("berth.db"),
        }
    }

    /// Builds the object store.
    pub fn object_store(&self) -> Result<Arc<dyn ObjectStore>> {
        Ok(match &self.blobs {
            BlobBackend::Filesystem(root) => {
                std::fs::create_dir_all(root)?;
                Arc::new(LocalFileSystem::new_with_prefix(root).map_err(|e| {
                    Error::Internal(format!("storage root {}: {e}", root.display()))
                })?)
            }
            BlobBackend::Memory => Arc::new(InMemory::new()),
        })
    }
}
