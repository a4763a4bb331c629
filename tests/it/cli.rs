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

#[test]
fn start_up_errors_name_what_failed_once() {
    let dir = tempfile::tempdir().unwrap();
    // An htpasswd line made by `htpasswd -m` (not bcrypt): an authentication error, not storage.
    let users = dir.path().join("users");
    std::fs::write(&users, "bob:$apr1$abc$defghijklmnopqrstuv\n").unwrap();
    let config = dir.path().join("auth.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nmode = \"basic\"\nhtpasswd = \"{}\"\n",
            users.display()
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let (ok, err) = berth(&[
        "serve",
        "--config",
        config.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(!ok);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("only bcrypt hashes") && last.contains("line 1"),
        "{err}"
    );
    assert!(!err.contains("opening storage"), "mislabelled: {err}");
    assert!(
        !err.contains("Caused by"),
        "one line, each cause once: {err}"
    );
    // A storage error says so once.
    let file = dir.path().join("file");
    std::fs::write(&file, "not a directory").unwrap();
    let (ok, err) = berth(&[
        "serve",
        "--data",
        file.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(!ok);
    assert_eq!(err.matches("opening storage").count(), 1, "{err}");
}

#[test]
fn healthcheck_answers_for_a_running_berth_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = crate::support::spawn_berth(&dir.path().join("data"));
    let (ok, err) = berth(&["healthcheck", "--listen", &p.addr.to_string()]);
    assert!(ok, "{err}");
    // The start-up line says what the server runs with, as plain text (no colour codes in a
    // file).
    let log = std::fs::read_to_string(dir.path().join("data.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("berth listening"))
        .unwrap_or_else(|| panic!("no start-up line in:\n{log}"));
    for field in [
        "storage=\"filesystem\"",
        "metadata=\"sqlite\"",
        "auth=\"none\"",
        "data=",
    ] {
        assert!(line.contains(field), "{field} missing from {line:?}");
    }
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log}"
    );
    let port = p.addr.port();
    p.sigkill();
    let (ok, _) = berth(&["healthcheck", "--listen", &format!("0.0.0.0:{port}")]);
    assert!(!ok, "healthy with nothing listening");
}

#[test]
fn every_shipped_config_file_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/config");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let (ok, err) = berth(&["check-config", p.to_str().unwrap()]);
            assert!(ok, "{}: {err}", p.display());
            n += 1;
        }
    }
    assert!(n >= 2, "only {n} config files under deploy/config");
}
