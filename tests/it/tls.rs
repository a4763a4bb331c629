//! HTTPS: Berth terminates TLS itself, reloads rotated certificates, can require client
//! certificates, and announces an `https` token realm.

use std::path::Path;
use std::time::{Duration, Instant};

use berth::config::{AuthMode, ClientAuth, Config};
use reqwest::StatusCode;

use crate::pki::{Ca, Leaf};
use crate::support::TestServer;

/// A client trusting only `ca`, optionally presenting `identity`; a new connection per request.
fn https_client(ca: &Path, identity: Option<&Leaf>) -> reqwest::Client {
    https_client_pooled(ca, identity, 0)
}

fn https_client_pooled(ca: &Path, identity: Option<&Leaf>, pool: usize) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    let mut b = reqwest::Client::builder()
        .tls_certs_only([ca])
        .pool_max_idle_per_host(pool);
    if let Some(id) = identity {
        let mut pem = std::fs::read(&id.cert).unwrap();
        pem.extend(std::fs::read(&id.key).unwrap());
        b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    b.build().unwrap()
}

async fn tls_server(leaf: &Leaf, tweak: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start_with(|c| {
        c.tls.cert = Some(leaf.cert.clone());
        c.tls.key = Some(leaf.key.clone());
        tweak(c);
    })
    .await
}

