//! Garbage collection while clients push, mount, move tags and delete.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use berth_storage::{GcPolicy, StorageConfig, Store};
use reqwest::{Client, StatusCode};
use serde_json::Value;

use crate::support::{DOCKER, Image, Push, noise};
use crate::support::{TestServer, digest};

/// Pushes an OCI image of `blobs` (config first) as `how` says. A registry that loses a blob
/// it acknowledged fails the push, and the test with it.
async fn push_as(root: &str, repo: &str, tag: &str, blobs: &[Vec<u8>], how: Push<'_>) -> String {
    Image::oci(blobs.to_vec())
        .try_push(root, repo, tag, how)
        .await
        .unwrap_or_else(|e| {
            panic!("push of {repo}:{tag} failed after the registry acknowledged its blobs: {e}")
        })
}

/// Pushes as docker does: HEAD, upload what is missing, the manifest.
async fn push(root: &str, repo: &str, tag: &str, blobs: &[Vec<u8>]) -> String {
    push_as(root, repo, tag, blobs, DOCKER).await
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

/// Digests of the blob objects on disk under a data directory.
fn blobs_on_disk(data: &std::path::Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let root = data.join("objects/blobs/sha256");
    for dir in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            out.insert(format!("sha256:{}", f.file_name().to_string_lossy()));
        }
    }
    out
}

