//! Garbage collection while clients push, mount, move tags and delete.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use berth_storage::GcPolicy;
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

use crate::images::noise;
use crate::support::{TestServer, digest};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Pushes an image the way docker does: HEAD each blob, upload the missing ones, PUT the
/// manifest; when the registry says a blob vanished (collected meanwhile), start over.
async fn push(c: &Client, root: &str, repo: &str, tag: &str, blobs: &[Vec<u8>]) -> String {
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(&blobs[0]), "size": blobs[0].len()},
        "layers": blobs[1..].iter().map(|b| json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(b), "size": b.len()})).collect::<Vec<_>>(),
    }))
    .unwrap();
    for _attempt in 0..5 {
        for b in blobs {
            let d = digest(b);
            let head = c
                .head(format!("{root}/v2/{repo}/blobs/{d}"))
                .send()
                .await
                .unwrap();
            if head.status() == StatusCode::OK {
                continue;
            }
            let r = c
                .post(format!("{root}/v2/{repo}/blobs/uploads/?digest={d}"))
                .body(b.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
        }
        let r = c
            .put(format!("{root}/v2/{repo}/manifests/{tag}"))
            .header("content-type", OCI_MANIFEST)
            .body(m.clone())
            .send()
            .await
            .unwrap();
        match r.status() {
            StatusCode::CREATED => return digest(&m),
            StatusCode::BAD_REQUEST => {
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["errors"][0]["code"], "MANIFEST_BLOB_UNKNOWN", "{v}");
            }
            other => panic!("manifest push answered {other}"),
        }
    }
    panic!("push of {repo}:{tag} kept losing blobs");
}

fn image_blobs(seed: u64) -> Vec<Vec<u8>> {
    vec![
        format!("{{\"seed\":{seed}}}").into_bytes(),
        noise(20_000, seed),
        noise(5_000, seed + 1_000_000),
    ]
}

