//! Crash loop: `berth serve` is killed with SIGKILL at random moments while eight writers push
//! (monolithic, POST+PUT, chunked, by cross-repository mount), move tags and delete, and
//! collections run every second; each time it restarts on the same data. Afterwards every
//! acknowledged push pulls whole, every tag is in a state some acknowledged or unanswered
//! request could have left it in, and `berth fsck --verify-digests` is clean. On local disk and
//! on S3 (moto).
//!
//! `BERTH_CRASH_CYCLES` sets the number of kills (CI: 50; the long mode is 500 or more).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use reqwest::StatusCode;

use crate::support::{Image, Proc, Push, digest, free_port, spawn_berth_at};

const WRITERS: usize = 8;
const GC: &str = "[gc]\ninterval = \"1s\"\ngrace = \"1m\"\n";

fn cycles() -> usize {
    std::env::var("BERTH_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

/// What a tag may hold: the digest of the last acknowledged push and of every unanswered one
/// since, and whether it may be absent (never surely pushed, or a delete since).
struct TagState {
    digests: BTreeSet<String>,
    absent: bool,
}

impl Default for TagState {
    fn default() -> Self {
        Self {
            digests: BTreeSet::new(),
            absent: true,
        }
    }
}

struct Ledger {
    tags: HashMap<(String, String), TagState>,
    images: HashMap<String, Image>,
    acknowledged: u64,
}

fn client() -> reqwest::Client {
    let _ = crate::support::client(); // installs the TLS provider
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

/// A chunked upload (POST, two PATCHes, PUT) of `blob` into `repo`.
async fn chunked(c: &reqwest::Client, root: &str, repo: &str, blob: &[u8]) -> Result<(), String> {
    let e = |e: reqwest::Error| e.to_string();
    let r = c
        .post(format!("{root}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .map_err(e)?;
    if r.status() != StatusCode::ACCEPTED {
        return Err(format!("POST {}", r.status()));
    }
    let mut loc = r.headers()["location"]
        .to_str()
        .unwrap_or_default()
        .to_owned();
    let half = blob.len() / 2;
    for (start, part) in [(0, &blob[..half]), (half, &blob[half..])] {
        loc = crate::support::try_send_chunk(c, &format!("{root}{loc}"), start, part).await?;
    }
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{root}{loc}{sep}digest={}", digest(blob)))
        .send()
        .await
        .map_err(e)?;
    match r.status() {
        StatusCode::CREATED => Ok(()),
        s => Err(format!("PUT {s}")),
    }
}

/// Pushes `image` to `repo:tag` one of four ways (`how`); the manifest answer decides.
async fn push(
    c: &reqwest::Client,
    root: &str,
    repo: &str,
    tag: &str,
    image: &Image,
    how: u32,
    from: &str,
) -> Result<(), String> {
    match how {
        0 => {
            let push = Push {
                monolithic: true,
                ..Push::default()
            };
            return image.try_push(root, repo, tag, push).await.map(|_| ());
        }
        1 => {
            return image
                .try_push(root, repo, tag, Push::default())
                .await
                .map(|_| ());
        }
        2 => {
            for b in &image.blobs {
                chunked(c, root, repo, b).await?;
            }
        }
        _ => {
            // Into `from` first, then mounted across.
            image.try_push(root, from, tag, Push::default()).await?;
            for b in &image.blobs {
                let r = c
                    .post(format!(
                        "{root}/v2/{repo}/blobs/uploads/?mount={}&from={from}",
                        digest(b)
                    ))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if r.status() != StatusCode::CREATED {
                    return Err(format!("mount {}", r.status()));
                }
            }
        }
    }
    let r = c
        .put(format!("{root}/v2/{repo}/manifests/{tag}"))
        .header("content-type", image.media_type)
        .body(image.manifest.clone())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    match r.status() {
        StatusCode::CREATED => Ok(()),
        s => Err(format!("manifest {s}")),
    }
}

async fn writer(
    n: usize,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    seeds: Arc<AtomicU64>,
) -> Ledger {
    let root = format!("http://{addr}");
    let c = client();
    let repo = format!("crash/w{n}");
    let from = format!("crash/src{n}");
    let mut ledger = Ledger {
        tags: HashMap::new(),
        images: HashMap::new(),
        acknowledged: 0,
    };
    let mut step = 0u32;
    while !stop.load(Ordering::Relaxed) {
        step += 1;
        let (tag, op) = {
            let mut rng = rand::rng();
            (
                format!("t{}", rng.random_range(0..6)),
                rng.random_range(0..10u32),
            )
        };
        let key = (repo.clone(), tag.clone());
        if op == 9 {
            // Delete whatever the tag surely holds.
            let Some(state) = ledger.tags.get(&key) else {
                continue;
            };
            if state.absent || state.digests.len() != 1 {
                continue;
            }
            let d = state.digests.iter().next().cloned().unwrap_or_default();
            let r = c
                .delete(format!("{root}/v2/{repo}/manifests/{d}"))
                .send()
                .await;
            let state = ledger.tags.entry(key).or_default();
            state.absent = true;
            if r.is_ok_and(|r| r.status() == StatusCode::ACCEPTED) {
                // Acknowledged: surely gone.
                state.digests.clear();
                ledger.acknowledged += 1;
            }
            continue;
        }
        let seed = seeds.fetch_add(1, Ordering::Relaxed);
        let sizes: &[usize] = if step % 4 == 0 {
            &[300_000, 20_000]
        } else {
            &[30_000, 5_000]
        };
        let image = Image::new(seed, sizes);
        let d = image.digest();
        ledger.images.insert(d.clone(), image);
        let image = &ledger.images[&d];
        let answered = push(&c, &root, &repo, &tag, image, op % 4, &from).await;
        let state = ledger.tags.entry(key).or_default();
        if answered.is_ok() {
            // Acknowledged: the tag holds exactly this now.
            state.digests.clear();
            state.absent = false;
            ledger.acknowledged += 1;
        }
        // Unanswered, it may or may not have landed: one more possibility.
        state.digests.insert(d);
        if let Err(e) = &answered
            && std::env::var_os("BERTH_CRASH_DEBUG").is_some()
        {
            eprintln!("writer {n}: {e}");
        }
        if answered.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    ledger
}

fn fsck(data: &Path, config: Option<&Path>) -> (bool, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_berth"));
    // The server is stopped: no commit is in progress, so every object counts.
    cmd.args(["fsck", "--verify-digests", "--grace", "0s", "--data"])
        .arg(data);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let out = cmd.output().expect("berth fsck");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `uptime_ms`: how long the server runs between kills (an object store behind moto needs
/// longer for a push to finish than local disk).
async fn crash_loop(config: &str, uptime_ms: std::ops::Range<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let start = |data: &Path| spawn_berth_at(addr, data, Some(config), &[]);
    let mut server: Proc = start(&data);
    let stop = Arc::new(AtomicBool::new(false));
    let seeds = Arc::new(AtomicU64::new(1_000_000));
    let writers: Vec<_> = (0..WRITERS)
        .map(|n| tokio::spawn(writer(n, addr, stop.clone(), seeds.clone())))
        .collect();
    let kills = cycles();
    for _ in 0..kills {
        let up = rand::rng().random_range(uptime_ms.clone());
        tokio::time::sleep(Duration::from_millis(up)).await;
        server.sigkill();
        server = start(&data);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut ledgers = Vec::new();
    for w in writers {
        ledgers.push(w.await.unwrap());
    }
    let acknowledged: u64 = ledgers.iter().map(|l| l.acknowledged).sum();
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap_or_default();
    let tail: Vec<&str> = log
        .lines()
        .rev()
        .filter(|l| !l.contains(" INFO "))
        .take(30)
        .collect();
    assert!(
        acknowledged > kills as u64,
        "only {acknowledged} acknowledged operations; last log lines:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );

    // Every tag holds what some request could have left, and pulls whole.
    let root = server.root();
    let c = client();
    let mut checked = 0;
    for ledger in &ledgers {
        for ((repo, tag), state) in &ledger.tags {
            let r = c
                .get(format!("{root}/v2/{repo}/manifests/{tag}"))
                .header("accept", crate::support::DOCKER_MANIFEST)
                .send()
                .await
                .unwrap();
            if r.status() == StatusCode::NOT_FOUND {
                assert!(
                    state.absent,
                    "{repo}:{tag} vanished, though a push of it was acknowledged"
                );
                continue;
            }
            assert_eq!(r.status(), StatusCode::OK, "{repo}:{tag}");
            let got = digest(&r.bytes().await.unwrap());
            assert!(
                state.digests.contains(&got),
                "{repo}:{tag} holds {got}, which no acknowledged or unanswered push sent"
            );
            ledger.images[&got]
                .pull(&root, repo, tag, "")
                .await
                .unwrap_or_else(|e| panic!("{repo}:{tag} does not pull whole: {e}"));
            checked += 1;
        }
    }
    eprintln!(
        "crash loop: {kills} kills, {acknowledged} acknowledged operations, {checked} tags pulled whole"
    );
    assert!(checked > 0);
    drop(server);
    let config_file = data.with_extension("toml");
    let (clean, report) = fsck(&data, Some(&config_file));
    assert!(clean, "fsck after the crash loop:\n{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_loop_on_local_disk_loses_no_acknowledged_push() {
    crash_loop(GC, 100..900).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_loop_on_s3_loses_no_acknowledged_push() {
    let config = format!(
        "{GC}{}",
        crate::support::cluster::s3_storage(&format!("crash-{}", free_port()))
    );
    crash_loop(&config, 300..2500).await;
}
