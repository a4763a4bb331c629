//! [`Operation`]: what a request does, decided once from its method and path.
//!
//! The path grammar, matched from the right because repository names contain `/` and may even
//! contain the words `blobs` or `manifests`:
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
//! /v2/<name>/_describe/<reference>       Describe (Berth's own; `_` never starts a name part)
//! ```
//!
//! Then [`ROUTES`], the one table of what the API does: each row is a path shape and a method,
//! the operation's name (for metrics and logs), the access it needs, and its handler. A `GET`
//! row also answers `HEAD`. A middleware classifies every request right after the router and
//! puts the [`Operation`] in its extensions; metrics, authorization, the registry façade's
//! local-or-upstream decision and the handler all read it, and none parses the path again.
//!
//! Names and references stay text here: checking them against their grammar is the handlers'
//! job, so that each can answer with the status its endpoint calls for.

use axum::extract::Request;
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use berth_auth::{Actions, Scope};
use futures_util::future::BoxFuture;

use super::error::ApiResult;
use super::{blobs, describe, listing, manifests, uploads};
use crate::state::AppState;

/// The shape of a distribution API path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `/v2/`: API version check.
    Base,
    /// `/v2/_catalog`.
    Catalog,
    /// `/v2/<name>/tags/list`.
    Tags,
    /// `/v2/<name>/manifests/<reference>`.
    Manifest,
    /// `/v2/<name>/blobs/uploads/`.
    Uploads,
    /// `/v2/<name>/blobs/uploads/<id>`.
    Upload,
    /// `/v2/<name>/blobs/<digest>`.
    Blob,
    /// `/v2/<name>/referrers/<digest>`.
    Referrers,
    /// `/v2/<name>/_describe/<reference>`.
    Describe,
}

/// A path split by the grammar: its shape, the repository name and the last segment
/// (reference, digest or session id), both as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    /// Which endpoint.
    pub shape: Shape,
    /// The repository name, for every shape but `Base` and `Catalog`.
    pub name: Option<String>,
    /// The reference, digest or upload session id, for shapes that have one.
    pub arg: Option<String>,
}

impl Path {
    /// Parses a request path; `None` when it is not a distribution API path.
    pub fn parse(path: &str) -> Option<Self> {
        let p = |shape, name: Option<&str>, arg: Option<&str>| {
            Some(Self {
                shape,
                name: name.map(str::to_owned),
                arg: arg.map(str::to_owned),
            })
        };
        if path == "/v2" || path == "/v2/" {
            return p(Shape::Base, None, None);
        }
        let rest = path.strip_prefix("/v2/")?;
        if rest == "_catalog" {
            return p(Shape::Catalog, None, None);
        }
        if let Some(name) = rest.strip_suffix("/tags/list") {
            return p(Shape::Tags, Some(nonempty(name)?), None);
        }
        if let Some(name) = rest
            .strip_suffix("/blobs/uploads/")
            .or(rest.strip_suffix("/blobs/uploads"))
        {
            return p(Shape::Uploads, Some(nonempty(name)?), None);
        }
        let (head, last) = rest.rsplit_once('/')?;
        if last.is_empty() {
            return None;
        }
        if let Some(name) = head.strip_suffix("/blobs/uploads") {
            return p(Shape::Upload, Some(nonempty(name)?), Some(last));
        }
        let (name, kind) = head.rsplit_once('/')?;
        let name = nonempty(name)?;
        let shape = match kind {
            "manifests" => Shape::Manifest,
            "blobs" => Shape::Blob,
            "referrers" => Shape::Referrers,
            "_describe" => Shape::Describe,
            _ => return None,
        };
        p(shape, Some(name), Some(last))
    }
}

fn nonempty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// What an operation needs from the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Any valid credentials (the `/v2/` ping challenges anonymous callers).
    SignedIn,
    /// `registry:catalog:*`.
    Catalog,
    /// Pull on the repository.
    Pull,
    /// Pull and push on the repository.
    Push,
    /// Delete on the repository.
    Delete,
}

/// A handler: the operation's work, given the state, the operation and the request.
pub type Handler = fn(AppState, Operation, Request) -> BoxFuture<'static, ApiResult>;

