//! GC benchmark: a registry of 100,000 blobs of which 10,000 are garbage, blobs on local disk,
//! metadata in SQLite and, when `BERTH_BENCH_POSTGRES_URL` names a PostgreSQL server (an admin
//! URL: a database is created there), in PostgreSQL too. Reports the time of one collection
//! and the process's peak RSS. Not a test: run with `cargo bench --bench gc` (`bench/replicas`
//! starts a PostgreSQL and sets the variable).

use std::time::Instant;

use berth_storage::backend::{BlobBackend, MetadataBackend};
use berth_storage::meta::postgres::PgConfig;
use berth_storage::{GcPolicy, StorageConfig, Store};
use futures_util::pin_mut;
use rusqlite::params;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

const BLOBS: usize = 100_000;
const GARBAGE: usize = 10_000;
const LAYERS_PER_MANIFEST: usize = 9;

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn hex(i: usize) -> String {
    format!("{:064x}", i as u128 * 0x9E37_79B9_7F4A_7C15_u128 + 1)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StorageConfig::local(dir.path());
    let store = Store::open(&cfg).await.expect("open");
    let t0 = Instant::now();
    write_objects(dir.path());
    let MetadataBackend::Sqlite(db_path) = cfg.metadata.clone() else {
        unreachable!("a local configuration keeps its metadata in SQLite")
    };
    populate_sqlite(db_path).await;
    measure(&store, "SQLite", t0.elapsed()).await;

    if let Ok(admin) = std::env::var("BERTH_BENCH_POSTGRES_URL") {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = fresh_database(&admin).await;
        let cfg = StorageConfig {
            blobs: BlobBackend::Filesystem(dir.path().join("objects")),
            metadata: MetadataBackend::Postgres(PgConfig {
                url: url.clone(),
                pool_size: 8,
            }),
            fsync: true,
        };
        let store = Store::open(&cfg).await.expect("open");
        let t0 = Instant::now();
        write_objects(dir.path());
        populate_postgres(&url).await;
        measure(&store, "PostgreSQL", t0.elapsed()).await;
    }
}

/// Objects: one small file per blob, laid out as the store does.
fn write_objects(dir: &std::path::Path) {
    for i in 0..BLOBS {
        let h = hex(i);
        let p = dir.join("objects/blobs/sha256").join(&h[..2]);
        std::fs::create_dir_all(&p).expect("mkdir");
        std::fs::write(p.join(&h), b"x").expect("write");
    }
}

/// Metadata (written directly for speed): 10,000 manifests reference the first 90,000 blobs;
/// 10,000 are linked only.
async fn populate_sqlite(db_path: std::path::PathBuf) {
    tokio::task::spawn_blocking(move || -> rusqlite::Result<()> {
            let mut conn = rusqlite::Connection::open(db_path)?;
            let tx = conn.transaction()?;
            tx.execute("INSERT INTO repos (id, name, created_at) VALUES (1, 'bench/repo', 0)", [])?;
            let mut b = tx.prepare("INSERT INTO blobs (digest, size, created_at, last_access) VALUES (?1, 1, 0, 0)")?;
            let mut l = tx.prepare("INSERT INTO repo_blobs (repo_id, digest, created_at) VALUES (1, ?1, 0)")?;
            for i in 0..BLOBS {
                let d = format!("sha256:{}", hex(i));
                b.execute([&d])?;
                l.execute([&d])?;
            }
            let mut body = tx.prepare("INSERT INTO manifest_bodies (digest, content, created_at) VALUES (?1, x'7b7d', 0)")?;
            let mut m = tx.prepare(
                "INSERT INTO manifests (repo_id, digest, media_type, size, created_at) VALUES (1, ?1, 'application/vnd.oci.image.manifest.v1+json', 2, 0)",
            )?;
            let mut r = tx.prepare("INSERT INTO manifest_refs (repo_id, manifest_digest, child_digest, kind) VALUES (1, ?1, ?2, 'blob')")?;
            let mut tag = tx.prepare("INSERT INTO tags (repo_id, name, digest, updated_at) VALUES (1, ?1, ?2, 0)")?;
            for j in 0..(BLOBS - GARBAGE) / LAYERS_PER_MANIFEST {
                let md = format!("sha256:{:064x}", 0xABCD_0000_0000_u64 + j as u64);
                body.execute([&md])?;
                m.execute([&md])?;
                tag.execute(params![format!("t{j}"), md])?;
                for k in 0..LAYERS_PER_MANIFEST {
                    r.execute(params![md, format!("sha256:{}", hex(j * LAYERS_PER_MANIFEST + k))])?;
                }
            }
            // Everything is old; every blob has been queued once (as after the migration).
            tx.execute_batch("UPDATE blob_review SET queued_at = 0; DELETE FROM manifest_review;")?;
            drop((b, l, body, m, r, tag));
            tx.commit()
        })
        .await
        .expect("populate task")
        .expect("populate");
}

/// A database of its own on the server at `admin`.
async fn fresh_database(admin: &str) -> String {
    let (client, conn) = tokio_postgres::connect(admin, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let name = format!("bench_gc_{}", std::process::id());
    for sql in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name}"),
    ] {
        client.batch_execute(&sql).await.expect("create database");
    }
    let (base, _) = admin.rsplit_once('/').expect("url ends in /<database>");
    format!("{base}/{name}")
}

/// A value of a row to `COPY`.
type Value = Box<dyn ToSql + Sync + Send>;
/// Row `i` of a table, or `None` past its end.
type RowFn = Box<dyn Fn(usize) -> Option<Vec<Value>>>;

