//! Ingest benchmark: how fast the store takes a monolithic 1 GiB push on local disk when the
//! body is already in memory (no socket, no client on the same cores). That is the server's own
//! ceiling for a push; the HTTP figure in `bench/run` adds the socket and the client. Reports
//! each run's MB/s beside this machine's SHA-256 speed on one core, measured in the same run.
//! Not a test: `cargo bench --bench ingest`; `BERTH_BENCH_DIR` picks the directory (the default
//! is the system's temporary directory; `/dev/shm` takes the disk out).

use std::time::Instant;

use berth_storage::{Chunk, Digest, RepoName, StorageConfig, Store};
use bytes::Bytes;
use futures_util::StreamExt;

const SIZE: usize = 1 << 30;
/// Near what hyper hands over per read of a fast upload.
const PIECE: usize = 64 * 1024;
const RUNS: usize = 3;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // Cheap, incompressible-enough bytes (xorshift), so the disk sees no zero pages.
    let mut data = vec![0u8; SIZE];
    let mut x = 0x9E37_79B9_7F4A_7C15_u64;
    for w in data.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    let data = Bytes::from(data);
    let t0 = Instant::now();
    let digest = Digest::sha256(&data);
    let sha = mbps(t0.elapsed());
    println!("SHA-256, one core: {sha:.0} MB/s");

    let root = std::env::var_os("BERTH_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(root).expect("tempdir");
    let store = Store::open(&StorageConfig::local(dir.path()))
        .await
        .expect("open");
    let mut runs = Vec::new();
    for i in 0..RUNS {
        let repo: RepoName = format!("bench/ingest{i}").parse().expect("repo name");
        let up = store.start_upload(&repo).await.expect("start");
        let pieces: Vec<Bytes> = (0..SIZE)
            .step_by(PIECE)
            .map(|at| data.slice(at..(at + PIECE).min(SIZE)))
            .collect();
        let body = futures_util::stream::iter(pieces.into_iter().map(Ok)).boxed();
        let t = Instant::now();
        store
            .finish_upload(&repo, &up.id, &digest, Some(Chunk::new(body)))
            .await
            .expect("push");
        let r = mbps(t.elapsed());
        println!("push {i}: {r:.0} MB/s ({:.2} of SHA-256)", r / sha);
        // Later runs find the blob stored already, but the upload is written and hashed in
        // full before its commit sees that.
        runs.push(r);
    }
    runs.sort_by(f64::total_cmp);
    println!(
        "median: {:.0} MB/s, {:.2} of SHA-256",
        runs[RUNS / 2],
        runs[RUNS / 2] / sha
    );
}

fn mbps(d: std::time::Duration) -> f64 {
    SIZE as f64 / d.as_secs_f64() / 1e6
}