fn https(s: &TestServer, path: &str) -> String {
    format!("https://127.0.0.1:{}{path}", s.addr.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_https_and_picks_up_a_rotated_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (Ca::new(dir.path(), "ca1"), Ca::new(dir.path(), "ca2"));
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let leaf = ca1.server(&cert, &key);
    let s = tls_server(&leaf, |_| {}).await;

    let r = https_client(&ca1.cert, None)
        .get(https(&s, "/v2/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        https_client(&ca2.cert, None)
            .get(https(&s, "/v2/"))
            .send()
            .await
            .is_err(),
        "a client that does not trust the CA must fail"
    );
    // Plain HTTP on the TLS port gets nowhere.
    let plain = crate::support::client().get(s.url("/v2/")).send().await;
    assert!(plain.map(|r| r.status() != StatusCode::OK).unwrap_or(true));

    // Rotate to a certificate from another CA, as cert-manager would, and wait for pickup.
    ca2.server(&cert, &key);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = https_client(&ca2.cert, None)
            .get(https(&s, "/v2/"))
            .send()
            .await
        {
            assert_eq!(r.status(), StatusCode::OK);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rotated certificate not served within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        https_client(&ca1.cert, None)
            .get(https(&s, "/v2/"))
            .send()
            .await
            .is_err()
    );

    // A broken rotation keeps the working certificate.
    std::fs::write(&cert, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_secs(11)).await;
    let r = https_client(&ca2.cert, None)
        .get(https(&s, "/v2/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_when_required_or_optional() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = (Ca::new(dir.path(), "ca"), Ca::new(dir.path(), "other"));
    let leaf = ca.server(&dir.path().join("tls.crt"), &dir.path().join("tls.key"));
    let good = ca.client(dir.path(), "builder");
    let stranger = other.client(dir.path(), "stranger");
    let s = tls_server(&leaf, |c| c.tls.client_ca = Some(ca.cert.clone())).await;
    let get = |id: Option<&Leaf>| https_client(&ca.cert, id).get(https(&s, "/v2/")).send();
    assert_eq!(get(Some(&good)).await.unwrap().status(), StatusCode::OK);
    assert!(get(None).await.is_err(), "no client certificate");
    assert!(
        get(Some(&stranger)).await.is_err(),
        "certificate from another CA"
    );

    let s = tls_server(&leaf, |c| {
        c.tls.client_ca = Some(ca.cert.clone());
        c.tls.client_auth = ClientAuth::Optional;
    })
    .await;
    let get = |id: Option<&Leaf>| https_client(&ca.cert, id).get(https(&s, "/v2/")).send();
    assert_eq!(get(None).await.unwrap().status(), StatusCode::OK);
    assert_eq!(get(Some(&good)).await.unwrap().status(), StatusCode::OK);
    assert!(
        get(Some(&stranger)).await.is_err(),
        "a certificate sent is still checked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_realm_follows_the_scheme_or_the_public_url() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let leaf = ca.server(&dir.path().join("tls.crt"), &dir.path().join("tls.key"));
    let auth = |c: &mut Config| crate::support::with_users(c, AuthMode::Token, &[("u", "p")]);
    let s = tls_server(&leaf, auth).await;
    let r = https_client(&ca.cert, None)
        .get(https(&s, "/v2/"))
        .send()
        .await
        .unwrap();
    let ch = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert_eq!(
        ch,
        format!(
            "Bearer realm=\"https://127.0.0.1:{}/auth/token\",service=\"berth\"",
            s.addr.port()
        )
    );
    // The whole token dance over HTTPS.
    let t: serde_json::Value = https_client(&ca.cert, None)
        .get(https(
            &s,
            "/auth/token?service=berth&scope=repository:a:pull",
        ))
        .basic_auth("u", Some("p"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = https_client(&ca.cert, None)
        .get(https(&s, "/v2/a/tags/list"))
        .bearer_auth(t["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "authorised, and nothing there"
    );

    let s = TestServer::start_with(|c| {
        auth(c);
        c.public_url = Some("https://registry.example.com/".into());
    })
    .await;
    let r = crate::support::client()
        .get(s.url("/v2/"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer realm=\"https://registry.example.com/auth/token\",service=\"berth\""
    );
}

/// Issue 20 over TLS: small answers on one kept-alive connection do not wait for delayed ACKs.
#[tokio::test]
async fn small_answers_over_tls_do_not_stall() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let leaf = ca.server(&dir.path().join("tls.crt"), &dir.path().join("tls.key"));
    let s = tls_server(&leaf, |_| {}).await;
    let c = https_client_pooled(&ca.cert, None, 1);
    let blob = vec![7u8; 415];
    let d = crate::support::digest(&blob);
    let r = c
        .post(https(&s, &format!("/v2/small/blobs/uploads/?digest={d}")))
        .body(blob)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let url = https(&s, &format!("/v2/small/blobs/{d}"));
    let median = crate::support::median_small_get(&c, &url, 24).await;
    assert!(
        median < Duration::from_millis(20),
        "median small GET over TLS took {median:?}: delayed-ACK stall"
    );
}

/// Plain HTTP sent to the TLS port gets a short plain-HTTP answer saying to use HTTPS, not TLS
/// alert bytes; HTTPS on the same port still works.
#[tokio::test]
async fn plain_http_on_the_tls_port_is_told_to_use_https() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let leaf = ca.server(&dir.path().join("tls.crt"), &dir.path().join("tls.key"));
    let s = tls_server(&leaf, |_| {}).await;
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out))
        .await
        .expect("answered and closed")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400"), "{text:?}");
    assert!(text.contains("this port speaks HTTPS"), "{text}");
    let c = https_client_pooled(&ca.cert, None, 1);
    let r = c.get(https(&s, "/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// Over TLS too, headers too large get hyper's 431 with an OCI error body. (hyper's limit is
/// approximate: a read that completes the headers just past it is accepted, so the test sends
/// far more.)
#[tokio::test]
async fn oversized_headers_over_tls_get_an_oci_error_body() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let leaf = ca.server(&dir.path().join("tls.crt"), &dir.path().join("tls.key"));
    let s = tls_server(&leaf, |_| {}).await;
    let r = https_client(&ca.cert, None)
        .get(https(&s, "/v2/"))
        .header("x-big", "a".repeat(2_000_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let v: serde_json::Value = r.json().await.expect("a JSON body");
    assert_eq!(v["errors"][0]["code"], "UNSUPPORTED", "{v}");
}

/// Under TLS the web UI's session cookie is `Secure` (a browser never sends it over plain
/// HTTP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_session_cookie_is_secure_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let leaf = ca.server(&dir.path().join("tls.crt"), &dir.path().join("tls.key"));
    let s = tls_server(&leaf, |c| {
        crate::support::with_users(c, berth::config::AuthMode::Basic, &[("alice", "alice-pw")]);
    })
    .await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&ca.cert).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    let r = client
        .post(https(&s, "/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("user=alice&password=alice-pw")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::SEE_OTHER);
    let set = r.headers()["set-cookie"].to_str().unwrap();
    for attr in ["Secure", "HttpOnly", "SameSite=Strict"] {
        assert!(set.contains(attr), "{set}");
    }
}
