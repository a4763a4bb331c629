//! Crash and restart: SIGKILL mid-upload, restarts after pushes. These run the real `berth`
//! binary as a child process.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use reqwest::{Client, StatusCode};

use crate::support::{DOCKER, Image, digest, noise, send_chunk, spawn_berth};

fn random(n: usize, seed: u8) -> Vec<u8> {
    noise(n, u64::from(seed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_upload_keeps_committed_chunks_and_shows_no_partial_blob() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let c = crate::support::client();
    let blob = random(3 << 20, 1);
    let d = digest(&blob);
    let first = 1 << 20;

    let p = spawn_berth(&data_dir);
    let root = p.root();
    let r = c
        .post(format!("{root}/v2/crash/test/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    send_chunk(&c, &format!("{root}{loc}"), 0, &blob[..first]).await;

    // Start a second chunk by hand and die halfway through its body.
    let mut s = TcpStream::connect(p.addr).unwrap();
    let rest = blob.len() - first;
    write!(
        s,
        "PATCH {loc} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Range: {first}-{}\r\nContent-Length: {rest}\r\n\r\n",
        p.addr,
        blob.len() - 1
    )
    .unwrap();
    s.write_all(&blob[first..first + rest / 2]).unwrap();
    s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    p.sigkill();
    drop(s);

    let p = spawn_berth(&data_dir);
    let root = p.root();
    let r = c
        .head(format!("{root}/v2/crash/test/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "a partial blob is visible"
    );
    resume_upload(&c, &root, "crash/test", &loc, &blob, first).await;
}

/// Continues an upload whose first `committed` bytes were acknowledged before a restart:
/// checks the server still has exactly those, sends the rest, commits, reads the blob back.
pub(crate) async fn resume_upload(
    c: &Client,
    root: &str,
    repo: &str,
    loc: &str,
    blob: &[u8],
    committed: usize,
) {
    let d = digest(blob);
    let r = c.get(format!("{root}{loc}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    // An empty session reports "0-0" too.
    assert_eq!(
        r.headers()["range"].to_str().unwrap(),
        format!("0-{}", committed.max(1) - 1),
        "committed chunk lost"
    );
    send_chunk(c, &format!("{root}{loc}"), committed, &blob[committed..]).await;
    let r = c
        .put(format!("{root}{loc}?digest={d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "{:?}", r.text().await);
    let got = crate::support::get_bytes(c, format!("{root}/v2/{repo}/blobs/{d}")).await;
    assert_eq!(digest(&got), d);
}

/// A two-layer OCI image from `seed`.
fn image(seed: u8) -> Image {
    let config = format!("{{\"seed\":{seed}}}").into_bytes();
    Image::oci(vec![
        config,
        random(200_000, seed),
        random(50_000, seed.wrapping_add(100)),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_keep_every_pushed_image() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let p = spawn_berth(&data_dir);
    let mut images = Vec::new();
    for (i, repo) in ["one", "two/deep", "three"].iter().enumerate() {
        let img = image(i as u8);
        img.try_push(&p.root(), repo, "v1", DOCKER).await.unwrap();
        images.push((repo.to_string(), img));
    }
    // Graceful stop (SIGTERM) ...
    let pid = p.child.id();
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let mut p = p;
    let status = p.child.wait().unwrap();
    assert!(status.success(), "berth exited with {status} on SIGTERM");
    drop(p);
    let p = spawn_berth(&data_dir);
    for (repo, img) in &images {
        img.pull(&p.root(), repo, "v1", "").await.unwrap();
    }
    // ... and a crash right after acknowledged pushes.
    let img = image(9);
    img.try_push(&p.root(), "four", "latest", DOCKER)
        .await
        .unwrap();
    images.push(("four".into(), img));
    p.sigkill();
    let p = spawn_berth(&data_dir);
    for (repo, img) in &images {
        let tag = if repo == "four" { "latest" } else { "v1" };
        img.pull(&p.root(), repo, tag, "")
            .await
            .unwrap_or_else(|e| panic!("{repo}:{tag} after the crash: {e}"));
    }
}

/// Streams a 1 GiB blob into `p` with one PATCH and commits it; returns the server's peak RSS
/// in KiB.
pub(crate) async fn push_1gib(p: &crate::support::Proc) -> u64 {
    use sha2::Digest as _;
    let c = crate::support::client();
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 1024;
    let chunk = random(CHUNK, 7);
    let mut h = sha2::Sha256::new();
    for i in 0..CHUNKS {
        h.update(&chunk[..CHUNK - 8]);
        h.update((i as u64).to_le_bytes());
    }
    let d = format!("sha256:{}", hex::encode(h.finalize()));
    let body = futures_util::stream::iter((0..CHUNKS).map(move |i| {
        let mut v = chunk[..CHUNK - 8].to_vec();
        v.extend_from_slice(&(i as u64).to_le_bytes());
        Ok::<_, std::io::Error>(v)
    }));
    let r = c
        .post(format!("{}/v2/big/blobs/uploads/", p.root()))
        .send()
        .await
        .unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    let r = c
        .patch(format!("{}{loc}", p.root()))
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = c
        .put(format!("{}{loc}?digest={d}", p.root()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "{:?}", r.text().await);
    p.peak_rss_kib()
}

/// A 1 GiB push streamed to local disk: peak RSS must stay far below the blob size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1gib_push_keeps_memory_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let p = spawn_berth(&dir.path().join("data"));
    let peak = push_1gib(&p).await;
    eprintln!(
        "peak RSS during a 1 GiB push to local disk: {} MiB",
        peak / 1024
    );
    assert!(
        peak > 0 && peak < 64 * 1024,
        "peak RSS {peak} KiB exceeds 64 MiB"
    );
}

/// A push's buffers come back from the heap, not as fresh pages: the server restarts itself
/// with glibc's malloc tuned (`GLIBC_TUNABLES`), so after a first push has grown the heap a
/// second push of 64 MiB faults in few pages. With glibc's defaults every receive buffer over
/// 128 KiB was new pages, faulted in and zeroed: about 0.4 faults per page pushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_reuses_the_servers_buffers_instead_of_fresh_pages() {
    let dir = tempfile::tempdir().unwrap();
    let p = spawn_berth(&dir.path().join("data"));
    let c = crate::support::client();
    let environ = std::fs::read(format!("/proc/{}/environ", p.child.id())).unwrap();
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|v| v.starts_with(b"GLIBC_TUNABLES=glibc.malloc.")),
        "the server runs without its malloc tuning"
    );
    let size = 64 << 20;
    let mut faults = Vec::new();
    for seed in [21, 22] {
        let blob = random(size, seed);
        let d = digest(&blob);
        let before = p.minor_faults();
        let r = c
            .post(format!("{}/v2/faults/blobs/uploads/?digest={d}", p.root()))
            .body(blob)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        faults.push(p.minor_faults() - before);
    }
    let pages = (size / 4096) as u64;
    assert!(
        faults[1] < pages / 8,
        "the second 64 MiB push faulted in {} pages of {pages} (the first {})",
        faults[1],
        faults[0]
    );
}

/// On local disk a chunked upload is one file written in place: no chunk objects, no copy at
/// the end, and bytes past the committed size (a write that died) are cut off before the next
/// chunk and before the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_uploads_append_in_place_and_drop_uncommitted_tails() {
    let s = crate::support::TestServer::start().await;
    let c = crate::support::client();
    let data = random(3 * 1024 * 1024 + 5, 9);
    let d = digest(&data);
    let r = c
        .post(s.url("/v2/inplace/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let mut loc = r.headers()["location"].to_str().unwrap().to_owned();
    let id = loc.rsplit('/').next().unwrap().to_owned();
    let uploads = s.dir.path().join("objects/uploads");
    let session_files = || -> Vec<String> {
        std::fs::read_dir(&uploads)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&id))
                    .collect()
            })
            .unwrap_or_default()
    };
    let chunk = 1024 * 1024;
    let mut off = 0;
    for (i, part) in data.chunks(chunk).enumerate() {
        if i == 2 {
            // A write that died after the last commit left junk behind the committed bytes.
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(uploads.join(format!("{id}.data")))
                .unwrap();
            f.write_all(&[0xAA; 4096]).unwrap();
        }
        let r = c
            .patch(s.url(&loc))
            .header("content-range", format!("{}-{}", off, off + part.len() - 1))
            .header("content-type", "application/octet-stream")
            .body(part.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        loc = r.headers()["location"].to_str().unwrap().to_owned();
        off += part.len();
        assert_eq!(
            session_files(),
            [format!("{id}.data")],
            "one file per session"
        );
    }
    // One more tail, then the commit must still see exactly the committed bytes.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(uploads.join(format!("{id}.data")))
        .unwrap();
    f.write_all(b"junk").unwrap();
    drop(f);
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = c
        .put(s.url(&format!("{loc}{sep}digest={d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    let got = crate::support::get_bytes(&c, s.url(&format!("/v2/inplace/blobs/{d}"))).await;
    assert_eq!(got.len(), data.len());
    assert_eq!(digest(&got), d);
    assert!(session_files().is_empty(), "{:?}", session_files());
}

/// What one blob push of `size` bytes (a chunk of half, then the rest with the commit) looked
/// like to `strace` attached to the server (with `fsync` on or off in its configuration): the
/// lines of its file syncs, write-back advice and socket writes, in order.
async fn traced_push(fsync: bool, size: usize) -> (String, Vec<String>) {
    let strace = crate::support::which("strace")
        .expect("strace is not installed: `apt-get install strace` (./scripts/test does it)");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let p = crate::support::spawn_berth_with(&data, Some(&format!("fsync = {fsync}\n")));
    let root = p.root();
    let c = crate::support::client();
    let blob = random(size, 7);
    let d = digest(&blob);
    let r = c
        .post(format!("{root}/v2/sync/test/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_owned();

    let out = dir.path().join("strace.out");
    let err = std::fs::File::create(dir.path().join("strace.err")).unwrap();
    let mut tracer = std::process::Command::new(strace)
        .args(["-f", "-y", "-s", "32", "-e"])
        .arg("trace=fsync,fdatasync,fadvise64,write,writev,sendto,sendmsg")
        .arg("-o")
        .arg(&out)
        .arg("-p")
        .arg(p.child.id().to_string())
        .stderr(err)
        .spawn()
        .unwrap();
    // strace says "Process N attached with M threads" once it holds them all.
    let attached = || {
        std::fs::read_to_string(dir.path().join("strace.err")).is_ok_and(|t| t.contains("attached"))
    };
    for _ in 0..100 {
        if attached() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(attached(), "strace did not attach to the server");
    // A chunk, then the rest with the commit.
    let half = blob.len() / 2;
    let loc = send_chunk(&c, &format!("{root}{loc}"), 0, &blob[..half]).await;
    let r = c
        .put(format!("{root}{loc}?digest={d}"))
        .body(blob[half..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // SIGINT: strace detaches from the server and flushes its output before it exits.
    let _ = std::process::Command::new("kill")
        .args(["-INT", &tracer.id().to_string()])
        .status();
    let _ = tracer.wait();
    let lines = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    (d.trim_start_matches("sha256:").to_owned(), lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_push_is_on_the_disk_before_its_answer() {
    let (hex, lines) = traced_push(true, 100_000).await;
    let at = |what: &dyn Fn(&str) -> bool| lines.iter().position(|l| what(l));
    let answer = at(&|l| l.contains("201 Created")).expect("the 201 answer was traced");
    let synced = |l: &str, name: &str| {
        (l.contains("fsync(") || l.contains("fdatasync(")) && l.contains(name)
    };
    let blob = at(&|l| synced(l, &format!("/{hex}>")))
        .unwrap_or_else(|| panic!("the blob's file was never synced:\n{}", lines.join("\n")));
    let dir = at(&|l| synced(l, &format!("/{}>", &hex[..2])))
        .expect("the blob's directory was never synced");
    let wal = lines[blob..]
        .iter()
        .position(|l| synced(l, "berth.db-wal>"))
        .map(|i| blob + i)
        .expect("no SQLite commit was synced after the blob");
    assert!(
        blob < answer && dir < answer && wal < answer,
        "synced after the answer (blob {blob}, directory {dir}, WAL {wal}, answer {answer}):\n{}",
        lines.join("\n")
    );
    // A chunk's acknowledgement promises nothing a power cut could break (its bytes are not
    // synced; the digest check at the end catches a loss), so it does not wait for the disk.
    let chunk = at(&|l| l.contains("202 Accepted")).expect("the 202 answer was traced");
    assert!(
        !lines[..chunk].iter().any(|l| synced(l, "berth.db-wal>")),
        "the chunk's answer waited for a sync of the WAL:\n{}",
        lines.join("\n")
    );

    // The same push with `fsync = false` syncs neither: the check above can tell.
    let (hex, lines) = traced_push(false, 100_000).await;
    assert!(lines.iter().any(|l| l.contains("201 Created")));
    assert!(
        !lines
            .iter()
            .any(|l| synced(l, &format!("/{hex}>")) || synced(l, "berth.db-wal>")),
        "fsync = false still synced:\n{}",
        lines.join("\n")
    );
}

/// A large body starts for the disk while it arrives: every 8 MiB written into the upload's
/// file, the server asks the kernel to begin writing those bytes back, so the sync before the
/// `201` finds little left to do; each request also asks for its last bytes, however few, so
/// a chunk does not wait for its commit. 40 MiB in two requests of 20 MiB is two requests
/// each, plus one for each request's tail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_push_is_written_back_while_it_arrives() {
    let (_, lines) = traced_push(true, 40 << 20).await;
    let at = |what: &str| {
        lines
            .iter()
            .position(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no {what} answer was traced"))
    };
    let kicks = |lines: &[String]| {
        lines
            .iter()
            .filter(|l| l.contains("fadvise64(") && l.contains("POSIX_FADV_DONTNEED"))
            .cloned()
            .collect::<Vec<_>>()
    };
    let (chunk, answer) = (at("202 Accepted"), at("201 Created"));
    assert_eq!(
        (kicks(&lines[..chunk]).len(), kicks(&lines[..answer]).len()),
        (3, 6),
        "write-back requests before the 202 and the 201:\n{}",
        lines.join("\n")
    );
    let all = kicks(&lines);
    assert!(
        all.iter().all(|l| l.contains("/uploads/")),
        "write-back asked for another file than the upload's: {all:#?}"
    );
}
