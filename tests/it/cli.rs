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

/// Runs `berth` with `args`, expecting it to exit with an error within 20 s: its standard
/// error, or `None` if it succeeded or was still running (then it is killed).
fn refused(args: &[&str]) -> Option<String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run berth");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read as _;
                let _ = e.read_to_string(&mut err);
            }
            return (!status.success()).then_some(err);
        }
        if std::time::Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
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

/// Broken configurations, each with what the refusal must name: `check-config` and `serve`
/// refuse every one, with the same message, before anything starts.
#[test]
fn check_config_and_serve_refuse_the_same_broken_configurations() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = crate::pki::Ca::new(d, "ca");
    let good = ca.server(&d.join("good.crt"), &d.join("good.key"));
    let other = ca.server(&d.join("other.crt"), &d.join("other.key"));
    std::fs::write(d.join("garbage.pem"), "not pem at all\n").unwrap();
    std::fs::write(d.join("a-file"), "x").unwrap();
    std::fs::write(
        d.join("md5.htpasswd"),
        "bob:$apr1$abc$defghijklmnopqrstuv\n",
    )
    .unwrap();
    std::fs::write(
        d.join("bad.key"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let p = |name: &str| d.join(name).display().to_string();
    let tls = |cert: &str, key: &str| format!("[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n");
    let basic = |extra: &str| {
        format!(
            "[auth]\nmode = \"basic\"\nhtpasswd = \"{}\"\n{extra}",
            p("md5.htpasswd")
        )
    };
    let s3 = |extra: &str| format!("[storage]\nbackend = \"s3\"\nbucket = \"b\"\n{extra}");
    let cases: Vec<(String, &str)> = vec![
        (tls(&p("good.crt"), &p("missing.key")), "missing.key"),
        (tls(&p("good.crt"), d.to_str().unwrap()), "tls"),
        (tls(&p("good.crt"), &p("other.key")), "tls"),
        (tls(&p("good.crt"), &p("garbage.pem")), "garbage.pem"),
        (tls(&p("missing.crt"), &p("good.key")), "missing.crt"),
        (format!("{}client_ca = \"{}\"\n", tls(&p("good.crt"), &p("good.key")), p("missing-ca.crt")), "missing-ca.crt"),
        ("[tls]\ncert = \"/x.crt\"\n".into(), "cert and key go together"),
        (basic(""), "only bcrypt hashes"),
        ("[auth]\nmode = \"basic\"\nhtpasswd = \"/nonexistent/users\"\n".into(), "/nonexistent/users"),
        (format!("[auth]\nmode = \"token\"\nhtpasswd = \"{}\"\n[auth.token]\nkey = \"{}\"\n", p("md5.htpasswd"), p("bad.key")), "auth"),
        (format!("[auth]\nmode = \"token\"\n[[auth.token.trusted]]\nissuer = \"corp\"\nkey = \"{}\"\n", p("missing.pem")), "missing.pem"),
        ("[auth.token]\nttl = \"0s\"\n".into(), "ttl"),
        (format!("data = \"{}\"\n", p("a-file")), "is not a directory"),
        (format!("[storage]\nroot = \"{}\"\n", p("a-file")), "storage.root"),
        (s3("endpoint = \"minio:9000\"\n"), "must start with https://"),
        (s3("endpoint = \"http://minio:9000\"\n"), "allow_http"),
        (s3(&format!("secret_access_key_file = \"{}\"\n", p("missing-secret"))), "missing-secret"),
        (s3("redirect_expiry = \"30d\"\n"), "redirect_expiry"),
        (s3("service_account_key = \"/k.json\"\n"), "service_account_key"),
        ("[storage]\nbackend = \"azure\"\nbucket = \"c\"\nregion = \"eu\"\n".into(), "region"),
        ("[storage]\nbackend = \"gcs\"\nbucket = \"c\"\naccess_key_id = \"x\"\n".into(), "access_key_id"),
        (format!("[storage]\nbackend = \"gcs\"\nbucket = \"c\"\nservice_account_key = \"{}\"\n", p("missing-sa.json")), "missing-sa.json"),
        (format!("[storage]\nbackend = \"gcs\"\nbucket = \"c\"\nservice_account_key = \"{}\"\n", p("a-file")), "service_account_key"),
        ("[storage]\nbackend = \"gcs\"\nbucket = \"c\"\nendpoint = \"http://127.0.0.1:4443\"\n".into(), "allow_http"),
        ("[[proxy.upstream]]\nname = \"hub\"\nurl = \"https://registry-1.docker.io\"\nusername = \"u\"\npassword_file = \"/nonexistent/pw\"\n".into(), "/nonexistent/pw"),
        ("[gc]\ngrace = \"1s\"\n".into(), "gc.grace"),
        ("[registry]\nupload_expiry = \"1s\"\n".into(), "upload_expiry"),
        ("[limits]\nmax_connections = 0\n".into(), "limits.max_connections"),
        ("[limits]\nbody_timeout = \"0s\"\n".into(), "limits.body_timeout"),
        ("public_url = \"registry.example\"\n".into(), "public_url"),
        ("[log]\nlevel = \"not a [filter\"\n".into(), "log.level"),
        ("[metadata]\nbackend = \"postgres\"\n".into(), "metadata"),
        ("[storage]\nbakend = \"s3\"\n".into(), "bakend"),
    ];
    let _keep = (&good, &other);
    assert!(cases.len() >= 30);
    for (i, (text, names)) in cases.iter().enumerate() {
        let file = d.join(format!("case{i}.toml"));
        std::fs::write(&file, text).unwrap();
        let (ok, checked) = berth(&["check-config", file.to_str().unwrap()]);
        assert!(!ok, "check-config accepted case {i}:\n{text}");
        assert!(
            checked.contains(names),
            "case {i}: check-config does not name {names:?}: {checked}"
        );
        let data = d.join(format!("data{i}"));
        let mut args = vec![
            "serve",
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ];
        if !text.contains("data = ") {
            args.extend(["--data", data.to_str().unwrap()]);
        }
        let served =
            refused(&args).unwrap_or_else(|| panic!("serve started with case {i}:\n{text}"));
        assert!(
            served.contains(names),
            "case {i}: serve does not name {names:?}: {served}"
        );
        if !text.contains("data = ") {
            assert!(
                !data.exists(),
                "case {i}: serve wrote {} before refusing",
                data.display()
            );
        }
    }
    // And a good one passes both ways.
    let file = d.join("good.toml");
    std::fs::write(&file, tls(&p("good.crt"), &p("good.key"))).unwrap();
    let (ok, err) = berth(&["check-config", file.to_str().unwrap()]);
    assert!(ok, "{err}");
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
    // A data directory that is a file is named once.
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
    assert_eq!(err.matches("is not a directory").count(), 1, "{err}");
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
            // The files they name (/etc/berth/…, /run/secrets/…) exist where they run.
            let (ok, err) = berth(&["check-config", "--no-files", p.to_str().unwrap()]);
            assert!(ok, "{}: {err}", p.display());
            n += 1;
        }
    }
    assert!(n >= 2, "only {n} config files under deploy/config");
}

