//! GC benchmark: a registry of 100,000 blobs of which 10,000 are garbage, on local disk.
//! Reports the time of one collection and the process's peak RSS. Not a test: run with
//! `cargo bench --bench gc`.

use std::time::Instant;

use berth_storage::{GcPolicy, StorageConfig, Store};
use rusqlite::params;

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
    // Objects: one small file per blob, laid out as the store does.
    for i in 0..BLOBS {
        let h = hex(i);
        let p = dir.path().join("objects/blobs/sha256").join(&h[..2]);
        std::fs::create_dir_all(&p).expect("mkdir");
        std::fs::write(p.join(&h), b"x").expect("write");
    }
    // Metadata (SQLite, written directly for speed): 10,000 manifests reference the first
    // 90,000 blobs; 10,000 are linked only.
    let berth_storage::backend::MetadataBackend::Sqlite(db_path) = cfg.metadata.clone() else {
        unreachable!("a local configuration keeps its metadata in SQLite")
    };
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
    let populated = t0.elapsed();
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

    println!("gc benchmark: {BLOBS} blobs, {GARBAGE} garbage, local disk");
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
