//! Manifest validation and reference extraction.
//!
//! Bytes are the truth: the registry stores and serves exactly what was pushed and hashes those
//! bytes. The structs here only read what the registry needs from a manifest (its kind, the
//! descriptors it names, its `subject`, `artifactType` and annotations); unknown fields are
//! ignored, never dropped from the stored bytes.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::names::Digest;

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_SCHEMA1: [&str; 2] = [
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];

/// Whether a manifest lists blobs (an image) or other manifests (an index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// OCI image manifest or Docker schema 2 manifest.
    Image,
    /// OCI image index or Docker manifest list.
    Index,
}

fn kind_of(media_type: &str) -> Option<Kind> {
    match media_type {
        OCI_MANIFEST | DOCKER_MANIFEST => Some(Kind::Image),
        OCI_INDEX | DOCKER_LIST => Some(Kind::Index),
        _ => None,
    }
}

/// A descriptor as read from a manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: String,
    digest: String,
    size: i64,
    #[serde(default)]
    urls: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<i64>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
    manifests: Option<Vec<RawDescriptor>>,
    subject: Option<RawDescriptor>,
    annotations: Option<BTreeMap<String, String>>,
}

/// What a manifest references, for existence checks and for garbage collection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The referenced digest.
    pub digest: Digest,
    /// A blob (config or layer) or a child manifest.
    pub kind: RefKind,
    /// Whether the registry must hold it: false for non-distributable layers and those with `urls`.
    pub required: bool,
}

/// Kinds of reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefKind {
    /// A config or layer blob.
    Blob,
    /// A child manifest of an index.
    Manifest,
}

impl RefKind {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Blob => "blob",
            Self::Manifest => "manifest",
        }
    }
}

/// A validated manifest: the exact bytes plus what the registry reads from them.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The bytes as pushed.
    pub bytes: bytes::Bytes,
    /// The digest of `bytes` (sha256 unless pushed by another algorithm's digest).
    pub digest: Digest,
    /// The media type it is served with.
    pub media_type: String,
    /// Image or index.
    pub kind: Kind,
    /// Descriptors it names.
    pub references: Vec<Reference>,
    /// The `subject` digest, if any.
    pub subject: Option<Digest>,
    /// The artifact type reported in referrers lists.
    pub artifact_type: Option<String>,
    /// Top-level annotations, serialised as JSON, for referrers lists.
    pub annotations: Option<String>,
}

fn is_generic(content_type: &str) -> bool {
    matches!(
        content_type,
        "" | "application/json" | "application/octet-stream" | "text/plain"
    )
}

fn descriptor(d: &RawDescriptor, what: &str) -> Result<Digest> {
    if d.size < 0 {
        return Err(Error::ManifestInvalid(format!("{what}: negative size")));
    }
    if d.media_type.is_empty() {
        return Err(Error::ManifestInvalid(format!("{what}: empty mediaType")));
    }
    d.digest
        .parse()
        .map_err(|_| Error::ManifestInvalid(format!("{what}: invalid digest {:?}", d.digest)))
}

fn optional_blob(d: &RawDescriptor) -> bool {
    d.media_type.contains("nondistributable")
        || d.media_type.contains(".foreign.")
        || d.urls.as_ref().is_some_and(|u| !u.is_empty())
}

