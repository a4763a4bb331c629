//! Garbage in: mutated manifests and names fed to the parsers, and random or mangled bytes
//! sent to a running server. Nothing may panic, the server keeps answering, and what it
//! answers is well-formed. `BERTH_FUZZ_ITERS` sets the number of mutations (CI: 20,000; the
//! long mode is millions).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use rand::seq::IndexedRandom;

use berth_storage::manifest::Manifest;
use berth_storage::{Digest, Reference, RepoName, Tag};

use crate::support::{Image, spawn_berth};

fn iterations() -> usize {
    std::env::var("BERTH_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

/// `seed` with a few random edits: flipped bytes, cut, duplicated or inserted runs.
fn mutate(seed: &[u8], rng: &mut impl Rng) -> Vec<u8> {
    let mut out = seed.to_vec();
    for _ in 0..rng.random_range(1..6) {
        if out.is_empty() {
            out.push(rng.random());
            continue;
        }
        let at = rng.random_range(0..out.len());
        match rng.random_range(0..5) {
            0 => out[at] = rng.random(),
            1 => out.truncate(at),
            2 => {
                let end = (at + rng.random_range(1..64)).min(out.len());
                let run = out[at..end].to_vec();
                out.splice(at..at, run);
            }
            3 => {
                let junk = [b'{', b'[', b'"', b'\\', b':', b',', 0, 0xff, b'9', b'e'];
                out.insert(at, *junk.choose(rng).unwrap_or(&b'x'));
            }
            _ => {
                out.remove(at);
            }
        }
    }
    out
}

#[test]
fn parsers_never_panic_on_mutated_manifests_and_names() {
    let image = Image::new(1, &[100, 200]);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": crate::support::DOCKER_MANIFEST, "digest": image.digest(),
                        "size": image.manifest.len(), "platform": {"os": "linux", "architecture": "amd64"}}],
        "subject": {"mediaType": crate::support::DOCKER_MANIFEST, "digest": image.digest(), "size": 1},
        "annotations": {"a": "b"}
    })
    .to_string();
    let seeds: [(&[u8], &str); 3] = [
        (image.manifest.as_bytes(), crate::support::DOCKER_MANIFEST),
        (index.as_bytes(), "application/vnd.oci.image.index.v1+json"),
        (
            b"{\"schemaVersion\":1,\"name\":\"a\",\"tag\":\"b\",\"fsLayers\":[]}",
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
        ),
    ];
    let names = [
        "library/alpine",
        "a/b-c_d.e/f",
        "v1.2.3-rc_1",
        "sha256:0000000000000000000000000000000000000000000000000000000000000000",
    ];
    let mut rng = rand::rng();
    let (mut accepted, mut refused) = (0u32, 0u32);
    for _ in 0..iterations() {
        let (seed, media_type) = seeds.choose(&mut rng).copied().unwrap_or(seeds[0]);
        let bytes = mutate(seed, &mut rng);
        let digest = Digest::sha256(&bytes);
        match Manifest::parse(Bytes::from(bytes), media_type, digest) {
            Ok(_) => accepted += 1,
            Err(_) => refused += 1,
        }
        let name = mutate(
            names.choose(&mut rng).unwrap_or(&names[0]).as_bytes(),
            &mut rng,
        );
        let name = String::from_utf8_lossy(&name);
        let _ = name.parse::<RepoName>();
        let _ = name.parse::<Tag>();
        let _ = name.parse::<Digest>();
        let _ = name.parse::<Reference>();
    }
    // Deep nesting is refused, not a stack overflow.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let d = Digest::sha256(deep.as_bytes());
    assert!(Manifest::parse(Bytes::from(deep), crate::support::DOCKER_MANIFEST, d).is_err());
    eprintln!("manifests: {accepted} accepted, {refused} refused");
    assert!(refused > 0);
}

#[test]
fn a_server_fed_garbage_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let p = spawn_berth(&dir.path().join("data"));
    let mut rng = rand::rng();
    let good = "GET /v2/a/b/manifests/latest HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";
    let shapes = [
        good.to_owned(),
        "PUT /v2/a/b/manifests/t HTTP/1.1\r\nHost: x\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n0\r\n\r\n".to_owned(),
        "PATCH /v2/a/b/blobs/uploads/../../x HTTP/1.1\r\nHost: x\r\nContent-Range: 9-1\r\nContent-Length: 99999999999999999999\r\n\r\n".to_owned(),
        "POST /v2/a/b/blobs/uploads/?digest=sha256:zz&mount=%00&from=%ff HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc".to_owned(),
        format!("GET /v2/{}/tags/list?n=-1&last=%zz HTTP/1.1\r\nHost: x\r\n\r\n", "a/".repeat(300)),
    ];
    let rounds = (iterations() / 100).max(50);
    let mut answered = 0;
    for _ in 0..rounds {
        let bytes: Vec<u8> = if rng.random_bool(0.3) {
            (0..rng.random_range(1..4096))
                .map(|_| rng.random())
                .collect()
        } else {
            mutate(
                shapes.choose(&mut rng).unwrap_or(&shapes[0]).as_bytes(),
                &mut rng,
            )
        };
        let Ok(mut s) = TcpStream::connect(p.addr) else {
            panic!("the server stopped accepting connections");
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        if !out.is_empty() {
            let head = String::from_utf8_lossy(&out[..out.len().min(12)]).into_owned();
            assert!(
                head.starts_with("HTTP/1.1 "),
                "a malformed answer: {head:?}"
            );
            answered += 1;
        }
    }
    // Still alive and well.
    let mut p = p;
    assert!(p.child.try_wait().unwrap().is_none(), "the server exited");
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let log = std::fs::read_to_string(dir.path().join("data.log")).unwrap_or_default();
    assert!(!log.contains("panicked"), "a handler panicked:\n{log}");
    eprintln!("garbage: {rounds} connections, {answered} answered, server alive");
}
