//! The conformance runner against Berth (every check must pass) and against the reference
//! registry (it must report exactly Distribution 2.8's known gaps, proving the checks can fail).

use std::collections::BTreeSet;

use berth_conformance::{Config, run};

use crate::support::{
    DistributionAuth, TestServer, require, spawn_distribution, spawn_distribution_with,
    start_token_server,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_passes_every_check() {
    let s = TestServer::start().await;
    let report = run(Config::new(&s.root(), "conformance/berth"), false)
        .await
        .expect("run");
    assert_all_pass(&report);
}

fn assert_all_pass(report: &berth_conformance::Report) {
    let failures: Vec<String> = report
        .failures()
        .iter()
        .map(|o| {
            format!(
                "{}: {}: {}",
                o.workflow,
                o.name,
                o.result.clone().err().unwrap_or_default()
            )
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{}\n{}",
        report.summary(),
        failures.join("\n")
    );
    assert!(report.passed() > 100, "only {} checks ran", report.passed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_passes_on_memory_storage_too() {
    let s = TestServer::start_with(|c| c.storage = berth::config::StorageSection::Memory).await;
    let report = run(Config::new(&s.root(), "conformance/memory"), false)
        .await
        .expect("run");
    assert!(report.failures().is_empty(), "{:?}", report.failures());
}

/// Distribution 2.8's gaps, each a check that a spec-following registry passes.
const DISTRIBUTION_GAPS: &[(&str, &str)] = &[
    // The referrers API (spec 1.1) is absent: 404.
    (
        "discovery",
        "referrers of an unknown digest: 200, an empty OCI index",
    ),
    (
        "discovery",
        "referrers of an image list all five referrers with their annotations",
    ),
    ("discovery", "referrers filtered by artifactType"),
    ("discovery", "referrers of a subject that was never pushed"),
    // No OCI-Subject header on pushes with a subject.
    (
        "discovery",
        "push artifact typed by config before its subject: 201 with OCI-Subject",
    ),
    (
        "discovery",
        "push artifact typed by artifactType before its subject: 201 with OCI-Subject",
    ),
    (
        "discovery",
        "push index artifact before its subject: 201 with OCI-Subject",
    ),
    (
        "discovery",
        "push artifact B typed by config: 201 with OCI-Subject",
    ),
    (
        "discovery",
        "push artifact B typed by artifactType: 201 with OCI-Subject",
    ),
    (
        "discovery",
        "push artifact with a missing subject: 201 with OCI-Subject",
    ),
    // Tag listing ignores n and last.
    ("discovery", "GET tags/list?n= returns exactly n tags"),
    (
        "discovery",
        "GET tags/list?n=&last= continues strictly after last",
    ),
    (
        "extras",
        "tags/list pages of 2 joined by Link hold every tag once, in order",
    ),
    // Upload offsets live in the URL's _state, not on the server: chunk order is not checked,
    // and an earlier Location of the same session is refused.
    ("push", "chunked upload: a chunk out of order is 416"),
    (
        "push",
        "chunked upload: the same chunk again on the first Location is 416",
    ),
    ("push", "chunked upload: GET status is 204 with Range 0-21"),
    // A malformed digest reference is looked up as a tag and fails with 500.
    ("pull", "GET manifest with an invalid digest is 400 or 404"),
    // Tag deletion answers 400 DIGEST_INVALID where the suite wants UNSUPPORTED.
    (
        "management",
        "DELETE by tag removes only that tag (or is unsupported)",
    ),
    // An unknown upload id is BLOB_UPLOAD_INVALID rather than BLOB_UPLOAD_UNKNOWN.
    (
        "extras",
        "an unknown upload session is 404 BLOB_UPLOAD_UNKNOWN",
    ),
    // Oversized manifests get 400 MANIFEST_INVALID instead of 413.
    ("extras", "a manifest of about 4097 KiB is 413"),
];

fn failed_checks(report: &berth_conformance::Report) -> BTreeSet<(String, String)> {
    report
        .failures()
        .iter()
        .map(|o| (o.workflow.to_owned(), o.name.clone()))
        .collect()
}

fn known_gaps() -> BTreeSet<(String, String)> {
    DISTRIBUTION_GAPS
        .iter()
        .map(|(w, n)| ((*w).to_owned(), (*n).to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distribution_fails_exactly_its_known_gaps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = spawn_distribution(dir.path());
    let report = run(Config::new(&reg.root(), "conformance/distribution"), false)
        .await
        .expect("run");
    let (failed, expected) = (failed_checks(&report), known_gaps());
    let unexpected: Vec<_> = failed.difference(&expected).collect();
    let missing: Vec<_> = expected.difference(&failed).collect();
    assert!(
        unexpected.is_empty() && missing.is_empty(),
        "failed but not a known gap: {unexpected:#?}\nknown gap that passed: {missing:#?}\n{:#?}",
        report.failures()
    );
    assert!(
        report.passed() > 80,
        "only {} checks passed",
        report.passed()
    );
}

/// With credentials the runner answers Basic challenges too: against Distribution with an
/// htpasswd file it gets in, and reports the same gaps as without auth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_work_against_distribution_with_basic_auth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let htpasswd = dir.path().join("htpasswd");
    let out = std::process::Command::new(require("htpasswd"))
        .args(["-Bbc"])
        .arg(&htpasswd)
        .args(["tester", "s3cret"])
        .output()
        .expect("htpasswd");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reg = spawn_distribution_with(dir.path(), Some(DistributionAuth::Htpasswd(&htpasswd)));
    let mut cfg = Config::new(&reg.root(), "conformance/basic");
    cfg.credentials = Some(("tester".into(), "s3cret".into()));
    let report = run(cfg.clone(), false).await.expect("run");
    let auth: Vec<_> = report
        .outcomes
        .iter()
        .filter(|o| o.workflow == "auth")
        .collect();
    assert_eq!(auth.len(), 2);
    assert!(auth.iter().all(|o| o.result.is_ok()), "{auth:#?}");
    let (failed, expected) = (failed_checks(&report), known_gaps());
    assert_eq!(failed, expected);
    // Wrong credentials: every authenticated check fails.
    cfg.credentials = Some(("tester".into(), "wrong".into()));
    let report = run(cfg, false).await.expect("run");
    assert!(
        report.passed() < 10,
        "{} checks passed with a wrong password",
        report.passed()
    );
}

/// The Docker token flow: against Distribution with token auth and a token server started
/// here, the runner follows each 401 challenge to the realm, gets a token for the scope it
/// names, and retries; the auth checks pass and the gaps are the usual ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_flow_against_distribution_with_token_auth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (token_server, realm, cert) = start_token_server(dir.path());
    let reg = spawn_distribution_with(
        dir.path(),
        Some(DistributionAuth::Token {
            realm: &realm,
            service: "berth-test",
            cert: &cert,
        }),
    );
    let mut cfg = Config::new(&reg.root(), "conformance/token");
    cfg.credentials = Some(("tester".into(), "s3cret".into()));
    let report = run(cfg, false).await.expect("run");
    let auth: Vec<_> = report
        .outcomes
        .iter()
        .filter(|o| o.workflow == "auth")
        .collect();
    assert_eq!(auth.len(), 2);
    assert!(auth.iter().all(|o| o.result.is_ok()), "{auth:#?}");
    assert_eq!(failed_checks(&report), known_gaps());
    drop(token_server);
}

/// A Berth with users in htpasswd and the given auth mode; `tester` is an admin.
async fn berth_with_auth(mode: berth::config::AuthMode) -> TestServer {
    TestServer::start_with(|c| {
        crate::support::with_users(c, mode, &[("tester", "s3cret")]);
        c.auth.admins = vec!["tester".into()];
    })
    .await
}

/// Every check, plus the auth workflow, against Berth's own token service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_passes_every_check_with_token_auth() {
    let s = berth_with_auth(berth::config::AuthMode::Token).await;
    let mut cfg = Config::new(&s.root(), "conformance/token");
    cfg.credentials = Some(("tester".into(), "s3cret".into()));
    let report = run(cfg.clone(), false).await.expect("run");
    assert_all_pass(&report);
    assert_eq!(
        report
            .outcomes
            .iter()
            .filter(|o| o.workflow == "auth")
            .count(),
        2
    );
    cfg.credentials = Some(("tester".into(), "wrong".into()));
    let report = run(cfg, false).await.expect("run");
    assert!(
        report.passed() < 10,
        "{} checks passed with a wrong password",
        report.passed()
    );
}

/// Every check with Basic auth straight on the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_passes_every_check_with_basic_auth() {
    let s = berth_with_auth(berth::config::AuthMode::Basic).await;
    let mut cfg = Config::new(&s.root(), "conformance/basic");
    cfg.credentials = Some(("tester".into(), "s3cret".into()));
    let report = run(cfg, false).await.expect("run");
    assert_all_pass(&report);
}

/// Berth trusting an external token server (its certificate, `x5c` tokens, RS256): clients are
/// sent to that realm and Berth accepts what it signs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_passes_every_check_with_an_external_token_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (token_server, realm, cert) = start_token_server(dir.path());
    let s = TestServer::start_with(|c| {
        c.auth.mode = berth::config::AuthMode::Token;
        c.auth.token.service = "berth-test".into();
        c.auth.token.realm = Some(realm.clone());
        c.auth.token.trusted = vec![berth::config::TrustedSection {
            issuer: "berth-test-issuer".into(),
            key: Some(cert.clone()),
            jwks: None,
        }];
    })
    .await;
    let mut cfg = Config::new(&s.root(), "conformance/external");
    cfg.credentials = Some(("tester".into(), "s3cret".into()));
    let report = run(cfg, false).await.expect("run");
    assert_all_pass(&report);
    drop(token_server);
}
