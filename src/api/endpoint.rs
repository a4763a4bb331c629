//! The OCI path grammar: `/v2/...` → [`Endpoint`].
//!
//! Repository names contain `/` and may even contain the words `blobs` or `manifests`, so the
//! path is matched from the right: the suffix decides the endpoint and everything between
//! `/v2/` and the suffix is the name.
//!
//! ```text
//! /v2/                                   Base
//! /v2/_catalog                           Catalog
//! /v2/<name>/tags/list                   Tags
//! /v2/<name>/manifests/<reference>       Manifest
//! /v2/<name>/blobs/uploads/              Uploads
//! /v2/<name>/blobs/uploads/<id>          Upload
//! /v2/<name>/blobs/<digest>              Blob
//! /v2/<name>/referrers/<digest>          Referrers
//! ```
//! Names and references are returned as text: checking them against their grammar is the
//! handlers' job, so that each can answer with the status its endpoint calls for.

/// A parsed distribution API path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint<'a> {
    /// `/v2/`: API version check.
    Base,
    /// `/v2/_catalog`.
    Catalog,
    /// `/v2/<name>/tags/list`.
    Tags {
        /// Repository name.
        name: &'a str,
    },
    /// `/v2/<name>/manifests/<reference>`.
    Manifest {
        /// Repository name.
        name: &'a str,
        /// Tag or digest.
        reference: &'a str,
    },
    /// `/v2/<name>/blobs/uploads/`.
    Uploads {
        /// Repository name.
        name: &'a str,
    },
    /// `/v2/<name>/blobs/uploads/<id>`.
    Upload {
        /// Repository name.
        name: &'a str,
        /// Session id.
        id: &'a str,
    },
    /// `/v2/<name>/blobs/<digest>`.
    Blob {
        /// Repository name.
        name: &'a str,
        /// Digest.
        digest: &'a str,
    },
    /// `/v2/<name>/referrers/<digest>`.
    Referrers {
        /// Repository name.
        name: &'a str,
        /// Subject digest.
        digest: &'a str,
    },
}

impl<'a> Endpoint<'a> {
    /// Parses a request path; `None` when it is not a distribution API path.
    pub fn parse(path: &'a str) -> Option<Self> {
        if path == "/v2" || path == "/v2/" {
            return Some(Self::Base);
        }
        let rest = path.strip_prefix("/v2/")?;
        if rest == "_catalog" {
            return Some(Self::Catalog);
        }
        if let Some(name) = rest.strip_suffix("/tags/list") {
            return nonempty(name).map(|name| Self::Tags { name });
        }
        if let Some(name) = rest
            .strip_suffix("/blobs/uploads/")
            .or(rest.strip_suffix("/blobs/uploads"))
        {
            return nonempty(name).map(|name| Self::Uploads { name });
        }
        let (head, last) = rest.rsplit_once('/')?;
        if last.is_empty() {
            return None;
        }
        if let Some(name) = head.strip_suffix("/blobs/uploads") {
            return nonempty(name).map(|name| Self::Upload { name, id: last });
        }
        let (name, kind) = head.rsplit_once('/')?;
        let name = nonempty(name)?;
        match kind {
            "manifests" => Some(Self::Manifest {
                name,
                reference: last,
            }),
            "blobs" => Some(Self::Blob { name, digest: last }),
            "referrers" => Some(Self::Referrers { name, digest: last }),
            _ => None,
        }
    }

    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Base => "base",
            Self::Catalog => "catalog",
            Self::Tags { .. } => "tags",
            Self::Manifest { .. } => "manifest",
            Self::Uploads { .. } => "uploads",
            Self::Upload { .. } => "upload",
            Self::Blob { .. } => "blob",
            Self::Referrers { .. } => "referrers",
        }
    }
}

fn nonempty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::Endpoint::{self, *};

    #[test]
    fn parses_from_the_right() {
        let cases: &[(&str, Option<Endpoint<'_>>)] = &[
            ("/v2/", Some(Base)),
            ("/v2", Some(Base)),
            ("/v2/_catalog", Some(Catalog)),
            ("/v2/a/b/tags/list", Some(Tags { name: "a/b" })),
            (
                "/v2/a/manifests/latest",
                Some(Manifest {
                    name: "a",
                    reference: "latest",
                }),
            ),
            (
                "/v2/blobs/manifests/manifests/x",
                Some(Manifest {
                    name: "blobs/manifests",
                    reference: "x",
                }),
            ),
            ("/v2/a/blobs/uploads/", Some(Uploads { name: "a" })),
            ("/v2/a/blobs/uploads", Some(Uploads { name: "a" })),
            (
                "/v2/a/b/blobs/uploads/123",
                Some(Upload {
                    name: "a/b",
                    id: "123",
                }),
            ),
            (
                "/v2/a/blobs/sha256:00",
                Some(Blob {
                    name: "a",
                    digest: "sha256:00",
                }),
            ),
            (
                "/v2/tags/list/blobs/d",
                Some(Blob {
                    name: "tags/list",
                    digest: "d",
                }),
            ),
            (
                "/v2/a/referrers/sha256:00",
                Some(Referrers {
                    name: "a",
                    digest: "sha256:00",
                }),
            ),
            ("/v2/manifests/x", None),
            ("/v2/a/manifests/", None),
            ("/v2/a/other/x", None),
            ("/v3/a/manifests/x", None),
            ("/", None),
        ];
        for (path, want) in cases {
            assert_eq!(&Endpoint::parse(path), want, "{path}");
        }
    }
}
