//! Berth's persistence layer and the registry's invariants.
//!
//! [`Store`] is the only way to change what the registry holds. It keeps blob bytes in an
//! `object_store` (local disk, memory, S3, Azure, GCS) and everything else — repositories,
//! tags, manifests, references, upload sessions — behind the metadata seam ([`meta`]), SQLite
//! by default, PostgreSQL for replicas. No HTTP types appear here.
//!
//! # Layout
//! - [`names`]: the spec's grammar for repository names, tags, digests and references.
//! - [`manifest`]: manifest validation and reference extraction (bytes are the truth).
//! - [`blob`]: the object key layout and streaming reads and writes.
//! - `area`: upload areas (a file appended in place on local disk, or one object per chunk).
//! - [`store`]: the [`Store`] and what its operations share; the operations by concern:
//!   [`blobs`] (reads, mounts), [`uploads`] (sessions), [`manifests`] (pushes, tags, listings,
//!   referrers), [`pulls`] (batched pull times), [`gc`] (online garbage collection),
//!   [`evict`] (cache eviction), [`lease`] (one holder at a time, across processes),
//!   [`fsck`] (is the registry whole, and safe repairs).
//! - [`meta`]: the metadata seam, one trait per concern, and its backends ([`meta::sqlite`],
//!   [`meta::postgres`]).
//! - [`backend`]: storage configuration → object store.
//!
//! # Consistency rules
//! - An object is written before the row that makes it visible; a row is deleted before its object.
//! - Uploads are hashed while streamed and become blobs only once the digest matched.
//! - Upload state (committed size and chunk list) lives in the metadata, so a session survives
//!   restarts and, with object parts, may continue on another replica; an in-memory hasher
//!   only saves a re-read.
//! - What a client was told exists (an upload's or mount's 201, a HEAD's 200) is protected from
//!   garbage collection in the metadata before the answer goes out (see [`gc`]).

mod area;
pub mod backend;
pub mod blob;
pub mod blobs;
mod browse;
pub mod error;
pub mod evict;
pub mod fsck;
pub mod gc;
mod instance;
pub mod lease;
pub mod manifest;
pub mod manifests;
pub mod meta;
pub mod names;
pub mod pulls;
pub mod s3;
pub mod store;
#[cfg(any(test, feature = "suite"))]
pub mod suite;
pub mod uploads;

pub use backend::StorageConfig;
pub use blob::ByteStream;
pub use blobs::BlobRead;
pub use error::{Error, Result};
pub use evict::{EvictPolicy, EvictReport};
pub use fsck::{FsckOptions, FsckReport};
pub use gc::{GcPolicy, GcReport, GcRun};
pub use manifests::{MAX_MANIFEST_SIZE, PutManifest, StoredManifest};
pub use meta::{Metadata, Page, Referrer, TagRow};
pub use names::{Algorithm, Digest, Reference, RepoName, Tag};
pub use store::Store;
pub use uploads::{Chunk, UploadStatus};
