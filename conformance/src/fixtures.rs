//! Deterministic test content: seeded random blobs, configs, manifests, indexes and artifacts.

use bytes::Bytes;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// An `Accept` value naming every manifest type, as docker and containerd send.
pub const ACCEPT_ALL: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, */*";
/// OCI empty descriptor media type (`{}`).
pub const EMPTY_TYPE: &str = "application/vnd.oci.empty.v1+json";

/// `sha256:<hex>` of `data`.
pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A piece of content and its digest.
#[derive(Debug, Clone)]
pub struct Blob {
    /// Bytes.
    pub data: Bytes,
    /// `sha256:…`.
    pub digest: String,
}

impl Blob {
    /// Wraps bytes.
    pub fn new(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        let digest = digest(&data);
        Self { data, digest }
    }

    /// Its descriptor with `media_type`.
    pub fn descriptor(&self, media_type: &str) -> Value {
        json!({ "mediaType": media_type, "digest": self.digest, "size": self.data.len() })
    }
}

/// Seeded generator.
pub struct Gen {
    rng: StdRng,
}

impl Gen {
    /// A generator whose output depends only on `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// `n` random (incompressible) bytes.
    pub fn bytes(&mut self, n: usize) -> Blob {
        let mut v = vec![0u8; n];
        self.rng.fill(&mut v[..]);
        Blob::new(v)
    }

    /// A unique image config.
    pub fn config(&mut self) -> Blob {
        let salt: u64 = self.rng.random();
        Blob::new(
            json!({
                "architecture": "amd64",
                "os": "linux",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": []},
                "author": format!("berth-conformance-{salt:016x}"),
            })
            .to_string(),
        )
    }

    /// A random suffix for names.
    pub fn token(&mut self) -> String {
        format!("{:012x}", self.rng.random::<u64>() & 0xffff_ffff_ffff)
    }
}

/// An image manifest (bytes) over `config` and `layers`.
pub fn image_manifest(
    media_type: &str,
    config: (&Blob, &str),
    layers: &[(&Blob, &str)],
    extra: Value,
) -> Blob {
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config.0.descriptor(config.1),
        "layers": layers.iter().map(|(b, t)| b.descriptor(t)).collect::<Vec<_>>(),
    });
    merge(&mut m, extra);
    Blob::new(serde_json::to_vec(&m).unwrap_or_default())
}

/// An index (bytes) over `children` (bytes, media type, platform).
pub fn index(media_type: &str, children: &[(&Blob, &str, Value)], extra: Value) -> Blob {
    let manifests: Vec<Value> = children
        .iter()
        .map(|(b, t, p)| {
            let mut d = b.descriptor(t);
            if !p.is_null() {
                d["platform"] = p.clone();
            }
            d
        })
        .collect();
    let mut m = json!({ "schemaVersion": 2, "mediaType": media_type, "manifests": manifests });
    merge(&mut m, extra);
    Blob::new(serde_json::to_vec(&m).unwrap_or_default())
}

fn merge(into: &mut Value, extra: Value) {
    if let (Some(o), Value::Object(e)) = (into.as_object_mut(), extra) {
        for (k, v) in e {
            if v.is_null() {
                o.remove(&k);
            } else {
                o.insert(k, v);
            }
        }
    }
}
