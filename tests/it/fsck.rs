//! `berth fsck`: run beside a live server on the same data, against damage done by hand to the
//! blob files (a layer deleted, one cut short, one flipped, an object with no row, an upload
//! session's file gone). It finds each, `--repair` fixes what is safe, re-pushes heal the
//! images, and the registry checks clean again.

use std::path::Path;
use std::process::Command;

use crate::support::{Image, TestServer, digest};

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn fsck(data: &Path, flags: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("fsck")
        .arg("--data")
        .arg(data)
        .args(flags)
        .output()
        .expect("run berth fsck");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn blob_file(data: &Path, blob: &[u8]) -> std::path::PathBuf {
    let d = digest(blob);
    let hex = d.trim_start_matches("sha256:");
    data.join("objects/blobs/sha256").join(&hex[..2]).join(hex)
}

/// Sets a file's modification time two hours back (older than the default grace).
fn age_file(path: &Path) {
    let ok = Command::new("touch")
        .args(["-d", "2 hours ago"])
        .arg(path)
        .status()
        .expect("touch")
        .success();
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsck_finds_missing_short_corrupt_and_orphan_objects_and_repair_lets_pushes_heal() {
    let s = TestServer::start().await;
    let root = s.root();
    let data = s.dir.path().to_owned();
    let images: Vec<Image> = (0..4)
        .map(|i| Image::new(700 + i, &[40_000, 70_000]))
        .collect();
    for (i, image) in images.iter().enumerate() {
        image
            .push_like_docker(&root, "fsck/app", &format!("v{i}"))
            .await
            .unwrap();
    }
    // An upload session with one committed chunk, left open.
    let c = crate::support::client();
    let r = c
        .post(format!("{root}/v2/fsck/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    let r = c
        .patch(format!("{root}{loc}"))
        .header("content-range", "0-9999")
        .body(vec![7u8; 10_000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    let run = fsck(&data, &["--verify-digests"]);
    assert!(run.ok, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("checked 12 blobs") && run.stdout.contains("clean"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("verified 12 digests"), "{}", run.stdout);
    assert!(
        run.stderr.contains("verified 12/12 blobs"),
        "progress: {}",
        run.stderr
    );

    // Damage: image 0's first layer gone, image 1's cut short, image 2's flipped (same size),
    // an old object no row knows, the open session's file gone.
    let [a, b, cc, _] = &images[..] else {
        unreachable!()
    };
    std::fs::remove_file(blob_file(&data, &a.blobs[1])).unwrap();
    let short = blob_file(&data, &b.blobs[1]);
    std::fs::write(&short, &b.blobs[1][..1000]).unwrap();
    let flipped = blob_file(&data, &cc.blobs[1]);
    let mut bytes = cc.blobs[1].clone();
    bytes[123] ^= 0xff;
    std::fs::write(&flipped, &bytes).unwrap();
    let stray = crate::support::noise(5000, 99);
    let stray_path = blob_file(&data, &stray);
    std::fs::create_dir_all(stray_path.parent().unwrap()).unwrap();
    std::fs::write(&stray_path, &stray).unwrap();
    age_file(&stray_path);
    let young = crate::support::noise(3000, 98);
    let young_path = blob_file(&data, &young);
    std::fs::create_dir_all(young_path.parent().unwrap()).unwrap();
    std::fs::write(&young_path, &young).unwrap();
    let session = loc.rsplit('/').next().unwrap();
    std::fs::remove_file(data.join(format!("objects/uploads/{session}.data"))).unwrap();

    // Without hashing: the missing and the short blob, the orphan, the session.
    let run = fsck(&data, &[]);
    assert!(!run.ok, "problems exit non-zero");
    let out = &run.stdout;
    assert!(
        out.contains(&format!("bad blob {}: object missing", digest(&a.blobs[1]))),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "bad blob {}: object has 1000 bytes, recorded 40000",
            digest(&b.blobs[1])
        )),
        "{out}"
    );
    assert!(
        !out.contains(&digest(&cc.blobs[1])),
        "not hashed, the flip is invisible: {out}"
    );
    assert!(
        out.contains(&format!("orphan object {}", digest(&stray))),
        "{out}"
    );
    assert!(
        !out.contains(&digest(&young)),
        "a young object may be a commit in progress: {out}"
    );
    assert!(
        out.contains(&format!("broken upload session {session}")),
        "{out}"
    );
    assert!(
        out.contains(&format!("broken image fsck/app@{} (tags: v0)", a.digest())),
        "{out}"
    );
    assert!(
        out.contains(&format!("broken image fsck/app@{} (tags: v1)", b.digest())),
        "{out}"
    );
    assert!(out.contains("4 problems"), "{out}");

    // With hashing, the flipped layer too.
    let run = fsck(&data, &["--verify-digests"]);
    assert!(!run.ok);
    assert!(
        run.stdout.contains(&format!(
            "bad blob {}: content hashes to",
            digest(&cc.blobs[1])
        )),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("5 problems"), "{}", run.stdout);

    // Repair, beside the running server. A blob touched in the second the check starts is
    // left alone (times are in whole seconds): start it in a later second than the pushes.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let run = fsck(&data, &["--verify-digests", "--repair"]);
    assert!(
        run.ok,
        "everything found is repairable: {}{}",
        run.stdout, run.stderr
    );
    assert!(
        run.stdout.contains("5 problems, 5 repaired, 0 left"),
        "{}",
        run.stdout
    );
    // The bad blobs now read as absent, so a docker-like push uploads them again.
    for (i, image) in images.iter().enumerate().take(3) {
        let d = digest(&image.blobs[1]);
        let r = c
            .head(format!("{root}/v2/fsck/app/blobs/{d}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "bad blob of image {i} reads as absent");
        image
            .push_like_docker(&root, "fsck/app", &format!("v{i}"))
            .await
            .unwrap();
    }
    for (i, image) in images.iter().enumerate() {
        image
            .pull(&root, "fsck/app", &format!("v{i}"), "")
            .await
            .unwrap_or_else(|e| panic!("image {i} after repair and re-push: {e}"));
    }
    let r = c.get(format!("{root}{loc}")).send().await.unwrap();
    assert_eq!(r.status(), 404, "the broken session was ended");
    let run = fsck(&data, &["--verify-digests"]);
    assert!(run.ok, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.ends_with("clean\n"), "{}", run.stdout);
    drop(s);
}
