//! A full disk: Berth's data on a small tmpfs the test mounts (CI runs as root). Pushes until
//! the disk is full get a clear 507, never a hang; reads, deletes, `berth gc` and a restart
//! keep working; once a collection frees space, pushes work again without a restart.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{Image, Push, TestServer};

/// A size-limited tmpfs, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a {mib} MiB tmpfs needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

async fn start_on(data: &Path) -> TestServer {
    let data = data.to_owned();
    TestServer::start_with(move |c| {
        c.data = data;
        c.limits.disk_reserve = bytesize::ByteSize::mib(4);
    })
    .await
}

fn ready_text(body: &str) -> bool {
    body.contains("storage full")
}

/// Pushes 2 MiB images as `repo:v<n>` until one is refused; the pushed images and the refusal.
async fn fill(root: &str, repo: &str, seed: u64) -> (Vec<(String, Image)>, String) {
    let mut pushed: Vec<(String, Image)> = Vec::new();
    loop {
        let i = pushed.len();
        assert!(i < 40, "48 MiB should fill long before 40 images of 2 MiB");
        let image = Image::new(seed + i as u64, &[2 << 20]);
        let tag = format!("v{i}");
        let pushing = image.try_push(root, repo, &tag, Push::default());
        match tokio::time::timeout(Duration::from_secs(30), pushing).await {
            Ok(Ok(_)) => pushed.push((tag, image)),
            Ok(Err(refusal)) => return (pushed, refusal),
            Err(_) => panic!("push {i} hung on a full disk"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_pushes_clearly_keeps_reads_deletes_gc_and_restarts_and_recovers() {
    let fs = Tmpfs::mount(48);
    let data: PathBuf = fs.path().join("data");
    let s = start_on(&data).await;
    let root = s.root();
    assert!(
        data.join("reserve.bin").exists(),
        "the reserve is made at start"
    );

    // Every answer comes back (no hang, no reset); the refusal says what is wrong.
    let (pushed, refusal) = fill(&root, "full/app", 9000).await;
    assert!(pushed.len() >= 5, "only {} images fit", pushed.len());
    assert!(refusal.contains("507"), "{refusal}");
    assert!(
        refusal.contains("UNAVAILABLE") && refusal.contains("storage is full"),
        "{refusal}"
    );
    assert!(
        !data.join("reserve.bin").exists(),
        "the reserve was released"
    );

    let c = crate::support::client();
    let started = Instant::now();
    let r = c
        .post(format!("{root}/v2/full/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 507, "a push is refused up front while full");
    assert!(started.elapsed() < Duration::from_secs(2));
    let r = c.get(format!("{root}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "still ready: pulls work");
    assert!(ready_text(&r.text().await.unwrap()));
    for (tag, image) in &pushed {
        image.pull(&root, "full/app", tag, "").await.unwrap();
    }

    // Deletes work on the full disk.
    let (gone, kept) = pushed.split_at(pushed.len() / 2);
    for (tag, image) in gone {
        let r = c
            .delete(format!("{root}/v2/full/app/manifests/{}", image.digest()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "delete of {tag} on a full disk");
    }
    // `berth gc` from outside runs on the full disk (its grace keeps these fresh blobs).
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["gc", "--data"])
        .arg(&data)
        .output()
        .expect("berth gc");
    assert!(
        out.status.success(),
        "berth gc on a full disk: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The collection that frees them (as if the grace period had passed).
    s.state.store().meta().age_for_tests(7200).await.unwrap();
    let policy = berth_storage::GcPolicy {
        grace: Duration::ZERO,
        ..berth_storage::GcPolicy::default()
    };
    let report = s.state.store().gc(&policy, false).await.unwrap();
    assert!(report.blobs >= gone.len() as u64, "{report}");

    // Without a restart, the server sees the space, puts its reserve back and takes pushes.
    let until = Instant::now() + Duration::from_secs(15);
    let fresh = Image::new(9999, &[1 << 20]);
    loop {
        match fresh
            .try_push(&root, "full/app", "after", Push::default())
            .await
        {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < until, "pushes stay refused after GC: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(data.join("reserve.bin").exists(), "the reserve is back");
    let r = c.get(format!("{root}/readyz")).send().await.unwrap();
    assert!(!ready_text(&r.text().await.unwrap()));
    for (tag, image) in kept {
        image.pull(&root, "full/app", tag, "").await.unwrap();
    }
    fresh.pull(&root, "full/app", "after", "").await.unwrap();

    // Full again, then a restart on the full disk: it starts and serves every image.
    let (more, refusal) = fill(&root, "full/more", 9500).await;
    assert!(refusal.contains("507"), "{refusal}");
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = start_on(&data).await;
    let root = s.root();
    let every = kept
        .iter()
        .map(|(t, i)| ("full/app", t, i))
        .chain(more.iter().map(|(t, i)| ("full/more", t, i)));
    for (repo, tag, image) in every {
        image
            .pull(&root, repo, tag, "")
            .await
            .unwrap_or_else(|e| panic!("{repo}:{tag} after a restart on a full disk: {e}"));
    }
}
