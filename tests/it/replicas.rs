//! PostgreSQL metadata and replicas: the storage suite and the conformance runner on
//! PostgreSQL exactly as on SQLite, then several Berth processes over one database and one
//! object store behind a load balancer. PostgreSQL and the S3 server are started by
//! `./scripts/test` (see `support::postgres`); the balancer by the tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_storage::meta::postgres::{PgConfig, PgMeta};
use berth_storage::suite::{Env, run};
use futures_util::future::BoxFuture;
use futures_util::{FutureExt as _, StreamExt as _};

use reqwest::StatusCode;
use serde_json::json;

use crate::backends::{Cloud, configure, unique};
use crate::proxy::logged;
use crate::support::cluster::{Cluster, s3_storage};
use crate::support::postgres::{fresh_database, use_postgres};
use crate::support::{
    Auth, DOCKER, Image, OCI_MANIFEST, TestServer, client, digest, noise, spawn_berth_with,
    spawn_distribution, try_send_chunk,
};

fn open_suite_env() -> BoxFuture<'static, Env> {
    async {
        let url = fresh_database("suite").await;
        let config = PgConfig { url, pool_size: 8 };
        let meta = Arc::new(PgMeta::connect(&config).await.expect("connect"));
        let sibling = Arc::new(PgMeta::connect(&config).await.expect("connect"));
        Env {
            objects: Arc::new(object_store::memory::InMemory::new()),
            meta,
            sibling,
            guard: Box::new(()),
        }
    }
    .boxed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_storage_suite_passes_on_postgres() {
    run("postgres", &open_suite_env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_passes_on_s3_and_postgres() {
    let url = fresh_database("conformance").await;
    let s = TestServer::start_with(|c| {
        configure(Cloud::S3, &unique("pg-conformance"), false)(c);
        use_postgres(c, &url);
    })
    .await;
    let report = berth_conformance::run(
        berth_conformance::Config::new(&s.root(), "conformance/postgres"),
        false,
    )
    .await
    .expect("run");
    let failures: Vec<_> = report
        .failures()
        .iter()
        .map(|o| format!("{}: {:?}", o.name, o.result))
        .collect();
    assert!(
        failures.is_empty(),
        "{}\n{}",
        report.summary(),
        failures.join("\n")
    );
}

/// Connects to the cluster's database, for what the tests count there.
async fn db(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

/// The upload URL in a `Location` header, made absolute against `root`.
fn location(root: &str, r: &reqwest::Response) -> String {
    let loc = r
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if loc.starts_with("http") {
        loc.to_owned()
    } else {
        format!("{root}{loc}")
    }
}

/// Re-points an upload URL at another replica.
fn at(root: &str, url: &str) -> String {
    let path = url.splitn(4, '/').nth(3).unwrap_or_default();
    format!("{root}/{path}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_s_chunks_sent_to_different_replicas_complete() {
    let cluster = Cluster::start("chunks", 3, "");
    let c = client();
    let data = noise(3 * (1 << 20) + 4321, 11);
    let d = digest(&data);
    let r = c
        .post(format!(
            "{}/v2/spread/app/blobs/uploads/",
            cluster.replica(0)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let mut url = location(&cluster.replica(0), &r);
    let chunks: Vec<&[u8]> = data.chunks(1 << 20).collect();
    let mut offset = 0usize;
    for (i, chunk) in chunks[..chunks.len() - 1].iter().enumerate() {
        let replica = cluster.replica((i + 1) % 3);
        let loc = try_send_chunk(&c, &at(&replica, &url), offset, chunk)
            .await
            .unwrap_or_else(|e| panic!("chunk {i} on replica {}: {e}", (i + 1) % 3));
        offset += chunk.len();
        url = if loc.starts_with("http") {
            loc
        } else {
            format!("{replica}{loc}")
        };
    }
    // The last chunk with the PUT, on the replica that began the upload.
    let last = at(&cluster.replica(0), &url);
    let sep = if last.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{last}{sep}digest={d}"))
        .body(chunks[chunks.len() - 1].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap_or_default()
    );
    for i in 0..3 {
        let got = crate::support::get_bytes(
            &c,
            format!("{}/v2/spread/app/blobs/{d}", cluster.replica(i)),
        )
        .await;
        assert_eq!(digest(&got), d, "replica {i} serves the blob");
    }

    // Through the balancer, request by request: images pushed in chunks and pulled back, and
    // every replica took part.
    let root = cluster.root();
    for i in 0..6u64 {
        let image = Image::new(40 + i, &[300_000, 20_000]);
        image
            .push(&root, &format!("spread/img{i}"), "1", Auth::None)
            .await;
        image
            .pull(&root, &format!("spread/img{i}"), "1", "")
            .await
            .unwrap();
    }
    let per = cluster.requests_per_replica().await;
    assert!(per.iter().all(|n| *n > 5), "requests per replica: {per:?}");
}

/// Pushes `image` as `repo:tag` through `root`, retrying a failed push from the start as
/// clients do (up to 8 times, a second apart); how many tries it took.
async fn push_with_retries(
    image: &Image,
    root: &str,
    repo: &str,
    tag: &str,
) -> Result<u32, String> {
    let mut last = String::new();
    for attempt in 1..=8 {
        match image.try_push(root, repo, tag, DOCKER).await {
            Ok(_) => return Ok(attempt),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(format!("{repo}:{tag}: {last}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_a_replica_during_twenty_pushes_loses_no_acknowledged_image() {
    let mut cluster = Cluster::start("kill9", 3, "");
    let root = cluster.root();
    let acknowledged = Arc::new(Mutex::new(Vec::<(String, Image)>::new()));
    let retried = Arc::new(AtomicU64::new(0));
    let pushers: Vec<_> = (0..20u64)
        .map(|p| {
            let (root, acknowledged, retried) =
                (root.clone(), acknowledged.clone(), retried.clone());
            tokio::spawn(async move {
                for k in 0..4u64 {
                    let image = Image::new(1000 + p * 10 + k, &[1 << 20, 400_000, 3_000]);
                    let repo = format!("kill/p{p}");
                    let tag = format!("t{k}");
                    let tries = push_with_retries(&image, &root, &repo, &tag).await?;
                    if tries > 1 {
                        retried.fetch_add(1, Ordering::Relaxed);
                    }
                    acknowledged
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((format!("{repo}:{tag}"), image));
                }
                Ok::<_, String>(())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.kill(1);
    let mut failures = Vec::new();
    for p in pushers {
        if let Err(e) = p.await.unwrap() {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "pushes that never succeeded: {failures:?}"
    );
    let acknowledged = std::mem::take(&mut *acknowledged.lock().unwrap());
    assert_eq!(acknowledged.len(), 80);
    eprintln!(
        "{} pushes acknowledged, {} needed a retry after the kill",
        acknowledged.len(),
        retried.load(Ordering::Relaxed)
    );
    for (name, image) in &acknowledged {
        let (repo, tag) = name.split_once(':').unwrap();
        image
            .pull(&root, repo, tag, "")
            .await
            .unwrap_or_else(|e| panic!("{name} was acknowledged but does not pull: {e}"));
    }
}

/// How long writers push in the replicas' GC soak: `BERTH_REPLICA_SOAK_SECS`, 20 s by default
/// (CI); 120 s or more before a release.
fn soak_time() -> Duration {
    let secs = std::env::var("BERTH_REPLICA_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    Duration::from_secs(secs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gc_on_every_replica_and_from_outside_while_three_writers_push_loses_nothing() {
    let cluster = Cluster::start("gcsoak", 3, "[gc]\ninterval = \"1s\"\ngrace = \"1m\"\n");
    let root = cluster.root();
    let c = client();

    // Garbage, two hours old: images pushed and deleted, blobs nothing references.
    let deleted: Vec<Image> = (0..4u64)
        .map(|i| Image::new(2000 + i, &[200_000, 5_000]))
        .collect();
    for (i, image) in deleted.iter().enumerate() {
        image
            .push(&root, "gone/app", &format!("t{i}"), Auth::None)
            .await;
        let r = c
            .delete(format!("{root}/v2/gone/app/manifests/{}", image.digest()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let orphans: Vec<Vec<u8>> = (0..10u64).map(|i| noise(4_000, 2100 + i)).collect();
    for b in &orphans {
        let r = c
            .post(format!(
                "{root}/v2/junk/blobs/uploads/?digest={}",
                digest(b)
            ))
            .body(b.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let meta = PgMeta::connect(&PgConfig {
        url: cluster.db.clone(),
        pool_size: 2,
    })
    .await
    .unwrap();
    berth_storage::meta::Metadata::age_for_tests(&meta, 7200)
        .await
        .unwrap();

    // Three writers through the balancer: new images on the deleted ones' layers, into the
    // repository that held them (the race of issue 14) and into their own, the way docker
    // pushes (HEAD, skip what exists, manifest).
    let until = Instant::now() + soak_time();
    let writers: Vec<_> = (0..3u64)
        .map(|w| {
            let root = root.clone();
            let deleted: Vec<Image> = deleted
                .iter()
                .map(|i| Image::with_manifest(i.manifest.clone(), i.media_type, i.blobs.clone()))
                .collect();
            tokio::spawn(async move {
                let mut pushed = Vec::new();
                let mut k = 0u64;
                while Instant::now() < until {
                    let base = &deleted[(k % 4) as usize];
                    let image = base.on_top(3000 + w * 100_000 + k, 20_000);
                    let repo = if k % 2 == 0 {
                        "gone/app".to_owned()
                    } else {
                        format!("w{w}/app")
                    };
                    let tag = format!("w{w}-{k}");
                    match image.try_push(&root, &repo, &tag, DOCKER).await {
                        Ok(_) => pushed.push((repo, tag, image)),
                        Err(e) => panic!("push {repo}:{tag}: {e}"),
                    }
                    k += 1;
                }
                pushed
            })
        })
        .collect();
    // `berth gc` from outside, over and over, beside the replicas' own schedule.
    let cli_runs = {
        let mut n = 0u32;
        while Instant::now() < until {
            let out = tokio::task::block_in_place(|| cluster.gc_from_outside());
            match out {
                Ok(_) => n += 1,
                Err(text) if text.contains("already running") => {}
                Err(text) => panic!("berth gc failed: {text}"),
            }
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        n
    };
    let mut pushed = Vec::new();
    for w in writers {
        pushed.extend(w.await.unwrap());
    }
    // One more collection after the writers stop, then every acknowledged image pulls.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (repo, tag, image) in &pushed {
        image
            .pull(&root, repo, tag, "")
            .await
            .unwrap_or_else(|e| panic!("{repo}:{tag} was acknowledged but does not pull: {e}"));
    }
    // The garbage went.
    for b in &orphans {
        let r = c
            .head(format!("{root}/v2/junk/blobs/{}", digest(b)))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::NOT_FOUND,
            "orphan {} survived",
            digest(b)
        );
    }
    let pg = db(&cluster.db).await;
    let orphan_digests: Vec<String> = orphans.iter().map(|b| digest(b)).collect();
    let left: i64 = pg
        .query_one(
            "SELECT count(*) FROM blobs WHERE digest = ANY($1)",
            &[&orphan_digests],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "orphan blobs still recorded");
    let pending: i64 = pg
        .query_one(
            "SELECT count(*) FROM gc_pending WHERE digest = ANY($1)",
            &[&orphan_digests],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pending, 0, "orphans' objects not deleted yet");
    // The most recent runs (older ones are pruned): who collected.
    let row = pg
        .query_one("SELECT count(*), count(DISTINCT holder) FROM gc_runs", &[])
        .await
        .unwrap();
    let (runs, holders): (i64, i64) = (row.get(0), row.get(1));
    eprintln!(
        "{} images pushed; the last {runs} collections came from {holders} collectors; \
         the CLI completed {cli_runs} runs",
        pushed.len(),
    );
    assert!(
        pushed.len() >= 15,
        "the writers pushed only {} images",
        pushed.len()
    );
    assert!(cli_runs >= 1, "berth gc never ran from outside");
    let replicas_collecting: i64 = pg
        .query_one(
            "SELECT count(DISTINCT holder) FROM gc_runs WHERE holder LIKE '%http://%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        replicas_collecting >= 2,
        "scheduled collections came from {replicas_collecting} replicas only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_cold_pulls_over_three_replicas_fetch_each_blob_once_upstream() {
    let up = tempfile::tempdir().unwrap();
    let dist = spawn_distribution(up.path());
    let image = Image::new(77, &[4 << 20, 3 << 20, 2 << 20, 1 << 20, 512 << 10]);
    image
        .push(&dist.root(), "library/five", "1", Auth::None)
        .await;
    let cluster = Cluster::start(
        "coldpull",
        3,
        &format!(
            "[[proxy.upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ntag_ttl = \"0s\"\n",
            dist.root()
        ),
    );
    let root = cluster.root();
    let pulls = (0..20).map(|_| image.pull(&root, "library/five", "1", "?ns=docker.io"));
    for r in futures_util::future::join_all(pulls).await {
        r.unwrap();
    }
    for b in &image.blobs {
        let n = logged(
            up.path(),
            "GET",
            &format!("/v2/library/five/blobs/{}", digest(b)),
        );
        assert_eq!(
            n,
            1,
            "upstream GETs of blob {} ({} bytes)",
            digest(b),
            b.len()
        );
    }
    let relays: usize = (0..3)
        .map(|i| cluster.log(i).matches("relaying another replica").count())
        .sum();
    let per = cluster.requests_per_replica().await;
    eprintln!("requests per replica {per:?}; relayed fetches logged: {relays}");
    assert!(per.iter().all(|n| *n > 0), "requests per replica: {per:?}");
}

/// Runs `berth migrate-metadata` with `args`; its output, or why it failed.
fn migrate(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("migrate-metadata")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_metadata_moves_a_single_node_install_of_1000_images_to_replicas() {
    // A single node: SQLite on its disk, blobs on S3.
    let started = Instant::now();
    let prefix = unique("migrate");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("single");
    let single = spawn_berth_with(&data, Some(&s3_storage(&prefix)));
    let root = single.root();
    // 1,000 images in 40 repositories over a few shared blobs (distinct by an annotation), so
    // that the test S3 server, which answers one request at a time, is not what takes long.
    let blobs: Vec<Vec<u8>> = (0..12u64)
        .map(|i| noise(2_000 + i as usize, 9000 + i))
        .collect();
    let images: Vec<(String, Image)> = (0..1000u64)
        .map(|i| {
            let picked = vec![
                blobs[(i % 4) as usize].clone(),
                blobs[4 + (i % 8) as usize].clone(),
            ];
            let desc =
                |mt: &str, b: &[u8]| json!({"mediaType": mt, "digest": digest(b), "size": b.len()});
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": desc("application/vnd.oci.image.config.v1+json", &picked[0]),
                "layers": [desc("application/vnd.oci.image.layer.v1.tar", &picked[1])],
                "annotations": {"n": i.to_string()},
            });
            (
                format!("team{}/app{}", i % 10, i % 4),
                Image::with_manifest(manifest.to_string(), OCI_MANIFEST, picked),
            )
        })
        .collect();
    let pushes = futures_util::stream::iter(images.iter().enumerate().map(|(i, (repo, image))| {
        let root = root.clone();
        async move {
            image
                .try_push(
                    &root,
                    repo,
                    &format!("v{i}"),
                    // As docker does: layers already there are not sent again.
                    DOCKER,
                )
                .await
        }
    }))
    .buffer_unordered(16)
    .collect::<Vec<_>>()
    .await;
    assert!(
        pushes.iter().all(Result::is_ok),
        "{:?}",
        pushes.iter().find(|r| r.is_err())
    );
    eprintln!("pushed 1000 images in {:?}", started.elapsed());

    let db = fresh_database("migrate").await;
    let sqlite = data.join("berth.db");
    let from = sqlite.to_str().unwrap();
    // A dry run counts and writes nothing.
    let dry = tokio::task::block_in_place(|| migrate(&["--from", from, "--to", &db, "--dry-run"]))
        .unwrap();
    assert!(dry.contains("manifests: 1000 rows"), "{dry}");
    assert!(dry.contains("tags: 1000 rows"), "{dry}");
    let pg = self::db(&db).await;
    let has_schema: bool = pg
        .query_one("SELECT to_regclass('public.repos') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!has_schema, "the dry run wrote to the target");

    let out = tokio::task::block_in_place(|| migrate(&["--from", from, "--to", &db])).unwrap();
    eprintln!("migrated at {:?}", started.elapsed());
    assert!(out.contains("manifests: 1000 of 1000 rows copied"), "{out}");
    assert!(
        out.contains("1000 manifest bodies against their digests"),
        "{out}"
    );
    // Twice into the same database is refused.
    let again =
        tokio::task::block_in_place(|| migrate(&["--from", from, "--to", &db])).unwrap_err();
    assert!(again.contains("already holds registry content"), "{again}");
    drop(single);

    // Three replicas over the copy and the same bucket: every image pulls, tags list.
    let cluster = Cluster::start_on(3, &prefix, &db, "");
    let root = cluster.root();
    // Every image: its manifest by tag, byte for byte, and each of its blobs there (HEAD);
    // each repository's blobs read whole once and checked against their digests.
    let c = client();
    let checks = futures_util::stream::iter(images.iter().enumerate().map(|(i, (repo, image))| {
        let (root, c) = (root.clone(), c.clone());
        async move {
            let r = c
                .get(format!("{root}/v2/{repo}/manifests/v{i}"))
                .header("accept", OCI_MANIFEST)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let body = r.bytes().await.map_err(|e| e.to_string())?;
            if digest(&body) != image.digest() {
                return Err(format!("{repo}:v{i}: the manifest differs"));
            }
            for b in &image.blobs {
                let s = c
                    .head(format!("{root}/v2/{repo}/blobs/{}", digest(b)))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?
                    .status();
                if s != StatusCode::OK {
                    return Err(format!("{repo}:v{i}: blob {}: {s}", digest(b)));
                }
            }
            Ok(())
        }
    }))
    .buffer_unordered(16)
    .collect::<Vec<Result<(), String>>>()
    .await;
    let mut failed: Vec<String> = checks.into_iter().filter_map(Result::err).collect();
    let mut read = std::collections::BTreeSet::new();
    for (repo, image) in &images {
        for b in &image.blobs {
            if read.insert((repo.clone(), digest(b))) {
                let got =
                    crate::support::get_bytes(&c, format!("{root}/v2/{repo}/blobs/{}", digest(b)))
                        .await;
                if digest(&got) != digest(b) {
                    failed.push(format!("{repo}: blob {} reads wrong", digest(b)));
                }
            }
        }
    }
    eprintln!("checked 1000 images at {:?}", started.elapsed());
    assert!(
        failed.is_empty(),
        "{} images do not pull: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    // New pushes get fresh repository ids (the sequence moved past the copied ones).
    Image::new(5, &[1_000])
        .push(&root, "after/migration", "1", Auth::None)
        .await;
    let tags: serde_json::Value = client()
        .get(format!("{root}/v2/team3/app3/tags/list"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let want = images
        .iter()
        .enumerate()
        .filter(|(_, (r, _))| r == "team3/app3")
        .count();
    assert_eq!(tags["tags"].as_array().map(Vec::len), Some(want), "{tags}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_is_revalidated_once_per_ttl_across_replicas() {
    let up = tempfile::tempdir().unwrap();
    let dist = spawn_distribution(up.path());
    let image = Image::new(78, &[1_000]);
    image
        .push(&dist.root(), "library/ttl", "1", Auth::None)
        .await;
    let cluster = Cluster::start(
        "tagttl",
        3,
        &format!(
            "[[proxy.upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ntag_ttl = \"3s\"\n",
            dist.root()
        ),
    );
    let c = client();
    let url = format!("{}/v2/library/ttl/manifests/1?ns=docker.io", cluster.root());
    let started = Instant::now();
    let mut served = 0;
    while started.elapsed() < Duration::from_millis(7500) {
        let gets = (0..6).map(|_| c.get(&url).header("accept", image.media_type).send());
        for r in futures_util::future::join_all(gets).await {
            assert_eq!(r.unwrap().status(), StatusCode::OK);
            served += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let heads = logged(up.path(), "HEAD", "/v2/library/ttl/manifests/1");
    let gets = logged(up.path(), "GET", "/v2/library/ttl/manifests/");
    eprintln!("{served} by-tag reads through 3 replicas: {gets} upstream GETs, {heads} HEADs");
    assert_eq!(gets, 1, "the manifest is fetched once");
    // 7.5 s with a 3 s TTL: at most one revalidation per window, whichever replica asks.
    assert!(
        (1..=3).contains(&heads),
        "{heads} revalidations in 7.5 s with a 3 s TTL"
    );
}
