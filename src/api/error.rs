//! [`ApiError`]: every failure as an OCI error code, an HTTP status and a message.
//!
//! Storage, cache and routing errors are mapped once, here. An internal failure reaches the
//! client only as a generic `UNKNOWN`; its detail travels in the response's extensions to
//! [`log_failures`], the one place failures are logged and counted.

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use berth_storage::Error as StoreError;
use serde_json::json;

use crate::proxy::{CacheError, UpstreamError};

/// An error code of the distribution spec (plus Docker's extras).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// BLOB_UNKNOWN
    BlobUnknown,
    /// BLOB_UPLOAD_INVALID
    BlobUploadInvalid,
    /// BLOB_UPLOAD_UNKNOWN
    BlobUploadUnknown,
    /// DIGEST_INVALID
    DigestInvalid,
    /// MANIFEST_BLOB_UNKNOWN
    ManifestBlobUnknown,
    /// MANIFEST_INVALID
    ManifestInvalid,
    /// MANIFEST_UNKNOWN
    ManifestUnknown,
    /// NAME_INVALID
    NameInvalid,
    /// NAME_UNKNOWN
    NameUnknown,
    /// SIZE_INVALID
    SizeInvalid,
    /// UNAUTHORIZED
    Unauthorized,
    /// DENIED
    Denied,
    /// UNSUPPORTED
    Unsupported,
    /// TOOMANYREQUESTS
    TooManyRequests,
    /// RANGE_INVALID (Docker)
    RangeInvalid,
    /// PAGINATION_NUMBER_INVALID (Docker)
    PaginationNumberInvalid,
    /// TAG_INVALID (Docker)
    TagInvalid,
    /// UNAVAILABLE (Docker)
    Unavailable,
    /// UNKNOWN (Docker)
    Unknown,
}

