//! Load: 200 clients push distinct images while 1,000 clients pull manifests and blobs, each on
//! its own connection, for `BERTH_LOAD_SECS` seconds (CI: 10; the long mode: 60). No request
//! may fail. Reported: pushes and pulls done, p50 and p99 of manifest and blob GETs, and Berth's
//! peak RSS, which must stay bounded. `./scripts/test` runs it on its own, after the other
//! tests, so that it neither starves them nor is starved by them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::support::{Image, Push, spawn_berth};

const PUSHERS: usize = 200;
const PULLERS: usize = 1000;
const SEEDS: u64 = 20;

fn seconds() -> u64 {
    std::env::var("BERTH_LOAD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// One puller: its own connection; the manifest of a seeded image by tag, then one of its
/// blobs, checked; latencies of each.
async fn pull_loop(
    root: String,
    seeds: Arc<Vec<Image>>,
    until: Instant,
    n: usize,
    errors: Arc<AtomicU64>,
) -> (Vec<Duration>, Vec<Duration>) {
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .expect("client");
    let (mut manifests, mut blobs) = (Vec::new(), Vec::new());
    let mut i = n;
    while Instant::now() < until {
        i += 1;
        let k = i % seeds.len();
        let image = &seeds[k];
        let t = Instant::now();
        let ok = match c
            .get(format!("{root}/v2/load/seed{k}/manifests/1"))
            .header("accept", image.media_type)
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => r.bytes().await.is_ok_and(|b| b == image.manifest),
            _ => false,
        };
        manifests.push(t.elapsed());
        let blob = &image.blobs[i % image.blobs.len()];
        let t = Instant::now();
        let ok = ok
            && match c
                .get(format!(
                    "{root}/v2/load/seed{k}/blobs/{}",
                    crate::support::digest(blob)
                ))
                .send()
                .await
            {
                Ok(r) if r.status() == 200 => r.bytes().await.is_ok_and(|b| b == blob[..]),
                _ => false,
            };
        blobs.push(t.elapsed());
        if !ok {
            errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    (manifests, blobs)
}

#[test]
fn pushes_beside_a_thousand_pullers() {
    // 1,200 client connections and as many on the server's side.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let secs = seconds();
    let dir = tempfile::tempdir().unwrap();
    let p = spawn_berth(&dir.path().join("data"));
    let root = p.root();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (pulls, mut manifests, mut blobs, pushes, errors) = rt.block_on(async {
        let seeds: Vec<Image> = (0..SEEDS)
            .map(|i| Image::new(9000 + i, &[2048, 65536]))
            .collect();
        for (i, image) in seeds.iter().enumerate() {
            image
                .push(
                    &root,
                    &format!("load/seed{i}"),
                    "1",
                    crate::support::Auth::None,
                )
                .await;
        }
        let seeds = Arc::new(seeds);
        let errors = Arc::new(AtomicU64::new(0));
        let pushes = Arc::new(AtomicU64::new(0));
        let until = Instant::now() + Duration::from_secs(secs);
        let pullers: Vec<_> = (0..PULLERS)
            .map(|n| {
                tokio::spawn(pull_loop(
                    root.clone(),
                    seeds.clone(),
                    until,
                    n,
                    errors.clone(),
                ))
            })
            .collect();
        let pushers: Vec<_> = (0..PUSHERS)
            .map(|n| {
                let (root, errors, pushes) = (root.clone(), errors.clone(), pushes.clone());
                tokio::spawn(async move {
                    let mut k = 0u64;
                    while Instant::now() < until {
                        k += 1;
                        // Distinct images: every push uploads new blobs.
                        let image = Image::new(1_000_000 + n as u64 * 10_000 + k, &[1024, 16384]);
                        match image
                            .try_push(
                                &root,
                                &format!("load/push{n}"),
                                &format!("t{k}"),
                                Push::default(),
                            )
                            .await
                        {
                            Ok(_) => pushes.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                eprintln!("push failed: {e}");
                                errors.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        let (mut manifests, mut blobs) = (Vec::new(), Vec::new());
        for h in pullers {
            match h.await {
                Ok((m, b)) => {
                    manifests.extend(m);
                    blobs.extend(b);
                }
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        for h in pushers {
            if h.await.is_err() {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        (
            manifests.len(),
            manifests,
            blobs,
            pushes.load(Ordering::Relaxed),
            errors.load(Ordering::Relaxed),
        )
    });
    manifests.sort();
    blobs.sort();
    let rss = p.peak_rss_kib() / 1024;
    eprintln!(
        "load for {secs} s: {pushes} pushes by {PUSHERS} clients, {pulls} pulls by {PULLERS} clients; \
         manifest GET p50 {:?} p99 {:?}; blob GET p50 {:?} p99 {:?}; {errors} errors; Berth peak RSS {rss} MiB",
        percentile(&manifests, 0.5),
        percentile(&manifests, 0.99),
        percentile(&blobs, 0.5),
        percentile(&blobs, 0.99),
    );
    assert_eq!(errors, 0, "requests failed under load");
    assert!(
        pushes >= PUSHERS as u64,
        "every pusher got through at least once: {pushes}"
    );
    assert!(
        pulls >= PULLERS,
        "every puller got through at least once: {pulls}"
    );
    assert!(rss < 512, "Berth's peak RSS under load: {rss} MiB");
}
