//! Errors of the auth crate.

use std::path::Path;

/// Errors setting up authentication (keys, user files, configuration).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A key is unusable.
    #[error("token key: {0}")]
    Key(String),
    /// The user file is malformed.
    #[error("htpasswd {path} line {line}: {message}")]
    Htpasswd {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A policy rule is malformed.
    #[error("access rule: {0}")]
    Policy(String),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Why a token was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Past its expiry (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// Before its `nbf` (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// Malformed, badly signed, wrong issuer or audience.
    #[error("invalid token: {0}")]
    Invalid(String),
}
