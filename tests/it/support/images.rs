//! Test images built offline and deterministically: [`Image`], a small image pushed over the
//! API, and [`Layout`], real tar+gzip layers with matching
//! `diff_ids`, written as an OCI image layout that skopeo, podman and friends can read.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::servers::digest;

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Incompressible bytes from a seed (xorshift).
pub(crate) fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// An OCI image layout on disk.
pub(crate) struct Layout {
    pub dir: PathBuf,
    refs: Vec<Value>,
}

impl Layout {
    pub(crate) fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let l = Self {
            dir: dir.to_owned(),
            refs: Vec::new(),
        };
        l.write_index();
        l
    }

    /// `oci:<dir>:<tag>` for skopeo.
    pub(crate) fn reference(&self, tag: &str) -> String {
        format!("oci:{}:{tag}", self.dir.display())
    }

    /// Stores a blob; returns its descriptor.
    pub(crate) fn blob(&self, media_type: &str, data: &[u8]) -> Value {
        let d = digest(data);
        std::fs::write(self.dir.join("blobs/sha256").join(&d[7..]), data).unwrap();
        json!({ "mediaType": media_type, "digest": d, "size": data.len() })
    }

    /// An image for `arch` with one layer per entry of `layer_sizes` (each a tar holding one
    /// file of random bytes); returns the manifest descriptor with its platform.
    pub(crate) fn image(&self, arch: &str, layer_sizes: &[usize], seed: u64) -> Value {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for (i, size) in layer_sizes.iter().enumerate() {
            let tar = tarball(
                &format!("data/{arch}-{seed}-{i}.bin"),
                &noise(*size, seed * 100 + i as u64),
            );
            diff_ids.push(digest(&tar));
            layers.push(self.blob(LAYER_GZIP, &gzip(&tar)));
        }
        let config = json!({
            "architecture": arch,
            "os": "linux",
            "config": { "Cmd": ["/bin/true"], "Labels": { "seed": seed.to_string() } },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": layer_sizes.iter().map(|_| json!({"created_by": "berth test"})).collect::<Vec<_>>(),
        });
        let c = self.blob(
            "application/vnd.oci.image.config.v1+json",
            &serde_json::to_vec(&config).unwrap(),
        );
        let m =
            json!({ "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": c, "layers": layers });
        let mut d = self.blob(OCI_MANIFEST, &serde_json::to_vec(&m).unwrap());
        d["platform"] = json!({ "architecture": arch, "os": "linux" });
        d
    }

    /// A single-layer image whose layer holds `size` random bytes, streamed to disk (the
    /// layer is gzip with stored blocks: valid, and quick to make at 1 GiB).
    pub(crate) fn big_image(&self, arch: &str, size: u64, seed: u64) -> Value {
        use sha2::Digest as _;
        let tmp = self.dir.join("big-layer.tmp");
        let file = HashingWriter::new(std::fs::File::create(&tmp).unwrap());
        let gz = flate2::write::GzEncoder::new(file, flate2::Compression::none());
        let mut tar = tar::Builder::new(HashingWriter::new(gz));
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(
            &mut h,
            "data/big.bin",
            NoiseReader {
                left: size,
                x: seed | 1,
            },
        )
        .unwrap();
        let diff = tar.into_inner().unwrap();
        let diff_id = format!("sha256:{}", hex::encode(diff.hash.finalize()));
        let file = diff.inner.finish().unwrap();
        let (len, compressed) = (
            file.len,
            format!("sha256:{}", hex::encode(file.hash.finalize())),
        );
        std::fs::rename(&tmp, self.dir.join("blobs/sha256").join(&compressed[7..])).unwrap();
        let layer = json!({ "mediaType": LAYER_GZIP, "digest": compressed, "size": len });
        let config = json!({
            "architecture": arch, "os": "linux", "config": {},
            "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        });
        let c = self.blob(
            "application/vnd.oci.image.config.v1+json",
            &serde_json::to_vec(&config).unwrap(),
        );
        let m = json!({ "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": c, "layers": [layer] });
        self.blob(OCI_MANIFEST, &serde_json::to_vec(&m).unwrap())
    }

    /// An index over `children`.
    pub(crate) fn index(&self, children: &[Value]) -> Value {
        let m = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children });
        self.blob(OCI_INDEX, &serde_json::to_vec(&m).unwrap())
    }

    /// Names `desc` as `tag` in index.json.
    pub(crate) fn tag(&mut self, tag: &str, desc: &Value) {
        let mut d = desc.clone();
        if d["mediaType"] == OCI_MANIFEST {
            d.as_object_mut().unwrap().remove("platform");
        }
        d["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
        self.refs.push(d);
        self.write_index();
    }

    fn write_index(&self) {
        let idx = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.refs });
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&idx).unwrap(),
        )
        .unwrap();
    }

    /// The digest tagged `tag` in a layout on disk (for layouts written by clients).
    pub(crate) fn tagged_digest(dir: &Path, tag: &str) -> Option<String> {
        let v: Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).ok()?).ok()?;
        v["manifests"]
            .as_array()?
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .or_else(|| v["manifests"].as_array()?.first())
            .and_then(|m| m["digest"].as_str().map(str::to_owned))
    }
}

