//! A full disk must not wedge the registry: deleting images and collecting garbage are what
//! free space, and both need to write a little metadata.
//!
//! Berth keeps a reserve file in its data directory (`limits.disk_reserve`, 64 MiB by
//! default). When a write fails because the disk is full, [`Disk::on_full`] deletes the reserve
//! (so the metadata database has room for deletes, collection and pull times) and marks the
//! disk full: pushes are refused up front with `507 Insufficient Storage` (instead of failing
//! half-way through a body), reads, deletes and GC go on. A background check
//! ([`Disk::recheck`]) puts the reserve back and lifts the mark once free space exceeds twice
//! the reserve, without a restart. `berth serve` and `berth gc` release the reserve at start when
//! the disk is already full, so both start.
//!
//! The mark is per process: each process watches the disk it writes to (a replica's data
//! directory is its own; a shared object store reports its own errors to every replica).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The reserve file's name in the data directory.
const RESERVE_FILE: &str = "reserve.bin";
/// Free space below which the disk counts as full at start-up, before anything failed.
const START_FULL_BELOW: u64 = 1 << 20;

/// The data directory's free space and its reserve.
#[derive(Debug, Clone)]
pub struct Disk {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    reserve: u64,
    full: AtomicBool,
}

impl Disk {
    /// The data directory `dir` with a reserve of `reserve` bytes (0: none).
    pub fn new(dir: &Path, reserve: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                reserve,
                full: AtomicBool::new(false),
            }),
        }
    }

    /// At start-up: releases the reserve if the disk is already full (so opening the database
    /// and serving reads work), or creates it if there is room.
    pub fn prepare(&self) {
        let _ = std::fs::create_dir_all(&self.inner.dir);
        match self.free() {
            Some(free) if free < START_FULL_BELOW => self.on_full(),
            _ => {
                let _ = self.recheck();
            }
        }
    }

    /// Whether pushes are being refused because the disk is full.
    pub fn is_full(&self) -> bool {
        self.inner.full.load(Ordering::Relaxed)
    }

    /// A write failed because the disk is full: free the reserve and refuse pushes until
    /// space comes back.
    pub fn on_full(&self) {
        if self.inner.full.swap(true, Ordering::Relaxed) {
            return;
        }
        metrics::gauge!("berth_storage_full").set(1.0);
        let path = self.reserve_path();
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::error!(
                reserve = self.inner.reserve,
                dir = %self.inner.dir.display(),
                "storage is full: released the reserve so deletes and garbage collection can \
                 run; pushes are refused until space is freed"
            ),
            Err(_) => tracing::error!(
                dir = %self.inner.dir.display(),
                "storage is full (no reserve to release); pushes are refused until space is \
                 freed"
            ),
        }
    }

    /// Looks at free space: when it exceeds twice the reserve (and at least 1 MiB more), puts
    /// the reserve back and lifts the full mark. Returns whether the disk counts as full.
    pub fn recheck(&self) -> bool {
        let Some(free) = self.free() else {
            return self.is_full();
        };
        let reserve = self.inner.reserve;
        let path = self.reserve_path();
        let has_reserve = reserve == 0 || path.exists();
        if free < reserve.saturating_mul(2).saturating_add(START_FULL_BELOW) {
            return self.is_full();
        }
        if !has_reserve && let Err(e) = write_reserve(&path, reserve) {
            tracing::warn!(error = %e, path = %path.display(), "could not write the disk reserve");
            return self.is_full();
        }
        if self.inner.full.swap(false, Ordering::Relaxed) {
            metrics::gauge!("berth_storage_full").set(0.0);
            tracing::info!(
                free_bytes = free,
                "storage has space again: the reserve is back and pushes are accepted"
            );
        }
        false
    }

    fn reserve_path(&self) -> PathBuf {
        self.inner.dir.join(RESERVE_FILE)
    }

    /// Bytes available to Berth on the data directory's file system.
    fn free(&self) -> Option<u64> {
        let s = rustix::fs::statvfs(&self.inner.dir).ok()?;
        Some(s.f_bavail.saturating_mul(s.f_frsize))
    }
}

/// Allocates `size` bytes (real blocks, not a sparse file: `fallocate`, or zeros where the
/// file system cannot) under a temporary name, then renames it into place.
fn write_reserve(path: &Path, size: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        if rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, size).is_err() {
            let block = vec![0u8; 1 << 20];
            let mut left = size;
            while left > 0 {
                let n = usize::try_from(left.min(block.len() as u64)).unwrap_or(block.len());
                f.write_all(&block[..n])?;
                left -= n as u64;
            }
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
