//! The `berth` command line.

use std::process::Command;

fn berth(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .output()
        .expect("run berth");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_accepts_good_files_and_names_bad_keys() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "listen = \"127.0.0.1:5000\"\n[registry]\ndelete_enabled = false\n",
    )
    .unwrap();
    let (ok, err) = berth(&["check-config", good.to_str().unwrap()]);
    assert!(ok, "{err}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[storage]\nbakend = \"memory\"\n").unwrap();
    let (ok, err) = berth(&["check-config", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("bakend") && err.contains("bad.toml"), "{err}");
    let (ok, err) = berth(&["check-config", "/nonexistent/berth.toml"]);
    assert!(!ok && err.contains("/nonexistent/berth.toml"), "{err}");
}

#[test]
fn serve_refuses_a_bad_config_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "listen = 5\n").unwrap();
    let (ok, err) = berth(&["serve", "--config", bad.to_str().unwrap()]);
    assert!(!ok && err.contains("listen"), "{err}");
}