fn tarball(name: &str, data: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    b.append_data(&mut h, name, data).unwrap();
    b.into_inner().unwrap()
}

pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Counts and hashes what passes through to `inner`.
struct HashingWriter<W> {
    inner: W,
    hash: sha2::Sha256,
    len: u64,
}

impl<W> HashingWriter<W> {
    fn new(inner: W) -> Self {
        use sha2::Digest as _;
        Self {
            inner,
            hash: sha2::Sha256::new(),
            len: 0,
        }
    }
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use sha2::Digest as _;
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// `left` bytes of xorshift noise, produced as they are read.
struct NoiseReader {
    left: u64,
    x: u64,
}

impl std::io::Read for NoiseReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        for chunk in buf[..n].chunks_mut(8) {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            chunk.copy_from_slice(&self.x.to_le_bytes()[..chunk.len()]);
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Docker schema 2 manifest media type.
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// An image: its manifest bytes, their media type, and its blobs (config first).
pub(crate) struct Image {
    pub manifest: String,
    pub media_type: &'static str,
    pub blobs: Vec<Vec<u8>>,
}

impl Image {
    pub(crate) fn new(seed: u64, layers: &[usize]) -> Self {
        let config =
            format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"seed\":{seed}}}").into_bytes();
        let layers: Vec<Vec<u8>> = layers
            .iter()
            .enumerate()
            .map(|(i, n)| noise(*n, seed.wrapping_mul(100).wrapping_add(i as u64)))
            .collect();
        let desc =
            |mt: &str, b: &[u8]| json!({"mediaType": mt, "digest": digest(b), "size": b.len()});
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": desc("application/vnd.docker.container.image.v1+json", &config),
            "layers": layers.iter().map(|l| desc("application/vnd.docker.image.rootfs.diff.tar.gzip", l)).collect::<Vec<_>>(),
        })
        .to_string();
        let mut blobs = vec![config];
        blobs.extend(layers);
        Self {
            manifest,
            media_type: DOCKER_MANIFEST,
            blobs,
        }
    }

    /// An OCI image manifest over `blobs`: the first is the config, the rest are layers.
    pub(crate) fn oci(blobs: Vec<Vec<u8>>) -> Self {
        let manifest = json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(&blobs[0]), "size": blobs[0].len()},
            "layers": blobs[1..].iter().map(|b| json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(b), "size": b.len()})).collect::<Vec<_>>(),
        })
        .to_string();
        Self {
            manifest,
            media_type: OCI_MANIFEST,
            blobs,
        }
    }

    /// An image of any manifest (`media_type`) over `blobs`: artifacts, referrers.
    pub(crate) fn with_manifest(
        manifest: String,
        media_type: &'static str,
        blobs: Vec<Vec<u8>>,
    ) -> Self {
        Self {
            manifest,
            media_type,
            blobs,
        }
    }

    pub(crate) fn digest(&self) -> String {
        digest(self.manifest.as_bytes())
    }

    /// An image made of this one's config and layers plus one layer of its own: built on it, as
    /// a `FROM` line does.
    pub(crate) fn on_top(&self, seed: u64, layer: usize) -> Self {
        let extra = noise(layer, seed.wrapping_mul(7919));
        let config =
            format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"seed\":{seed}}}").into_bytes();
        let desc =
            |mt: &str, b: &[u8]| json!({"mediaType": mt, "digest": digest(b), "size": b.len()});
        let mut layers: Vec<Vec<u8>> = self.blobs[1..].to_vec();
        layers.push(extra);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": desc("application/vnd.docker.container.image.v1+json", &config),
            "layers": layers.iter().map(|l| desc("application/vnd.docker.image.rootfs.diff.tar.gzip", l)).collect::<Vec<_>>(),
        })
        .to_string();
        let mut blobs = vec![config];
        blobs.extend(layers);
        Self {
            manifest,
            media_type: DOCKER_MANIFEST,
            blobs,
        }
    }
}