/// One row of [`ROUTES`].
#[derive(Debug)]
pub struct Route {
    /// The path shape it serves.
    pub shape: Shape,
    /// The method (a `GET` row answers `HEAD` too).
    pub method: Method,
    /// The operation's name, as metrics and logs show it.
    pub name: &'static str,
    /// What the caller needs.
    pub access: Access,
    /// The handler.
    pub handler: Handler,
}

/// Every operation of the API.
pub static ROUTES: &[Route] = &[
    Route {
        shape: Shape::Base,
        method: Method::GET,
        name: "ping",
        access: Access::SignedIn,
        handler: |_, _, _| Box::pin(super::ping()),
    },
    Route {
        shape: Shape::Catalog,
        method: Method::GET,
        name: "list_catalog",
        access: Access::Catalog,
        handler: |s, o, r| Box::pin(listing::catalog(s, o, r)),
    },
    Route {
        shape: Shape::Tags,
        method: Method::GET,
        name: "list_tags",
        access: Access::Pull,
        handler: |s, o, r| Box::pin(listing::tags(s, o, r)),
    },
    Route {
        shape: Shape::Referrers,
        method: Method::GET,
        name: "list_referrers",
        access: Access::Pull,
        handler: |s, o, r| Box::pin(listing::referrers(s, o, r)),
    },
    Route {
        shape: Shape::Describe,
        method: Method::GET,
        name: "describe_manifest",
        access: Access::Pull,
        handler: |s, o, r| Box::pin(describe::describe(s, o, r)),
    },
    Route {
        shape: Shape::Manifest,
        method: Method::GET,
        name: "get_manifest",
        access: Access::Pull,
        handler: |s, o, r| Box::pin(manifests::get(s, o, r)),
    },
    Route {
        shape: Shape::Manifest,
        method: Method::PUT,
        name: "put_manifest",
        access: Access::Push,
        handler: |s, o, r| Box::pin(manifests::put(s, o, r)),
    },
    Route {
        shape: Shape::Manifest,
        method: Method::DELETE,
        name: "delete_manifest",
        access: Access::Delete,
        handler: |s, o, _| Box::pin(manifests::delete(s, o)),
    },
    Route {
        shape: Shape::Blob,
        method: Method::GET,
        name: "get_blob",
        access: Access::Pull,
        handler: |s, o, r| Box::pin(blobs::get(s, o, r)),
    },
    Route {
        shape: Shape::Blob,
        method: Method::DELETE,
        name: "delete_blob",
        access: Access::Delete,
        handler: |s, o, _| Box::pin(blobs::delete(s, o)),
    },
    Route {
        shape: Shape::Uploads,
        method: Method::POST,
        name: "start_upload",
        access: Access::Push,
        handler: |s, o, r| Box::pin(uploads::post(s, o, r)),
    },
    Route {
        shape: Shape::Upload,
        method: Method::GET,
        name: "get_upload",
        access: Access::Push,
        handler: |s, o, _| Box::pin(uploads::status(s, o)),
    },
    Route {
        shape: Shape::Upload,
        method: Method::PATCH,
        name: "patch_upload",
        access: Access::Push,
        handler: |s, o, r| Box::pin(uploads::patch(s, o, r)),
    },
    Route {
        shape: Shape::Upload,
        method: Method::PUT,
        name: "put_upload",
        access: Access::Push,
        handler: |s, o, r| Box::pin(uploads::put(s, o, r)),
    },
    Route {
        shape: Shape::Upload,
        method: Method::DELETE,
        name: "cancel_upload",
        access: Access::Push,
        handler: |s, o, _| Box::pin(uploads::cancel(s, o)),
    },
];