impl Code {
    /// The code's wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BlobUnknown => "BLOB_UNKNOWN",
            Self::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            Self::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            Self::DigestInvalid => "DIGEST_INVALID",
            Self::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            Self::ManifestInvalid => "MANIFEST_INVALID",
            Self::ManifestUnknown => "MANIFEST_UNKNOWN",
            Self::NameInvalid => "NAME_INVALID",
            Self::NameUnknown => "NAME_UNKNOWN",
            Self::SizeInvalid => "SIZE_INVALID",
            Self::Unauthorized => "UNAUTHORIZED",
            Self::Denied => "DENIED",
            Self::Unsupported => "UNSUPPORTED",
            Self::TooManyRequests => "TOOMANYREQUESTS",
            Self::RangeInvalid => "RANGE_INVALID",
            Self::PaginationNumberInvalid => "PAGINATION_NUMBER_INVALID",
            Self::TagInvalid => "TAG_INVALID",
            Self::Unavailable => "UNAVAILABLE",
            Self::Unknown => "UNKNOWN",
        }
    }

    /// The status that goes with the code by default.
    pub fn status(self) -> StatusCode {
        match self {
            Self::BlobUnknown
            | Self::BlobUploadUnknown
            | Self::ManifestUnknown
            | Self::NameUnknown => StatusCode::NOT_FOUND,
            Self::BlobUploadInvalid
            | Self::DigestInvalid
            | Self::ManifestBlobUnknown
            | Self::ManifestInvalid
            | Self::NameInvalid
            | Self::SizeInvalid
            | Self::PaginationNumberInvalid
            | Self::TagInvalid => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Denied => StatusCode::FORBIDDEN,
            Self::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            Self::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Self::RangeInvalid => StatusCode::RANGE_NOT_SATISFIABLE,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    code: Code,
    status: StatusCode,
    message: String,
    detail: Option<serde_json::Value>,
    headers: Vec<(header::HeaderName, HeaderValue)>,
    /// What went wrong inside, for the log only.
    internal: Option<String>,
    /// The failure was a full disk (see [`StorageFull`]).
    storage_full: bool,
}

/// Left in a response's extensions when a write failed because storage is full, so the
/// dispatcher can release the disk reserve ([`crate::disk::Disk::on_full`]).
#[derive(Debug, Clone, Copy)]
pub struct StorageFull;

/// The inside story of a failed request, left in the response's extensions for
/// [`log_failures`].
#[derive(Debug, Clone)]
pub struct Failure {
    /// What failed.
    pub error: String,
    /// Whether it was storage (counted in `berth_storage_errors_total`).
    pub storage: bool,
}

impl ApiError {
    /// An error with the code's usual status.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            status: code.status(),
            message: message.into(),
            detail: None,
            headers: Vec::new(),
            internal: None,
            storage_full: false,
        }
    }

    /// `507 Insufficient Storage`: a write failed, or would, because storage is full. The
    /// message says what to do; `error` (if any) goes to the log.
    pub fn storage_full(error: Option<String>) -> Self {
        let mut e = Self::new(
            Code::Unavailable,
            "the registry's storage is full: pushes are refused until space is freed \
             (delete images, then run garbage collection); pulls still work",
        )
        .with_status(StatusCode::INSUFFICIENT_STORAGE);
        e.internal = error;
        e.storage_full = true;
        e
    }

    /// A generic `UNKNOWN` for the client; `error` goes to the log.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        let mut e = Self::new(Code::Unknown, "internal storage error");
        e.internal = Some(error.to_string());
        e
    }

    /// Overrides the status.
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// Adds a `detail` value.
    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }

    /// Adds a response header.
    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The error code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let msg = e.to_string();
        if e.is_storage_full() {
            return Self::storage_full(Some(msg));
        }
        match e {
            StoreError::NameInvalid(_) => Self::new(Code::NameInvalid, msg),
            StoreError::TagInvalid(_) => Self::new(Code::TagInvalid, msg),
            StoreError::DigestInvalid(_) | StoreError::DigestMismatch { .. } => {
                Self::new(Code::DigestInvalid, msg)
            }
            StoreError::NameUnknown(_) => Self::new(Code::NameUnknown, msg),
            StoreError::BlobUnknown(_) => Self::new(Code::BlobUnknown, msg),
            StoreError::UploadUnknown(_) => Self::new(Code::BlobUploadUnknown, msg),
            StoreError::RangeInvalid { expected, .. } => {
                let range = if expected == 0 {
                    "0-0".to_owned()
                } else {
                    format!("0-{}", expected - 1)
                };
                let e = Self::new(Code::RangeInvalid, msg);
                match HeaderValue::from_str(&range) {
                    Ok(v) => e.with_header(header::RANGE, v),
                    Err(_) => e,
                }
            }
            StoreError::SizeInvalid(_) => Self::new(Code::SizeInvalid, msg),
            StoreError::ManifestUnknown(_) => Self::new(Code::ManifestUnknown, msg),
            StoreError::ManifestInvalid(_) => Self::new(Code::ManifestInvalid, msg),
            StoreError::ManifestBlobUnknown(missing) => {
                Self::new(Code::ManifestBlobUnknown, msg).with_detail(json!({ "digests": missing }))
            }
            StoreError::ManifestTooLarge { .. } => {
                Self::new(Code::ManifestInvalid, msg).with_status(StatusCode::PAYLOAD_TOO_LARGE)
            }
            StoreError::Body(_) => Self::new(Code::BlobUploadInvalid, msg),
            // The object store kept failing through its retries: the client may retry later.
            ref e if e.is_store_unavailable() => {
                let mut e = Self::new(
                    Code::Unavailable,
                    "blob storage is failing (the object store did not answer through retries); retry shortly",
                )
                .with_header(header::RETRY_AFTER, HeaderValue::from_static("5"));
                e.internal = Some(msg);
                e
            }
            StoreError::MetadataUnavailable(_) => {
                let mut e = Self::new(
                    Code::Unavailable,
                    "the metadata database is unreachable; retry",
                )
                .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"));
                e.internal = Some(msg);
                e
            }
            other => Self::internal(other),
        }
    }
}

impl From<CacheError> for ApiError {
    fn from(e: CacheError) -> Self {
        match e {
            CacheError::Upstream(UpstreamError::NotFound(m)) => {
                Self::new(Code::NameUnknown, m).with_status(StatusCode::NOT_FOUND)
            }
            CacheError::Upstream(UpstreamError::RateLimited {
                retry_after,
                message,
            }) => {
                let e = Self::new(
                    Code::TooManyRequests,
                    format!("not cached, and the upstream rate-limits us: {message}"),
                );
                match retry_after.and_then(|r| HeaderValue::from_str(&r).ok()) {
                    Some(v) => e.with_header(header::RETRY_AFTER, v),
                    None => e,
                }
            }
            CacheError::Upstream(e @ UpstreamError::Unavailable(_)) => Self::new(
                Code::Unavailable,
                format!("not cached, and the upstream cannot be reached: {e}"),
            ),
            CacheError::Upstream(e @ UpstreamError::BadContent(_)) => {
                Self::new(Code::Unavailable, e.to_string()).with_status(StatusCode::BAD_GATEWAY)
            }
            // An operator error at the gateway, not the client's: 502, and the message says
            // which upstream refused which credentials.
            CacheError::Upstream(e @ UpstreamError::CredentialsRefused(_)) => {
                Self::new(Code::Unavailable, e.to_string()).with_status(StatusCode::BAD_GATEWAY)
            }
            CacheError::Storage(m)
                if m.contains("No space left on device") || m.contains("disk is full") =>
            {
                Self::storage_full(Some(format!("cache storage: {m}")))
            }
            CacheError::Storage(m) => Self::internal(format!("cache storage: {m}")),
        }
    }
}

