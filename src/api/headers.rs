//! Request parsing shared by handlers: names, queries, ranges and body streams.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, header};
use berth_storage::{ByteStream, RepoName};
use futures_util::{StreamExt, TryStreamExt};

use super::error::{ApiError, ApiResult, Code};

/// `Docker-Content-Digest`.
pub(super) const DIGEST_HEADER: &str = "docker-content-digest";

/// Parses a repository name from the path.
pub(super) fn repo(name: &str) -> ApiResult<RepoName> {
    name.parse().map_err(ApiError::from)
}

/// Query parameters, in order, repeated keys kept.
pub(super) fn query(uri: &axum::http::Uri) -> Vec<(String, String)> {
    uri.query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// The first value of `key` in `q`.
pub(super) fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// A header as text, if present and printable.
pub(super) fn text<'a>(h: &'a HeaderMap, name: &header::HeaderName) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// The declared `Content-Length`, if any.
pub(super) fn content_length(h: &HeaderMap) -> ApiResult<Option<u64>> {
    match text(h, &header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| ApiError::new(Code::SizeInvalid, "invalid Content-Length")),
    }
}

/// A chunk's `Content-Range: <start>-<end>` (inclusive); a `bytes ` or `bytes=` prefix is tolerated.
pub(super) fn content_range(h: &HeaderMap) -> ApiResult<Option<(u64, u64)>> {
    let Some(v) = text(h, &header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let v = v.trim();
    let v = v
        .strip_prefix("bytes=")
        .or_else(|| v.strip_prefix("bytes "))
        .unwrap_or(v);
    let v = v.split('/').next().unwrap_or(v);
    let bad = || ApiError::new(Code::RangeInvalid, format!("invalid Content-Range {v:?}"));
    let (a, b) = v.split_once('-').ok_or_else(bad)?;
    let (a, b): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if b < a {
        return Err(bad());
    }
    Ok(Some((a, b)))
}

/// The body as a byte stream for storage.
pub(super) fn stream(body: Body) -> ByteStream {
    body.into_data_stream()
        .map_err(std::io::Error::other)
        .inspect_ok(|chunk| {
            metrics::counter!("berth_bytes_received_total").increment(chunk.len() as u64)
        })
        .boxed()
}

/// An upload session's URL.
pub(super) fn upload_location(repo: &RepoName, id: &str) -> HeaderValue {
    value(&format!("/v2/{repo}/blobs/uploads/{id}"))
}

/// `0-<last byte>` as the spec writes upload progress (`0-0` when empty).
pub(super) fn upload_range(size: u64) -> HeaderValue {
    value(&format!("0-{}", size.saturating_sub(1)))
}

/// A header value from text that is known to be visible ASCII (names, digests, numbers).
pub(super) fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// A byte range requested by `Range`, resolved against `size`: `Ok(None)` for the whole blob,
/// `Err(())` when unsatisfiable.
pub(super) fn byte_range(h: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(v) = text(h, &header::RANGE) else {
        return Ok(None);
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None); // multiple ranges: answer with the whole blob
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    match (a.is_empty(), b.is_empty()) {
        (true, true) => Ok(None),
        (true, false) => {
            let Ok(n) = b.parse::<u64>() else {
                return Ok(None);
            };
            if n == 0 || size == 0 {
                return Err(());
            }
            Ok(Some((size.saturating_sub(n), size - 1)))
        }
        (false, _) => {
            let Ok(start) = a.parse::<u64>() else {
                return Ok(None);
            };
            let end = if b.is_empty() {
                u64::MAX
            } else {
                match b.parse::<u64>() {
                    Ok(e) => e,
                    Err(_) => return Ok(None),
                }
            };
            if start >= size || end < start {
                return Err(());
            }
            Ok(Some((start, end.min(size - 1))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str, size: u64) -> Result<Option<(u64, u64)>, ()> {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
        byte_range(&h, size)
    }

    #[test]
    fn ranges() {
        assert_eq!(range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(range("bytes=-500", 100), Ok(Some((0, 99))));
        assert_eq!(range("bytes=50-5000", 100), Ok(Some((50, 99))));
        assert_eq!(range("bytes=100-", 100), Err(()));
        assert_eq!(range("bytes=500-0", 1000), Err(()));
        assert_eq!(range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(range("items=0-1", 100), Ok(None));
        assert_eq!(range("bytes=-0", 100), Err(()));
    }

    #[test]
    fn content_ranges() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_RANGE, HeaderValue::from_static("0-21"));
        assert_eq!(content_range(&h).ok().flatten(), Some((0, 21)));
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes 5-9/*"),
        );
        assert_eq!(content_range(&h).ok().flatten(), Some((5, 9)));
        h.insert(header::CONTENT_RANGE, HeaderValue::from_static("9-5"));
        assert!(content_range(&h).is_err());
    }
}

/// Properties over generated input (`PROPTEST_CASES` sets how many).
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn with(name: header::HeaderName, v: &str) -> Option<HeaderMap> {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(v).ok()?);
        Some(h)
    }

    proptest! {
        /// Any `Range`: whole, a range inside the blob, or unsatisfiable; never a panic or a
        /// range past the end.
        #[test]
        fn any_range_stays_inside_the_blob(v in "[ -~]{0,40}", size in 0u64..(1 << 40)) {
            if let Some(h) = with(header::RANGE, &v)
                && let Ok(Some((a, b))) = byte_range(&h, size)
            {
                prop_assert!(a <= b && b < size, "{v:?} on {size} gave {a}-{b}");
            }
        }

        #[test]
        fn valid_ranges_are_served_as_asked(size in 1u64..(1 << 40), a in any::<u64>(), len in 0u64..(1 << 30)) {
            let a = a % size;
            let b = a.saturating_add(len);
            let h = with(header::RANGE, &format!("bytes={a}-{b}")).unwrap();
            prop_assert_eq!(byte_range(&h, size), Ok(Some((a, b.min(size - 1)))));
            let n = len.max(1);
            let h = with(header::RANGE, &format!("bytes=-{n}")).unwrap();
            prop_assert_eq!(byte_range(&h, size), Ok(Some((size.saturating_sub(n), size - 1))));
        }

        /// Any `Content-Range`: a well-ordered range or a `RANGE_INVALID`, never a panic; a valid
        /// one reads back as written.
        #[test]
        fn content_ranges(v in "[ -~]{0,40}", a in any::<u64>(), len in any::<u64>()) {
            if let Some(h) = with(header::CONTENT_RANGE, &v)
                && let Ok(Some((x, y))) = content_range(&h)
            {
                prop_assert!(x <= y);
            }
            let b = a.saturating_add(len);
            let h = with(header::CONTENT_RANGE, &format!("{a}-{b}")).unwrap();
            prop_assert_eq!(content_range(&h).ok(), Some(Some((a, b))));
        }
    }
}