/// What a request does.
#[derive(Debug, Clone)]
pub enum Classified {
    /// An operation of the API.
    Operation(Operation),
    /// A distribution API path, with a method nothing serves there.
    Unsupported {
        /// The path's shape.
        shape: Shape,
        /// The method asked for.
        method: Method,
    },
    /// Not a distribution API path.
    NotFound,
    /// Outside `/v2` (health, metrics, the token endpoint).
    Other(&'static str),
}

/// A request to the distribution API, classified.
#[derive(Debug, Clone)]
pub struct Operation {
    /// Its row of the table.
    pub route: &'static Route,
    /// The method as sent (`HEAD` for a `GET` row asked with `HEAD`).
    pub method: Method,
    /// The path, split.
    pub path: Path,
    /// containerd's `?ns=<registry>` naming the upstream the client means, if sent.
    pub ns: Option<String>,
}

impl Operation {
    /// The operation's name, for metrics and logs.
    pub fn name(&self) -> &'static str {
        self.route.name
    }

    /// The repository name in the path (empty for `/v2/` and the catalog).
    pub fn repository(&self) -> &str {
        self.path.name.as_deref().unwrap_or("")
    }

    /// The reference, digest or upload id in the path (empty when the shape has none).
    pub fn arg(&self) -> &str {
        self.path.arg.as_deref().unwrap_or("")
    }

    /// Whether it changes what the registry holds.
    pub fn writes(&self) -> bool {
        matches!(self.route.access, Access::Push | Access::Delete)
    }

    /// Whether it was asked with `HEAD`.
    pub fn is_head(&self) -> bool {
        self.method == Method::HEAD
    }

    /// The token scopes it needs: pull to read, pull+push to write, delete to delete.
    pub fn scopes(&self) -> Vec<Scope> {
        let repo = |actions| vec![Scope::repository(self.repository(), actions)];
        match self.route.access {
            Access::SignedIn => Vec::new(),
            Access::Catalog => vec![Scope::catalog()],
            Access::Pull => repo(Actions::PULL),
            Access::Push => repo(Actions::PULL | Actions::PUSH),
            Access::Delete => repo(Actions::DELETE),
        }
    }
}

/// Classifies `method` on `uri`.
pub fn classify(method: &Method, uri: &axum::http::Uri) -> Classified {
    match uri.path() {
        "/metrics" => return Classified::Other("metrics"),
        "/livez" | "/readyz" => return Classified::Other("health"),
        "/auth/token" => return Classified::Other("token"),
        _ => {}
    }
    let Some(path) = Path::parse(uri.path()) else {
        return Classified::NotFound;
    };
    let wanted = if method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    let Some(route) = ROUTES
        .iter()
        .find(|r| r.shape == path.shape && r.method == *wanted)
    else {
        return Classified::Unsupported {
            shape: path.shape,
            method: method.clone(),
        };
    };
    let ns = uri.query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "ns")
            .map(|(_, v)| v.into_owned())
            .filter(|v| !v.is_empty())
    });
    Classified::Operation(Operation {
        route,
        method: method.clone(),
        path,
        ns,
    })
}

/// Middleware: classifies the request once and puts the answer in its extensions.
pub async fn classify_request(mut req: Request, next: Next) -> Response {
    let c = classify(req.method(), req.uri());
    req.extensions_mut().insert(c);
    next.run(req).await
}

impl Shape {
    /// The endpoint's label in metrics (`berth_requests_total{endpoint=…}`).
    pub fn label(self) -> &'static str {
        match self {
            Self::Base => "base",
            Self::Catalog => "catalog",
            Self::Tags => "tags",
            Self::Manifest => "manifest",
            Self::Uploads => "uploads",
            Self::Upload => "upload",
            Self::Blob => "blob",
            Self::Referrers => "referrers",
            Self::Describe => "describe",
        }
    }
}