/// The same content as [`populate_sqlite`], with `COPY`.
async fn populate_postgres(url: &str) {
    let (mut client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let tx = client.transaction().await.expect("begin");
    tx.execute(
        "INSERT INTO repos (id, name, created_at) VALUES (1, 'bench/repo', 0)",
        &[],
    )
    .await
    .expect("repo");
    let manifests = (BLOBS - GARBAGE) / LAYERS_PER_MANIFEST;
    let md = |j: usize| format!("sha256:{:064x}", 0xABCD_0000_0000_u64 + j as u64);
    let tables: [(&str, &[Type], RowFn); 6] = [
        (
            "blobs (digest, size, created_at, last_access)",
            &[Type::TEXT, Type::INT8, Type::INT8, Type::INT8],
            Box::new(|i| {
                (i < BLOBS).then(|| {
                    vec![
                        Box::new(format!("sha256:{}", hex(i))) as Value,
                        Box::new(1i64),
                        Box::new(0i64),
                        Box::new(0i64),
                    ]
                })
            }),
        ),
        (
            "repo_blobs (repo_id, digest, created_at)",
            &[Type::INT8, Type::TEXT, Type::INT8],
            Box::new(|i| {
                (i < BLOBS).then(|| {
                    vec![
                        Box::new(1i64) as Value,
                        Box::new(format!("sha256:{}", hex(i))),
                        Box::new(0i64),
                    ]
                })
            }),
        ),
        (
            "manifest_bodies (digest, content, created_at)",
            &[Type::TEXT, Type::BYTEA, Type::INT8],
            Box::new(move |j| {
                (j < manifests).then(|| {
                    vec![
                        Box::new(md(j)) as Value,
                        Box::new(b"{}".to_vec()),
                        Box::new(0i64),
                    ]
                })
            }),
        ),
        (
            "manifests (repo_id, digest, media_type, size, created_at)",
            &[Type::INT8, Type::TEXT, Type::TEXT, Type::INT8, Type::INT8],
            Box::new(move |j| {
                (j < manifests).then(|| {
                    vec![
                        Box::new(1i64) as Value,
                        Box::new(md(j)),
                        Box::new("application/vnd.oci.image.manifest.v1+json".to_owned()),
                        Box::new(2i64),
                        Box::new(0i64),
                    ]
                })
            }),
        ),
        (
            "manifest_refs (repo_id, manifest_digest, child_digest, kind)",
            &[Type::INT8, Type::TEXT, Type::TEXT, Type::TEXT],
            Box::new(move |n| {
                (n < manifests * LAYERS_PER_MANIFEST).then(|| {
                    vec![
                        Box::new(1i64) as Value,
                        Box::new(md(n / LAYERS_PER_MANIFEST)),
                        Box::new(format!("sha256:{}", hex(n))),
                        Box::new("blob".to_owned()),
                    ]
                })
            }),
        ),
        (
            "tags (repo_id, name, digest, updated_at)",
            &[Type::INT8, Type::TEXT, Type::TEXT, Type::INT8],
            Box::new(move |j| {
                (j < manifests).then(|| {
                    vec![
                        Box::new(1i64) as Value,
                        Box::new(format!("t{j}")),
                        Box::new(md(j)),
                        Box::new(0i64),
                    ]
                })
            }),
        ),
    ];
    for (table, types, row) in &tables {
        let sink = tx
            .copy_in(&format!("COPY {table} FROM STDIN BINARY"))
            .await
            .expect("copy");
        let w = BinaryCopyInWriter::new(sink, types);
        pin_mut!(w);
        let mut i = 0;
        while let Some(values) = row(i) {
            let refs: Vec<&(dyn ToSql + Sync)> = values
                .iter()
                .map(|v| v.as_ref() as &(dyn ToSql + Sync))
                .collect();
            w.as_mut().write(&refs).await.expect("row");
            i += 1;
        }
        w.finish().await.expect("finish");
    }
    // Everything is old; every blob has been queued once (as after the migration).
    tx.batch_execute("UPDATE blob_review SET queued_at = 0; DELETE FROM manifest_review;")
        .await
        .expect("queues");
    tx.commit().await.expect("commit");
    // As autovacuum would have by the time a collection runs on a database this size.
    client.batch_execute("ANALYZE").await.expect("analyze");
}

async fn measure(store: &Store, what: &str, populated: std::time::Duration) {
    let rss_before = peak_rss_kib();

    let t = Instant::now();
    let report = store.gc(&GcPolicy::default(), false).await.expect("gc");
    let first = t.elapsed();
    let rss_after = peak_rss_kib();
    assert_eq!(report.blobs as usize, GARBAGE, "{report}");
    assert_eq!(report.objects_deleted as usize, GARBAGE, "{report}");

    let t = Instant::now();
    let again = store.gc(&GcPolicy::default(), false).await.expect("gc");
    let second = t.elapsed();

    println!("gc benchmark: {BLOBS} blobs, {GARBAGE} garbage, local disk, metadata in {what}");
    println!(
        "  populate                         {:>8.2} s",
        populated.as_secs_f64()
    );
    println!(
        "  first run (all 100k queued)      {:>8.2} s   {report}",
        first.as_secs_f64()
    );
    println!(
        "  second run (nothing queued)      {:>8.3} s   {again}",
        second.as_secs_f64()
    );
    println!(
        "  peak RSS before gc {} MiB, after {} MiB",
        rss_before / 1024,
        rss_after / 1024
    );
}
