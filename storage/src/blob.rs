//! Blob bytes over `object_store`, content-addressed.
//!
//! # Key layout
//! ```text
//! blobs/<algorithm>/<first two hex>/<hex>     a verified blob; written once, never modified
//! uploads/<session-id>.<offset>-<nonce>       one committed chunk of an upload session
//! uploads/<session-id>.assembled-<nonce>      the chunks concatenated, while a session finishes
//! ```
//! A blob object is written only after its digest was verified, and always before the metadata
//! row that makes it visible; it is removed only after the metadata says nothing needs it.

use std::io::SeekFrom;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    GetOptions, GetRange, GetResultPayload, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, WriteMultipart,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::error::{Error, Result};
use crate::names::{Digest, Hasher};

/// A stream of bytes: request bodies going in, blob contents coming out.
pub type ByteStream = BoxStream<'static, std::io::Result<Bytes>>;

/// Size of the buffers handed to the object store while writing (also S3's minimum part size).
const WRITE_CHUNK: usize = 5 * 1024 * 1024;
/// Size of the reads from local files when serving blobs.
const READ_CHUNK: usize = 256 * 1024;

/// The object key of a blob.
pub fn blob_key(digest: &Digest) -> Path {
    let hex = digest.hex();
    Path::from(format!(
        "blobs/{}/{}/{}",
        digest.algorithm().as_str(),
        &hex[..2],
        hex
    ))
}

/// Where upload chunks live: one flat directory, so that no per-session directory has to be
/// created and removed (which races on local disk).
pub const UPLOADS: &str = "uploads";

/// The key of a piece (`what`) of upload session `id`.
pub fn upload_part_key(id: &str, what: &str) -> Path {
    Path::from(format!("{UPLOADS}/{id}.{what}"))
}

/// The session id an upload object belongs to.
pub fn upload_of(key: &Path) -> Option<&str> {
    key.filename()?.split('.').next()
}

/// Writes `body` to `key` as a multipart upload, feeding `hasher` on the way; returns the byte
/// count. Creates no object when the body is empty. On error nothing is left at `key`.
pub(crate) async fn write_stream(
    store: &Arc<dyn ObjectStore>,
    key: &Path,
    mut body: ByteStream,
    mut hasher: Option<&mut Hasher>,
) -> Result<u64> {
    let mut writer: Option<WriteMultipart> = None;
    let mut n = 0u64;
    loop {
        let chunk = match body.next().await {
            None => break,
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                if let Some(w) = writer {
                    let _ = w.abort().await;
                }
                return Err(Error::Body(e.to_string()));
            }
        };
        if chunk.is_empty() {
            continue;
        }
        if let Some(h) = hasher.as_deref_mut() {
            h.update(&chunk);
        }
        n += chunk.len() as u64;
        let w = match writer.as_mut() {
            Some(w) => w,
            None => {
                let up = store.put_multipart(key).await?;
                writer.insert(WriteMultipart::new_with_chunk_size(up, WRITE_CHUNK))
            }
        };
        if let Err(e) = w.wait_for_capacity(1).await {
            if let Some(w) = writer {
                let _ = w.abort().await;
            }
            return Err(e.into());
        }
        w.put(chunk);
    }
    if let Some(w) = writer {
        w.finish().await?;
    }
    Ok(n)
}

/// Writes an empty object at `key` unless one exists.
pub(crate) async fn put_empty(store: &Arc<dyn ObjectStore>, key: &Path) -> Result<()> {
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    match store.put_opts(key, PutPayload::new(), opts).await {
        Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Reads `key` (whole, or the inclusive byte range `range`) as a stream of large chunks.
pub(crate) async fn read(
    store: &Arc<dyn ObjectStore>,
    key: &Path,
    range: Option<(u64, u64)>,
) -> Result<ByteStream> {
    let opts = GetOptions {
        range: range.map(|(a, b)| GetRange::Bounded(a..b + 1)),
        ..Default::default()
    };
    let got = store.get_opts(key, opts).await?;
    let r = got.range.clone();
    match got.payload {
        GetResultPayload::File(file, _) => {
            let mut file = tokio::fs::File::from_std(file);
            file.seek(SeekFrom::Start(r.start)).await?;
            let limited = file.take(r.end - r.start);
            Ok(tokio_util_stream(limited))
        }
        GetResultPayload::Stream(s) => Ok(s.map(|r| r.map_err(std::io::Error::other)).boxed()),
    }
}

fn tokio_util_stream(reader: tokio::io::Take<tokio::fs::File>) -> ByteStream {
    futures_util::stream::unfold(Some(reader), |state| async move {
        let mut reader = state?;
        let mut buf = bytes::BytesMut::with_capacity(READ_CHUNK);
        while buf.len() < READ_CHUNK {
            match reader.read_buf(&mut buf).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Some((Err(e), None)),
            }
        }
        if buf.is_empty() {
            None
        } else {
            Some((Ok(buf.freeze()), Some(reader)))
        }
    })
    .boxed()
}

/// Feeds the whole object at `key` to `hasher`.
pub(crate) async fn hash_object(
    store: &Arc<dyn ObjectStore>,
    key: &Path,
    hasher: &mut Hasher,
) -> Result<()> {
    let mut s = read(store, key, None).await?;
    while let Some(chunk) = s.next().await {
        hasher.update(&chunk?);
    }
    Ok(())
}
