//! The storage error type. Each client-facing variant maps to one OCI error code in the server.

/// Errors from the storage layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A repository name fails the grammar.
    #[error("invalid repository name {0:?}")]
    NameInvalid(String),
    /// A tag fails the grammar.
    #[error("invalid tag {0:?}")]
    TagInvalid(String),
    /// A digest fails the grammar or names an unsupported algorithm.
    #[error("invalid digest {0:?}")]
    DigestInvalid(String),
    /// Uploaded content does not hash to the digest the client gave.
    #[error("content digest {computed} does not match {expected}")]
    DigestMismatch {
        /// The digest the client named.
        expected: String,
        /// The digest of what was received.
        computed: String,
    },
    /// The repository does not exist.
    #[error("repository {0} not known")]
    NameUnknown(String),
    /// The blob is not known in this repository.
    #[error("blob {0} not known")]
    BlobUnknown(String),
    /// The upload session does not exist (or belongs to another repository).
    #[error("upload {0} not known")]
    UploadUnknown(String),
    /// A chunk does not start where the upload currently ends.
    #[error("chunk starts at {got}, upload is at {expected}")]
    RangeInvalid {
        /// The current size of the upload.
        expected: u64,
        /// Where the chunk claimed to start.
        got: u64,
    },
    /// The declared size disagrees with the body.
    #[error("size invalid: {0}")]
    SizeInvalid(String),
    /// The manifest does not exist.
    #[error("manifest {0} not known")]
    ManifestUnknown(String),
    /// The manifest is not valid.
    #[error("manifest invalid: {0}")]
    ManifestInvalid(String),
    /// The manifest names blobs or manifests that are not in the repository.
    #[error("manifest references unknown content: {0:?}")]
    ManifestBlobUnknown(Vec<String>),
    /// The manifest is larger than the configured maximum.
    #[error("manifest of {size} bytes exceeds the limit of {limit} bytes")]
    ManifestTooLarge {
        /// Bytes received.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The client's request body failed while it was read.
    #[error("reading the request body failed: {0}")]
    Body(String),
    /// The object store failed.
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    /// The metadata database failed.
    #[error("metadata database: {0}")]
    Database(#[from] rusqlite::Error),
    /// The PostgreSQL metadata database failed.
    #[error("metadata database: {0}")]
    Postgres(String),
    /// A PostgreSQL transaction hit a deadlock or a serialisation failure: retried from the
    /// start (never seen outside the backend unless every attempt failed).
    #[error("metadata database (conflict, retried): {0}")]
    PostgresRetry(String),
    /// The metadata database cannot be reached (no connection within the pool's wait):
    /// the request may succeed later, or on another replica.
    #[error("metadata database unavailable: {0}")]
    MetadataUnavailable(String),
    /// Local I/O failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Work that runs once at a time across every process sharing the metadata is running
    /// elsewhere.
    #[error(
        "{what} is already running in {holder} (its lease lapses at unix time {until} unless renewed)"
    )]
    Busy {
        /// What is running.
        what: String,
        /// Who runs it: host, process id, instance.
        holder: String,
        /// When its lease lapses.
        until: i64,
    },
    /// `migrate-metadata` refused, or found the copy wrong.
    #[error("migration: {0}")]
    Migration(String),

    /// A background task failed to complete.
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    /// True when the failure is a full disk or an exhausted quota (the SQLite database, a
    /// local file, or an object store reporting ENOSPC/EDQUOT): the client is told so and the
    /// server frees its reserve, rather than a generic internal error.
    pub fn is_storage_full(&self) -> bool {
        match self {
            Self::Database(rusqlite::Error::SqliteFailure(f, _)) => {
                f.code == rusqlite::ErrorCode::DiskFull
            }
            Self::Io(e) => io_full(e),
            Self::ObjectStore(e) => {
                let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
                while let Some(s) = source {
                    if let Some(io) = s.downcast_ref::<std::io::Error>()
                        && io_full(io)
                    {
                        return true;
                    }
                    source = s.source();
                }
                false
            }
            // PostgreSQL's disk_full (SQLSTATE 53100) arrives as its message.
            Self::Postgres(m) | Self::Internal(m) => {
                m.contains("No space left on device") || m.contains("53100")
            }
            _ => false,
        }
    }
}

impl Error {
    /// True when a cloud object store kept failing through its retries (server errors,
    /// timeouts, dropped connections): the request may succeed later.
    pub fn is_store_unavailable(&self) -> bool {
        match self {
            Self::ObjectStore(object_store::Error::Generic { store, .. }) => {
                *store != "LocalFileSystem" && *store != "InMemory"
            }
            _ => false,
        }
    }
}

/// ENOSPC or EDQUOT.
fn io_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(28 | 122))
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