impl Manifest {
    /// Parses and validates manifest bytes sent with `content_type`; `digest` is their digest.
    pub fn parse(bytes: bytes::Bytes, content_type: &str, digest: Digest) -> Result<Self> {
        let content_type = content_type.split(';').next().unwrap_or("").trim();
        if DOCKER_SCHEMA1.contains(&content_type) {
            return Err(Error::ManifestInvalid(
                "Docker schema 1 manifests are not supported".into(),
            ));
        }
        let raw: RawManifest = serde_json::from_slice(&bytes)
            .map_err(|e| Error::ManifestInvalid(format!("not a manifest: {e}")))?;
        if raw.schema_version != Some(2) {
            return Err(Error::ManifestInvalid("schemaVersion must be 2".into()));
        }
        let media_type = match (&raw.media_type, is_generic(content_type)) {
            (Some(body), false) if body != content_type => {
                return Err(Error::ManifestInvalid(format!(
                    "mediaType {body:?} does not match Content-Type {content_type:?}"
                )));
            }
            (Some(body), true) => body.clone(),
            (None, true) if raw.manifests.is_some() => OCI_INDEX.to_owned(),
            (None, true) => OCI_MANIFEST.to_owned(),
            (_, false) => content_type.to_owned(),
        };
        let kind = kind_of(&media_type).ok_or_else(|| {
            Error::ManifestInvalid(format!("unsupported manifest media type {media_type:?}"))
        })?;
        let mut references = Vec::new();
        let mut artifact_type = raw.artifact_type.clone().filter(|t| !t.is_empty());
        match kind {
            Kind::Image => {
                let config = raw.config.as_ref().ok_or_else(|| {
                    Error::ManifestInvalid("image manifest without config".into())
                })?;
                references.push(Reference {
                    digest: descriptor(config, "config")?,
                    kind: RefKind::Blob,
                    required: true,
                });
                let layers = raw.layers.as_ref().ok_or_else(|| {
                    Error::ManifestInvalid("image manifest without layers".into())
                })?;
                for (i, l) in layers.iter().enumerate() {
                    references.push(Reference {
                        digest: descriptor(l, &format!("layers[{i}]"))?,
                        kind: RefKind::Blob,
                        required: !optional_blob(l),
                    });
                }
                if artifact_type.is_none() {
                    artifact_type = Some(config.media_type.clone());
                }
            }
            Kind::Index => {
                let manifests = raw
                    .manifests
                    .as_ref()
                    .ok_or_else(|| Error::ManifestInvalid("index without manifests".into()))?;
                for (i, m) in manifests.iter().enumerate() {
                    references.push(Reference {
                        digest: descriptor(m, &format!("manifests[{i}]"))?,
                        kind: RefKind::Manifest,
                        required: true,
                    });
                }
            }
        }
        let subject = raw
            .subject
            .as_ref()
            .map(|s| descriptor(s, "subject"))
            .transpose()?;
        let annotations = match &raw.annotations {
            Some(a) if !a.is_empty() => {
                Some(serde_json::to_string(a).map_err(|e| Error::ManifestInvalid(e.to_string()))?)
            }
            _ => None,
        };
        Ok(Self {
            bytes,
            digest,
            media_type,
            kind,
            references,
            subject,
            artifact_type,
            annotations,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str, ct: &str) -> Result<Manifest> {
        let b = bytes::Bytes::from(body.to_owned());
        let d = Digest::sha256(&b);
        Manifest::parse(b, ct, d)
    }

    const CFG: &str = r#"{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2}"#;

    #[test]
    fn image_without_media_type_takes_content_type() {
        let m = parse(
            &format!(r#"{{"schemaVersion":2,"config":{CFG},"layers":[]}}"#),
            OCI_MANIFEST,
        )
        .unwrap();
        assert_eq!(m.kind, Kind::Image);
        assert_eq!(m.references.len(), 1);
        assert_eq!(
            m.artifact_type.as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
    }

    #[test]
    fn media_type_mismatch_is_invalid() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{CFG},"layers":[]}}"#
        );
        assert!(matches!(
            parse(&body, DOCKER_MANIFEST),
            Err(Error::ManifestInvalid(_))
        ));
        assert!(parse(&body, &format!("{OCI_MANIFEST}; charset=utf-8")).is_ok());
        assert!(parse(&body, "application/json").is_ok());
    }

    #[test]
    fn index_children_and_subject() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{CFG}],"subject":{CFG},"annotations":{{"a":"b"}}}}"#
        );
        let m = parse(&body, OCI_INDEX).unwrap();
        assert_eq!(m.kind, Kind::Index);
        assert_eq!(m.references[0].kind, RefKind::Manifest);
        assert!(m.subject.is_some());
        assert_eq!(m.artifact_type, None);
        assert_eq!(m.annotations.as_deref(), Some(r#"{"a":"b"}"#));
    }

    #[test]
    fn rejects_garbage() {
        for (body, ct) in [
            ("not json", OCI_MANIFEST),
            (r#"{"schemaVersion":1}"#, OCI_MANIFEST),
            (r#"{"schemaVersion":2,"layers":[]}"#, OCI_MANIFEST),
            (r#"{"schemaVersion":2}"#, OCI_INDEX),
            (
                r#"{"schemaVersion":2,"manifests":[{"mediaType":"x","digest":"sha256:zz","size":1}]}"#,
                OCI_INDEX,
            ),
            (
                r#"{"schemaVersion":2,"manifests":[]}"#,
                "application/vnd.docker.distribution.manifest.v1+json",
            ),
            (
                r#"{"schemaVersion":2,"manifests":[]}"#,
                "application/x-unknown",
            ),
        ] {
            assert!(
                matches!(parse(body, ct), Err(Error::ManifestInvalid(_))),
                "{body} {ct}"
            );
        }
    }

    #[test]
    fn non_distributable_layers_are_optional() {
        let body = format!(
            r#"{{"schemaVersion":2,"config":{CFG},"layers":[{{"mediaType":"application/vnd.oci.image.layer.nondistributable.v1.tar","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2}}]}}"#
        );
        let m = parse(&body, OCI_MANIFEST).unwrap();
        assert!(!m.references[1].required);
    }
}