impl From<crate::registry::Error> for ApiError {
    fn from(e: crate::registry::Error) -> Self {
        use crate::registry::Error as E;
        match e {
            E::Storage(e) => e.into(),
            E::Cache(e) => e.into(),
            E::ReadOnly(_) => Self::new(Code::Unsupported, "cached repositories are read-only"),
            e @ E::UnknownUpstream(_) => {
                Self::new(Code::NameUnknown, e.to_string()).with_status(StatusCode::NOT_FOUND)
            }
        }
    }
}

impl ApiError {
    /// Like `From`, but an answer of "not there" from the cache gets the code `missing` (a
    /// manifest or a blob rather than a repository).
    pub fn missing(e: crate::registry::Error, missing: Code) -> Self {
        match e {
            crate::registry::Error::Cache(CacheError::Upstream(UpstreamError::NotFound(m))) => {
                Self::new(missing, m)
            }
            other => other.into(),
        }
    }
}

/// Middleware: logs each failed request once, inside its span, with what failed inside, and
/// counts storage failures.
pub async fn log_failures(req: Request, next: Next) -> Response {
    let op = req
        .extensions()
        .get::<super::operation::Classified>()
        .map_or("other", |c| c.name());
    let mut resp = next.run(req).await;
    if let Some(f) = resp.extensions_mut().remove::<Failure>() {
        if f.storage {
            metrics::counter!("berth_storage_errors_total").increment(1);
        }
        tracing::error!(operation = op, status = resp.status().as_u16(), error = %f.error, "request failed");
    }
    resp
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut entry = json!({ "code": self.code.as_str(), "message": self.message });
        if let Some(d) = self.detail {
            entry["detail"] = d;
        }
        let body = json!({ "errors": [entry] }).to_string();
        let mut resp = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        for (k, v) in self.headers {
            resp.headers_mut().insert(k, v);
        }
        if self.storage_full {
            resp.extensions_mut().insert(StorageFull);
        }
        if let Some(error) = self.internal {
            resp.extensions_mut().insert(Failure {
                error,
                storage: true,
            });
        }
        resp
    }
}

/// Result of a handler.
pub type ApiResult<T = Response> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    /// SQLITE_FULL, as rusqlite reports it.
    fn rusqlite_full() -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(13),
            Some("database or disk is full".into()),
        )
    }

    #[test]
    fn storage_errors_map_to_spec_codes() {
        let cases = [
            (StoreError::NameInvalid("A".into()), "NAME_INVALID", 400),
            (
                StoreError::DigestMismatch {
                    expected: "a".into(),
                    computed: "b".into(),
                },
                "DIGEST_INVALID",
                400,
            ),
            (StoreError::BlobUnknown("d".into()), "BLOB_UNKNOWN", 404),
            (
                StoreError::UploadUnknown("u".into()),
                "BLOB_UPLOAD_UNKNOWN",
                404,
            ),
            (
                StoreError::RangeInvalid {
                    expected: 3,
                    got: 0,
                },
                "RANGE_INVALID",
                416,
            ),
            (
                StoreError::ManifestUnknown("t".into()),
                "MANIFEST_UNKNOWN",
                404,
            ),
            (
                StoreError::ManifestBlobUnknown(vec!["d".into()]),
                "MANIFEST_BLOB_UNKNOWN",
                400,
            ),
            (
                StoreError::ManifestTooLarge { size: 9, limit: 1 },
                "MANIFEST_INVALID",
                413,
            ),
            (StoreError::NameUnknown("r".into()), "NAME_UNKNOWN", 404),
            (StoreError::Internal("x".into()), "UNKNOWN", 500),
            (
                StoreError::MetadataUnavailable("x".into()),
                "UNAVAILABLE",
                503,
            ),
            (
                StoreError::Io(std::io::Error::from_raw_os_error(28)),
                "UNAVAILABLE",
                507,
            ),
            (
                StoreError::Io(std::io::Error::from_raw_os_error(122)),
                "UNAVAILABLE",
                507,
            ),
            (StoreError::Database(rusqlite_full()), "UNAVAILABLE", 507),
        ];
        for (e, code, status) in cases {
            let a = ApiError::from(e);
            assert_eq!((a.code().as_str(), a.status().as_u16()), (code, status));
        }
    }
}