async fn pull_everything(c: &Client, root: &str) -> usize {
    let cat: Value = c
        .get(format!("{root}/v2/_catalog?n=10000"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut images = 0;
    for repo in cat["repositories"].as_array().unwrap() {
        let repo = repo.as_str().unwrap();
        let tags: Value = c
            .get(format!("{root}/v2/{repo}/tags/list"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for tag in tags["tags"].as_array().unwrap() {
            let tag = tag.as_str().unwrap();
            let r = c
                .get(format!("{root}/v2/{repo}/manifests/{tag}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{repo}:{tag}");
            let m: Value = r.json().await.unwrap();
            let mut ds = vec![m["config"]["digest"].as_str().unwrap().to_owned()];
            ds.extend(
                m["layers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|l| l["digest"].as_str().unwrap().to_owned()),
            );
            for d in ds {
                let r = c
                    .get(format!("{root}/v2/{repo}/blobs/{d}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::OK, "{repo}:{tag} lost blob {d}");
                assert_eq!(
                    digest(&r.bytes().await.unwrap()),
                    d,
                    "{repo}:{tag} blob {d} corrupt"
                );
            }
            images += 1;
        }
    }
    images
}

fn object_path(root: &std::path::Path, d: &str) -> std::path::PathBuf {
    let hex = &d[7..];
    root.join("objects/blobs/sha256").join(&hex[..2]).join(hex)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_races_pushes_mounts_tag_moves_and_deletes_without_breaking_an_image() {
    let s = TestServer::start().await;
    let root = s.root();
    let c = crate::support::client();

    // Old content: kept images, and garbage (orphan blobs, deleted images).
    for i in 0..6 {
        push(&c, &root, &format!("old/{i}"), "v1", &image_blobs(i)).await;
    }
    let mut garbage: BTreeMap<String, String> = BTreeMap::new(); // digest -> repo
    for i in 0..10u64 {
        let b = noise(3_000, 500 + i);
        let d = digest(&b);
        let r = c
            .post(format!("{root}/v2/junk/blobs/uploads/?digest={d}"))
            .body(b)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        garbage.insert(d, "junk".into());
    }
    for i in 0..4u64 {
        let blobs = image_blobs(100 + i);
        let md = push(&c, &root, "deleted", &format!("t{i}"), &blobs).await;
        assert_eq!(
            c.delete(format!("{root}/v2/deleted/manifests/{md}"))
                .send()
                .await
                .unwrap()
                .status(),
            StatusCode::ACCEPTED
        );
        for b in &blobs {
            garbage.insert(digest(b), "deleted".into());
        }
    }
    // Make all of it two hours old.
    s.state
        .store
        .db()
        .write(|tx| {
            tx.execute_batch(
                "UPDATE blobs SET created_at = created_at - 7200, last_access = last_access - 7200;
                 UPDATE repo_blobs SET created_at = created_at - 7200;
                 UPDATE blob_review SET queued_at = queued_at - 7200;
                 UPDATE manifest_review SET queued_at = queued_at - 7200;",
            )?;
            Ok(())
        })
        .await
        .unwrap();

    // Clients work while GC runs over and over.
    let policy = GcPolicy::default();
    let done = Arc::new(AtomicBool::new(false));
    let gc = {
        let store = s.state.store.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut runs = 0;
            let mut removed = 0;
            while !done.load(Ordering::Relaxed) || runs < 3 {
                removed += store.gc(&policy, false).await.expect("gc").blobs;
                runs += 1;
                tokio::task::yield_now().await;
            }
            (runs, removed)
        })
    };
    let reused: Vec<Vec<u8>> = (100..102u64).flat_map(image_blobs).collect();
    let mut writers = Vec::new();
    for w in 0..3u64 {
        let (c, root, reused) = (c.clone(), root.clone(), reused.clone());
        writers.push(tokio::spawn(async move {
            let mut kept = BTreeSet::new();
            for round in 0..8u64 {
                let repo = format!("new/{w}");
                // A fresh image, sometimes built on blobs that are old garbage.
                let mut blobs = image_blobs(10_000 + w * 100 + round);
                if round % 2 == 0 {
                    blobs.push(reused[((w + round) % reused.len() as u64) as usize].clone());
                }
                let md = push(&c, &root, &repo, &format!("r{round}"), &blobs).await;
                // Move a tag.
                push(&c, &root, &repo, "moving", &blobs).await;
                // Mount an old kept image's layer into a new repository and use it.
                let old = image_blobs(round % 6);
                let d = digest(&old[1]);
                let _ = c
                    .post(format!(
                        "{root}/v2/mounted/{w}/blobs/uploads/?mount={d}&from=old/{}",
                        round % 6
                    ))
                    .send()
                    .await
                    .unwrap();
                push(
                    &c,
                    &root,
                    &format!("mounted/{w}"),
                    &format!("r{round}"),
                    &old,
                )
                .await;
                // Delete every other image again.
                if round % 2 == 1 {
                    let r = c
                        .delete(format!("{root}/v2/{repo}/manifests/{md}"))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), StatusCode::ACCEPTED);
                } else {
                    kept.insert(md);
                }
            }
            kept
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let (runs, removed) = gc.await.unwrap();
    assert!(
        runs >= 3 && removed > 0,
        "gc ran {runs} times and removed {removed} blobs"
    );

    // Every tagged image pulls completely, before and after one more collection.
    let images = pull_everything(&c, &root).await;
    assert!(images >= 6 + 3 * 5, "only {images} images left");
    s.state.store.gc(&GcPolicy::default(), false).await.unwrap();
    assert_eq!(pull_everything(&c, &root).await, images);

    // Old garbage nobody pushed again is gone, from the metadata and from disk.
    let reused: BTreeSet<String> = reused.iter().map(|b| digest(b)).collect();
    let mut checked = 0;
    for (d, repo) in &garbage {
        if reused.contains(d) {
            continue;
        }
        let r = c
            .head(format!("{root}/v2/{repo}/blobs/{d}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::NOT_FOUND,
            "garbage {d} still served"
        );
        assert!(
            !object_path(s.dir.path(), d).exists(),
            "garbage {d} still on disk"
        );
        checked += 1;
    }
    assert!(checked >= 10, "{checked}");
}

#[tokio::test]
async fn gc_cli_dry_run_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let p = crate::support::spawn_berth(&data);
        let c = crate::support::client();
        let b = b"an orphan".to_vec();
        let d = digest(&b);
        let r = c
            .post(format!("{}/v2/x/blobs/uploads/?digest={d}", p.root()))
            .body(b)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        p.sigkill();
    }
    let db = rusqlite::Connection::open(data.join("berth.db")).unwrap();
    db.execute_batch("UPDATE blob_review SET queued_at = queued_at - 7200; UPDATE blobs SET created_at = created_at - 7200, last_access = last_access - 7200; UPDATE repo_blobs SET created_at = created_at - 7200;").unwrap();
    let run = |dry: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_berth"));
        cmd.args(["gc", "--data"]).arg(&data);
        if dry {
            cmd.arg("--dry-run");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let count = || {
        db.query_row("SELECT count(*) FROM blobs", [], |r| r.get::<_, i64>(0))
            .unwrap()
    };
    let out = run(true);
    assert!(out.starts_with("would remove: 1 blobs (9 bytes)"), "{out}");
    assert_eq!(count(), 1);
    let out = run(false);
    assert!(
        out.starts_with("removed: 1 blobs (9 bytes)") && out.contains("1 objects deleted"),
        "{out}"
    );
    assert_eq!(count(), 0);
}