impl Classified {
    /// The `endpoint` label of metrics: the path's shape (the method is a label of its own),
    /// or what else the request was.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Operation(o) => o.path.shape.label(),
            Self::Unsupported { shape, .. } => shape.label(),
            Self::NotFound | Self::Other("token") => "other",
            Self::Other(l) => l,
        }
    }

    /// The operation's name for logs (`get_manifest`, `patch_upload`…).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Operation(o) => o.name(),
            other => other.label(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Parsed = Option<(Shape, Option<&'static str>, Option<&'static str>)>;

    fn parsed(path: &str) -> Parsed {
        let p = Path::parse(path)?;
        Some((
            p.shape,
            p.name.map(|n| &*n.leak()),
            p.arg.map(|a| &*a.leak()),
        ))
    }

    #[test]
    fn paths_parse_from_the_right() {
        use Shape::*;
        let cases: &[(&str, Parsed)] = &[
            ("/v2/", Some((Base, None, None))),
            ("/v2", Some((Base, None, None))),
            ("/v2/_catalog", Some((Catalog, None, None))),
            ("/v2/a/b/tags/list", Some((Tags, Some("a/b"), None))),
            (
                "/v2/a/manifests/latest",
                Some((Manifest, Some("a"), Some("latest"))),
            ),
            (
                "/v2/blobs/manifests/manifests/x",
                Some((Manifest, Some("blobs/manifests"), Some("x"))),
            ),
            ("/v2/a/blobs/uploads/", Some((Uploads, Some("a"), None))),
            ("/v2/a/blobs/uploads", Some((Uploads, Some("a"), None))),
            (
                "/v2/a/b/blobs/uploads/123",
                Some((Upload, Some("a/b"), Some("123"))),
            ),
            (
                "/v2/a/blobs/sha256:00",
                Some((Blob, Some("a"), Some("sha256:00"))),
            ),
            (
                "/v2/tags/list/blobs/d",
                Some((Blob, Some("tags/list"), Some("d"))),
            ),
            (
                "/v2/a/referrers/sha256:00",
                Some((Referrers, Some("a"), Some("sha256:00"))),
            ),
            (
                "/v2/a/b/_describe/latest",
                Some((Describe, Some("a/b"), Some("latest"))),
            ),
            ("/v2/manifests/x", None),
            ("/v2/a/manifests/", None),
            ("/v2/a/other/x", None),
            ("/v3/a/manifests/x", None),
            ("/", None),
        ];
        for (path, want) in cases {
            assert_eq!(&parsed(path), want, "{path}");
        }
    }

    fn op(method: Method, uri: &str) -> Operation {
        match classify(&method, &uri.parse().unwrap()) {
            Classified::Operation(o) => o,
            other => panic!("{method} {uri}: {other:?}"),
        }
    }

    #[test]
    fn every_shape_and_method_has_one_row() {
        for (i, a) in ROUTES.iter().enumerate() {
            for b in &ROUTES[i + 1..] {
                assert!(
                    !(a.shape == b.shape && a.method == b.method),
                    "{} and {} serve the same requests",
                    a.name,
                    b.name
                );
            }
        }
    }

    #[test]
    fn operations_know_their_scopes_and_whether_they_write() {
        let m = op(Method::GET, "/v2/a/b/manifests/t");
        assert_eq!(m.name(), "get_manifest");
        assert_eq!(m.scopes()[0].to_string(), "repository:a/b:pull");
        assert!(!m.writes());
        let h = op(Method::HEAD, "/v2/a/b/manifests/t?ns=docker.io");
        assert_eq!(h.name(), "get_manifest");
        assert!(h.is_head());
        assert_eq!(h.ns.as_deref(), Some("docker.io"));
        let p = op(Method::PUT, "/v2/a/b/manifests/t");
        assert_eq!(p.scopes()[0].to_string(), "repository:a/b:pull,push");
        assert!(p.writes());
        let d = op(Method::DELETE, "/v2/a/b/manifests/t");
        assert_eq!(d.scopes()[0].to_string(), "repository:a/b:delete");
        let u = op(Method::GET, "/v2/a/blobs/uploads/x");
        assert_eq!(u.scopes()[0].to_string(), "repository:a:pull,push");
        assert!(u.writes(), "an upload's status belongs to a push");
        assert_eq!(
            op(Method::GET, "/v2/_catalog").scopes()[0].to_string(),
            "registry:catalog:*"
        );
        assert!(op(Method::GET, "/v2/").scopes().is_empty());
        assert!(matches!(
            classify(&Method::PATCH, &"/v2/a/manifests/t".parse().unwrap()),
            Classified::Unsupported { .. }
        ));
        assert!(matches!(
            classify(&Method::GET, &"/v2/a/nothing/t".parse().unwrap()),
            Classified::NotFound
        ));
    }
}
