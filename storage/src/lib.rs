//! Berth's persistence layer and the registry's invariants.
//!
//! [`Store`] is the only way to change what the registry holds. It keeps blob bytes in an
//! `object_store` (local disk, memory, and later S3/GCS/Azure) and everything else — repositories,
//! tags, manifests, references, upload sessions — in SQLite. No HTTP types appear here.
//!
//! # Layout
//! - [`names`]: the spec's grammar for repository names, tags, digests and references.
//! - [`manifest`]: manifest validation and reference extraction (bytes are the truth).
//! - [`blob`]: the object key layout and streaming reads and writes.
//! - [`meta`]: SQLite connections, migrations and schema.
//! - [`backend`]: storage configuration → object store.
//! - [`gc`]: online garbage collection (mark from SQL review queues, sweep in batches).
//! - [`maintenance`]: batched pull times, upload expiry.
//! - [`lease`]: one holder at a time, across processes (garbage collection, prefetch).
//!
//! # Consistency rules
//! - An object is written before the row that makes it visible; a row is deleted before its object.
//! - Uploads are hashed while streamed and become blobs only once the digest matched.
//! - Upload state (committed size and chunk list) lives in SQLite, so a session survives restarts
//!   and may continue on another replica; an in-memory hasher only saves a re-read.

pub mod backend;
pub mod blob;
pub mod error;
mod evict;
pub mod gc;
pub mod lease;
pub mod maintenance;
pub mod manifest;
pub mod meta;
pub mod names;
mod store;

pub use backend::StorageConfig;
pub use blob::ByteStream;
pub use error::{Error, Result};
pub use evict::{EvictPolicy, EvictReport};
pub use gc::{GcPolicy, GcReport, GcRun};
pub use names::{Algorithm, Digest, Reference, RepoName, Tag};
pub use store::{
    BlobRead, Chunk, MAX_MANIFEST_SIZE, Page, PutManifest, Referrer, Store, StoredManifest,
    UploadStatus,
};