/// The keys a section accepts, as the config types say: `check-config` on a file with an unknown
/// key in that section names every key it expected.
fn accepted_keys(probe: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("probe.toml");
    std::fs::write(&file, format!("{probe}\n__probe = 1\n")).unwrap();
    let (ok, out) = berth(&["check-config", file.to_str().unwrap(), "--no-files"]);
    assert!(!ok, "an unknown key was accepted in {probe:?}");
    let (_, list) = out
        .split_once("expected one of")
        .or_else(|| out.split_once("expected"))
        .unwrap_or_else(|| panic!("no list of expected keys for {probe:?}: {out}"));
    list.lines()
        .next()
        .unwrap_or_default()
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// Every (section, key) the README's TOML examples show, commented-out ones included; a table
/// header `[a.b]` documents `b` in `a` and `a` at the top.
fn documented_keys() -> std::collections::BTreeSet<(String, String)> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut keys = std::collections::BTreeSet::new();
    for block in readme.split("```toml\n").skip(1) {
        let block = block.split("```").next().unwrap_or_default();
        let mut section = String::new();
        for line in block.lines() {
            let line = line.trim().trim_start_matches('#').trim();
            if let Some(header) = line.strip_prefix('[') {
                let name: String = header
                    .trim_start_matches('[')
                    .chars()
                    .take_while(|c| *c != ']')
                    .collect();
                let parts: Vec<&str> = name.split('.').collect();
                for i in 0..parts.len() {
                    keys.insert((parts[..i].join("."), parts[i].to_owned()));
                }
                section = name;
            } else if let Some((key, _)) = line.split_once('=') {
                let key = key.trim();
                if !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    keys.insert((section.clone(), key.to_owned()));
                }
            }
        }
    }
    keys
}

/// The README documents every configuration key the config types accept, in an example under
/// its section: a key added without documentation fails here.
#[test]
fn the_readme_documents_every_configuration_key() {
    let documented = documented_keys();
    let probes = [
        ("", ""),
        ("storage", "[storage]\nbackend = \"filesystem\""),
        ("storage", "[storage]\nbackend = \"s3\""),
        ("storage", "[storage]\nbackend = \"azure\""),
        ("storage", "[storage]\nbackend = \"gcs\""),
        ("metadata", "[metadata]\nbackend = \"sqlite\""),
        ("metadata", "[metadata]\nbackend = \"postgres\""),
        ("registry", "[registry]"),
        ("gc", "[gc]"),
        ("log", "[log]"),
        ("limits", "[limits]"),
        ("ui", "[ui]"),
        ("tls", "[tls]"),
        ("auth", "[auth]"),
        ("auth.token", "[auth.token]"),
        ("auth.token.trusted", "[[auth.token.trusted]]"),
        ("auth.rule", "[[auth.rule]]"),
        ("proxy", "[proxy]"),
        ("proxy.upstream", "[[proxy.upstream]]"),
    ];
    let mut missing = Vec::new();
    for (section, probe) in probes {
        for key in accepted_keys(probe) {
            // The storage and metadata backends are chosen by `backend`.
            if !documented.contains(&(section.to_owned(), key.clone())) {
                missing.push(format!("{section}.{key}"));
            }
        }
    }
    missing.sort();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "configuration keys the README does not show in a TOML example: {missing:?}"
    );
}