/// How long the writers of the GC stress test push: `BERTH_GC_STRESS_SECS`, 20 s by default
/// (CI); run it for 600 s before a release.
fn stress_time() -> Duration {
    let secs = std::env::var("BERTH_GC_STRESS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    Duration::from_secs(secs)
}

/// The grace period of the stress test: short, so that re-pushes land near its end.
const GRACE: Duration = Duration::from_secs(3);

/// Counts of what the stress test did.
#[derive(Default)]
struct Tally {
    pushes: AtomicU64,
    late_repushes: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_races_pushes_mounts_tag_moves_and_deletes_without_breaking_an_image() {
    let s = TestServer::start().await;
    let root = s.root();
    let c = crate::support::client();

    // Old content: kept images, and garbage (orphan blobs, deleted images).
    for i in 0..6 {
        push(&root, &format!("old/{i}"), "v1", &image_blobs(i)).await;
    }
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
    }
    for i in 0..4u64 {
        let blobs = image_blobs(100 + i);
        let md = push(&root, "deleted", &format!("t{i}"), &blobs).await;
        assert_eq!(
            c.delete(format!("{root}/v2/deleted/manifests/{md}"))
                .send()
                .await
                .unwrap()
                .status(),
            StatusCode::ACCEPTED
        );
    }
    // Make all of it two hours old.
    s.state.store().meta().age_for_tests(7200).await.unwrap();

    // Two collectors take turns, over and over: the server's store, and a second one on the
    // same data, as `berth gc` or another replica would be.
    let policy = GcPolicy {
        grace: GRACE,
        ..GcPolicy::default()
    };
    let other = Arc::new(
        Store::open(&StorageConfig::local(s.dir.path()))
            .await
            .unwrap(),
    );
    let done = Arc::new(AtomicBool::new(false));
    let collectors: Vec<_> = [s.state.store().clone(), other.clone()]
        .into_iter()
        .map(|store| {
            let (done, policy) = (done.clone(), policy.clone());
            tokio::spawn(async move {
                let (mut runs, mut freed) = (0u64, 0u64);
                while !done.load(Ordering::Relaxed) || runs < 3 {
                    match store.gc(&policy, false).await {
                        Ok(r) => {
                            runs += 1;
                            freed += r.blobs;
                        }
                        Err(berth_storage::Error::Busy { .. }) => {}
                        Err(e) => panic!("gc: {e}"),
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (runs, freed)
            })
        })
        .collect();

    let tally = Arc::new(Tally::default());
    let reused: Vec<Vec<u8>> = (100..102u64).flat_map(image_blobs).collect();
    let deadline = Instant::now() + stress_time();
    let mut writers = Vec::new();
    for w in 0..3u64 {
        let (c, root, reused, tally) = (c.clone(), root.clone(), reused.clone(), tally.clone());
        writers.push(tokio::spawn(async move {
            let repo = format!("new/{w}");
            // Deleted images whose bytes come back around the end of their grace period: when
            // each is pushed again (spread across the moment its blobs become collectable), and
            // how.
            let mut deleted: VecDeque<(Instant, Duration, Push<'static>, Vec<Vec<u8>>)> =
                VecDeque::new();
            let mut round = 0u64;
            while Instant::now() < deadline || !deleted.is_empty() {
                // A fresh image, sometimes built on blobs that are old garbage.
                let mut blobs = image_blobs(10_000 + w * 100_000 + round);
                if round % 2 == 0 {
                    blobs.push(reused[((w + round) % reused.len() as u64) as usize].clone());
                }
                let md = push(&root, &repo, &format!("r{round}"), &blobs).await;
                // Move a tag.
                push(&root, &repo, "moving", &blobs).await;
                // Mount an old kept image's layer into a new repository and use it.
                let old = image_blobs(round % 6);
                let d = digest(&old[1]);
                let r = c
                    .post(format!(
                        "{root}/v2/mounted/{w}/blobs/uploads/?mount={d}&from=old/{}",
                        round % 6
                    ))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::CREATED, "mount of {d}");
                push(&root, &format!("mounted/{w}"), &format!("r{round}"), &old).await;
                tally.pushes.fetch_add(3, Ordering::Relaxed);
                // Delete every other image again.
                if round % 2 == 1 && Instant::now() < deadline {
                    let r = c
                        .delete(format!("{root}/v2/{repo}/manifests/{md}"))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), StatusCode::ACCEPTED);
                    // Collectable between GRACE and GRACE + 1 s after the delete (timestamps
                    // are in seconds): come back anywhere from just before to just after.
                    let offset = GRACE - Duration::from_millis(400)
                        + Duration::from_millis((round * 7919 + w * 104_729) % 1_800);
                    let style = Push {
                        head_first: round % 4 == 1,
                        monolithic: true,
                        pause: Duration::from_millis(300),
                        ..Push::default()
                    };
                    deleted.push_back((Instant::now(), offset, style, blobs));
                }
                // The same repository still links those blobs: they are pushed again there.
                while let Some(i) = deleted
                    .iter()
                    .position(|(at, off, ..)| at.elapsed() >= *off)
                {
                    let (_, _, style, blobs) = deleted.remove(i).unwrap();
                    push_as(&root, &repo, &format!("back{round}"), &blobs, style).await;
                    tally.late_repushes.fetch_add(1, Ordering::Relaxed);
                }
                if Instant::now() >= deadline
                    && let Some(wait) = deleted
                        .iter()
                        .map(|(at, off, ..)| off.saturating_sub(at.elapsed()))
                        .min()
                {
                    tokio::time::sleep(wait).await;
                }
                round += 1;
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let mut runs = 0;
    let mut freed = 0;
    for g in collectors {
        let (r, f) = g.await.unwrap();
        runs += r;
        freed += f;
    }
    let pushes = tally.pushes.load(Ordering::Relaxed);
    let late = tally.late_repushes.load(Ordering::Relaxed);
    eprintln!(
        "gc stress: {pushes} pushes ({late} re-pushes around the end of grace), 0 failed; {runs} collections freed {freed} blobs"
    );
    assert!(
        runs >= 6 && freed > 0,
        "gc ran {runs} times and freed {freed} blobs"
    );
    assert!(late >= 3, "only {late} late re-pushes");

    // Every tagged image pulls completely, before and after one more collection.
    let images = pull_everything(&c, &root).await;
    assert!(images >= 6 + 3 * 5, "only {images} images left");
    tokio::time::sleep(GRACE + Duration::from_millis(1100)).await;
    s.state.store().gc(&policy, false).await.unwrap();
    assert_eq!(pull_everything(&c, &root).await, images);

    // What is left on disk is exactly what manifests reference: every unreferenced blob freed.
    let referenced: BTreeSet<String> = s.state.store().meta().referenced_blobs().await.unwrap();
    let on_disk = blobs_on_disk(s.dir.path());
    let lost: Vec<_> = referenced.difference(&on_disk).collect();
    let kept: Vec<_> = on_disk.difference(&referenced).collect();
    assert!(
        lost.is_empty(),
        "referenced blobs missing from disk: {lost:?}"
    );
    assert!(kept.is_empty(), "unreferenced blobs not freed: {kept:?}");
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

/// Issue 14, as an operator met it: docker HEADs the layers of an image whose earlier copy was
/// deleted (200: still linked), skips them, and `berth gc` runs from the command line before the
/// manifest arrives. The read was the server's; the collection another process's.
#[tokio::test]
async fn blobs_headed_on_a_live_server_survive_berth_gc_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = crate::support::spawn_berth_with(&data, Some("[gc]\ninterval = \"0s\"\n"));
    let c = crate::support::client();
    let root = server.root();
    let blobs = image_blobs(77);
    let md = push(&root, "x/app", "v1", &blobs).await;
    let r = c
        .delete(format!("{root}/v2/x/app/manifests/{md}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // Two hours pass (the rows are aged rather than waited for).
    let db = rusqlite::Connection::open(data.join("berth.db")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    db.execute_batch(
        "UPDATE blob_review SET queued_at = queued_at - 7200;
         UPDATE blobs SET created_at = created_at - 7200, last_access = last_access - 7200;
         UPDATE repo_blobs SET created_at = created_at - 7200;",
    )
    .unwrap();
    for b in &blobs {
        let r = c
            .head(format!("{root}/v2/x/app/blobs/{}", digest(b)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["gc", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.starts_with("removed: 0 blobs"), "{report}");
    // The push goes on: the manifest names blobs the registry said it had.
    push(&root, "x/app", "v2", &blobs).await;
    // The server's metrics show the command line's run.
    let metrics = c
        .get(format!("{root}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("berth_gc_last_run_timestamp_seconds"),
        "the CLI run is not in the server's metrics"
    );
}
