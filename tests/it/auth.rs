//! Access control end to end over HTTP: the token service, enforcement on every endpoint, and
//! the security cases (forged tokens, scope escalation, name tricks, brute force, existence
//! leaks). Users: alice (admin), carol (group `team`: pull+push on `team/**`), bob (pull on
//! `team/**`); anyone may pull `public/**`.

use std::time::Duration;

use berth::config::{AuthMode, Config, RuleSection};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{Auth, Image};
use crate::support::{TestServer, client, digest};

const USERS: &[(&str, &str)] = &[
    ("alice", "alice-pw"),
    ("bob", "bob-pw"),
    ("carol", "carol-pw"),
];

fn rule(repos: &[&str], users: &[&str], actions: &[&str]) -> RuleSection {
    let v = |x: &[&str]| x.iter().map(|s| (*s).to_owned()).collect();
    RuleSection {
        repositories: v(repos),
        users: v(users),
        actions: v(actions),
    }
}

/// A server with users and rules; `tweak` adjusts the rest.
async fn server(mode: AuthMode, tweak: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start_with(|c| {
        crate::support::with_users(c, mode, USERS);
        c.auth.admins = vec!["alice".into()];
        c.auth.groups.insert("team".into(), vec!["carol".into()]);
        c.auth.rule = vec![
            rule(&["team/**"], &["@team"], &["pull", "push"]),
            rule(&["team/**"], &["bob"], &["pull"]),
            rule(&["public/**"], &["anonymous", "*"], &["pull"]),
        ];
        tweak(c);
    })
    .await
}

fn pw(user: &str) -> &'static str {
    USERS
        .iter()
        .find(|(u, _)| *u == user)
        .map(|(_, p)| *p)
        .unwrap()
}

/// GET /auth/token; the status and JSON answer.
async fn token_raw(s: &TestServer, user: Option<&str>, scopes: &[&str]) -> (StatusCode, Value) {
    let mut q: Vec<(&str, &str)> = vec![("service", "berth")];
    q.extend(scopes.iter().map(|s| ("scope", *s)));
    let mut req = client().get(s.url("/auth/token")).query(&q);
    if let Some(u) = user {
        req = req.basic_auth(u, Some(pw(u)));
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A token for `user` (None: anonymous) and `scopes`.
async fn token(s: &TestServer, user: Option<&str>, scopes: &[&str]) -> String {
    let (status, v) = token_raw(s, user, scopes).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["token"].as_str().unwrap().to_owned()
}

/// What a token grants, decoded without verification (the server verified it when it matters).
fn access_of(token: &str) -> Value {
    use base64::Engine as _;
    let claims = token.split('.').nth(1).unwrap();
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims)
        .unwrap();
    serde_json::from_slice::<Value>(&raw).unwrap()["access"].clone()
}

async fn call(
    s: &TestServer,
    method: Method,
    path: &str,
    bearer: Option<&str>,
) -> reqwest::Response {
    let mut req = client().request(method, s.url(path));
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

fn challenge(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// The test image for `repo` (a seed from its name, so the same name gives the same image).
fn image_for(repo: &str) -> Image {
    let seed = repo
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    Image::new(seed, &[1000])
}

/// Pushes the test image for `repo` as `repo:tag` with `bearer`; the manifest digest.
async fn push(s: &TestServer, repo: &str, tag: &str, bearer: &str) -> String {
    let image = image_for(repo);
    image.push(&s.root(), repo, tag, Auth::Bearer(bearer)).await;
    image.digest()
}

#[tokio::test]
async fn anonymous_clients_are_challenged_for_the_exact_scope() {
    let s = server(AuthMode::Token, |_| {}).await;
    let realm = format!(
        "Bearer realm=\"http://{}/auth/token\",service=\"berth\"",
        s.addr
    );
    let r = call(&s, Method::GET, "/v2/", None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(challenge(&r), realm);
    let cases = [
        (
            Method::GET,
            "/v2/team/app/manifests/1",
            "repository:team/app:pull",
        ),
        (
            Method::HEAD,
            "/v2/team/app/blobs/sha256:00",
            "repository:team/app:pull",
        ),
        (
            Method::GET,
            "/v2/team/app/tags/list",
            "repository:team/app:pull",
        ),
        (
            Method::PUT,
            "/v2/team/app/manifests/1",
            "repository:team/app:pull,push",
        ),
        (
            Method::POST,
            "/v2/team/app/blobs/uploads/",
            "repository:team/app:pull,push",
        ),
        (
            Method::PATCH,
            "/v2/team/app/blobs/uploads/x",
            "repository:team/app:pull,push",
        ),
        (
            Method::DELETE,
            "/v2/team/app/manifests/1",
            "repository:team/app:delete",
        ),
    ];
    for (m, path, scope) in cases {
        let r = call(&s, m.clone(), path, None).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{m} {path}");
        assert_eq!(
            challenge(&r),
            format!("{realm},scope=\"{scope}\""),
            "{m} {path}"
        );
        if m != Method::HEAD {
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["errors"][0]["code"], "UNAUTHORIZED", "{m} {path}");
        }
    }
    // The catalog is open to anonymous clients here (some content is public), filtered.
    let r = call(&s, Method::GET, "/v2/_catalog", None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["repositories"], json!([]));
    // Anonymous pull of public content works through an anonymous token.
    let admin = token(&s, Some("alice"), &["repository:public/base:pull,push"]).await;
    push(&s, "public/base", "1", &admin).await;
    let anon = token(&s, None, &["repository:public/base:pull"]).await;
    let r = call(&s, Method::GET, "/v2/public/base/manifests/1", Some(&anon)).await;
    assert_eq!(r.status(), StatusCode::OK);
    // ... but never a push.
    let (_, v) = token_raw(&s, None, &["repository:public/base:pull,push"]).await;
    assert_eq!(
        v["token"].as_str().map(access_of).unwrap()[0]["actions"],
        json!(["pull"])
    );
}

#[tokio::test]
async fn a_private_repository_does_not_reveal_whether_it_exists() {
    let s = server(AuthMode::Token, |_| {}).await;
    let admin = token(&s, Some("alice"), &["repository:team/app:pull,push"]).await;
    let m = push(&s, "team/app", "1", &admin).await;
    let anon = token(
        &s,
        None,
        &["repository:team/app:pull", "repository:team/gho:pull"],
    )
    .await;
    assert_eq!(
        access_of(&anon),
        json!([]),
        "anonymous gets nothing in team/"
    );
    for bearer in [None, Some(anon.as_str())] {
        let mut answers = Vec::new();
        for path in [
            "/v2/team/app/manifests/1".to_owned(),
            format!("/v2/team/app/manifests/{m}"),
            "/v2/team/app/manifests/nope".to_owned(),
            "/v2/team/gho/manifests/1".to_owned(),
        ] {
            let r = call(&s, Method::GET, &path, bearer).await;
            let status = r.status();
            let ch = challenge(&r).replace("gho", "app");
            let body = r.text().await.unwrap().replace("gho", "app");
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
            assert!(!body.contains("schemaVersion"), "{path}: {body}");
            answers.push((status, ch, body));
        }
        assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:#?}");
    }
}

#[tokio::test]
async fn tokens_grant_the_intersection_and_only_their_repository() {
    let s = server(AuthMode::Token, |_| {}).await;
    let carol = token(&s, Some("carol"), &["repository:team/app:pull,push"]).await;
    push(&s, "team/app", "1", &carol).await;

    // bob asks for more than he may have: no error, just pull.
    let (status, v) = token_raw(
        &s,
        Some("bob"),
        &[
            "repository:team/app:pull,push,delete",
            "repository:other/x:pull",
            "registry:catalog:*",
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let bob = v["token"].as_str().unwrap().to_owned();
    assert_eq!(v["access_token"], v["token"]);
    assert!(v["expires_in"].as_u64().unwrap() >= 60);
    assert!(v["issued_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        access_of(&bob),
        json!([
            {"type": "repository", "name": "team/app", "actions": ["pull"]},
            {"type": "registry", "name": "catalog", "actions": ["*"]}
        ])
    );
    assert_eq!(
        call(&s, Method::GET, "/v2/team/app/manifests/1", Some(&bob))
            .await
            .status(),
        StatusCode::OK
    );
    let r = call(&s, Method::POST, "/v2/team/app/blobs/uploads/", Some(&bob)).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(
        challenge(&r)
            .ends_with("scope=\"repository:team/app:pull,push\",error=\"insufficient_scope\""),
        "{}",
        challenge(&r)
    );
    let r = call(&s, Method::DELETE, "/v2/team/app/manifests/1", Some(&bob)).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Repeated scopes merge; repeating does not add rights.
    let t = token(
        &s,
        Some("bob"),
        &[
            "repository:team/app:pull",
            "repository:team/app:push",
            "repository:team/app:pull repository:team/app:delete",
        ],
    )
    .await;
    assert_eq!(
        access_of(&t),
        json!([{"type": "repository", "name": "team/app", "actions": ["pull"]}])
    );

    // A token for team/app opens nothing else, whatever the query string says.
    let app_only = token(&s, Some("carol"), &["repository:team/app:pull,push"]).await;
    push(
        &s,
        "team/lib",
        "1",
        &token(&s, Some("carol"), &["repository:team/lib:pull,push"]).await,
    )
    .await;
    for path in [
        "/v2/team/lib/manifests/1",
        "/v2/team/lib/manifests/1?scope=repository:team/lib:pull",
        "/v2/team/lib/tags/list?scope=repository%3Ateam%2Flib%3Apull&service=berth",
    ] {
        let r = call(&s, Method::GET, path, Some(&app_only)).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
        assert!(challenge(&r).contains("repository:team/lib:pull"), "{path}");
    }

    // Wrong password, unknown user, unknown service.
    let r = client()
        .get(s.url("/auth/token?service=berth"))
        .basic_auth("bob", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = client()
        .get(s.url("/auth/token?service=berth"))
        .basic_auth("mallory", Some("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = client()
        .get(s.url("/auth/token?service=elsewhere"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn oauth_post_and_refresh_tokens() {
    let s = server(AuthMode::Token, |_| {}).await;
    let form = |f: &[(&str, &str)]| {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(f)
            .finish();
        client()
            .post(s.url("/auth/token"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
    };
    let r = form(&[
        ("grant_type", "password"),
        ("service", "berth"),
        ("client_id", "containerd-client"),
        ("access_type", "offline"),
        ("username", "carol"),
        ("password", "carol-pw"),
        ("scope", "repository:team/a:pull,push repository:x:pull"),
    ])
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["scope"], "repository:team/a:pull,push");
    let refresh = v["refresh_token"].as_str().unwrap().to_owned();
    // The refresh token is no access token.
    let r = call(&s, Method::GET, "/v2/", Some(&refresh)).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(challenge(&r).contains("error=\"invalid_token\""));
    // It buys access tokens.
    let r = form(&[
        ("grant_type", "refresh_token"),
        ("service", "berth"),
        ("client_id", "docker"),
        ("refresh_token", &refresh),
        ("scope", "repository:team/a:pull"),
    ])
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    let t = v["access_token"].as_str().unwrap();
    assert_eq!(
        call(&s, Method::GET, "/v2/", Some(t)).await.status(),
        StatusCode::OK
    );
    // GET with offline_token=true hands one out too (docker login stores it).
    let r = client()
        .get(s.url("/auth/token?service=berth&offline_token=true&client_id=docker&account=carol"))
        .basic_auth("carol", Some("carol-pw"))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert!(v["refresh_token"].is_string());
    // Bad requests.
    for (f, want) in [
        (
            vec![
                ("grant_type", "password"),
                ("username", "carol"),
                ("password", "carol-pw"),
            ],
            StatusCode::BAD_REQUEST,
        ),
        (
            vec![
                ("grant_type", "password"),
                ("client_id", "c"),
                ("username", "carol"),
                ("password", "no"),
            ],
            StatusCode::UNAUTHORIZED,
        ),
        (
            vec![
                ("grant_type", "refresh_token"),
                ("client_id", "c"),
                ("refresh_token", t),
            ],
            StatusCode::UNAUTHORIZED,
        ),
        (
            vec![("grant_type", "client_credentials"), ("client_id", "c")],
            StatusCode::BAD_REQUEST,
        ),
    ] {
        assert_eq!(form(&f).await.unwrap().status(), want, "{f:?}");
    }
}

#[tokio::test]
async fn a_changed_password_ends_refresh_tokens() {
    let s = server(AuthMode::Token, |_| {}).await;
    let form = |f: Vec<(&'static str, String)>| {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(f)
            .finish();
        client()
            .post(s.url("/auth/token"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
    };
    let login = |password: &'static str| {
        vec![
            ("grant_type", "password".to_owned()),
            ("service", "berth".to_owned()),
            ("client_id", "docker".to_owned()),
            ("access_type", "offline".to_owned()),
            ("username", "carol".to_owned()),
            ("password", password.to_owned()),
        ]
    };
    let refresh_with = |t: &str| {
        vec![
            ("grant_type", "refresh_token"),
            ("service", "berth"),
            ("client_id", "docker"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_owned()))
        .chain([("refresh_token", t.to_owned())])
        .collect::<Vec<_>>()
    };
    let v: Value = form(login(pw("carol")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let old = v["refresh_token"].as_str().unwrap().to_owned();
    assert_eq!(
        form(refresh_with(&old)).await.unwrap().status(),
        StatusCode::OK
    );

    // carol's password changes (the file is re-read within 2 s).
    let htpasswd = s.dir.path().join("htpasswd");
    let text = std::fs::read_to_string(&htpasswd).unwrap();
    let changed: String = text
        .lines()
        .map(|l| match l.split_once(':') {
            Some(("carol", _)) => format!(
                "carol:{}\n",
                berth_auth::htpasswd::hash("carol-new", 4).unwrap()
            ),
            _ => format!("{l}\n"),
        })
        .collect();
    std::fs::write(&htpasswd, changed).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2200)).await;

    let r = form(refresh_with(&old)).await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "a refresh token outlived the password it was issued for"
    );
    let v: Value = form(login("carol-new"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let new = v["refresh_token"].as_str().unwrap().to_owned();
    assert_eq!(
        form(refresh_with(&new)).await.unwrap().status(),
        StatusCode::OK
    );
}

/// Signs `claims` with `key` as ES256 with `kid`.
fn forge(key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

#[tokio::test]
async fn forged_and_stale_tokens_are_refused() {
    let s = server(AuthMode::Token, |_| {}).await;
    let pem = std::fs::read_to_string(s.dir.path().join("auth/token.key")).unwrap();
    let ours = berth_auth::SigningKey::from_pem(&pem).unwrap();
    let key = EncodingKey::from_ec_pem(pem.as_bytes()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = |iss: &str, aud: &str, nbf: u64, exp: u64| {
        json!({"iss": iss, "sub": "alice", "aud": aud, "nbf": nbf, "iat": nbf, "exp": exp,
               "access": [{"type": "repository", "name": "team/app", "actions": ["pull", "push"]}]})
    };
    // The genuine article passes, so the failures below are the claim under test.
    let good = forge(
        &key,
        Some(ours.kid()),
        &claims("berth", "berth", now, now + 300),
    );
    assert_eq!(
        call(&s, Method::GET, "/v2/team/app/tags/list", Some(&good))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );

    let other = berth_auth::SigningKey::load_or_generate(&s.dir.path().join("other.key")).unwrap();
    let other_pem = std::fs::read_to_string(s.dir.path().join("other.key")).unwrap();
    let other_key = EncodingKey::from_ec_pem(other_pem.as_bytes()).unwrap();
    use base64::Engine as _;
    let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let body = b64(&claims("berth", "berth", now, now + 300).to_string());
    let hs256 = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(ours.kid().to_owned());
        jsonwebtoken::encode(
            &h,
            &claims("berth", "berth", now, now + 300),
            &EncodingKey::from_secret(ours.public_pem().as_bytes()),
        )
        .unwrap()
    };
    let cases = [
        (
            "signed by another key",
            forge(
                &other_key,
                Some(other.kid()),
                &claims("berth", "berth", now, now + 300),
            ),
        ),
        (
            "another key claiming our kid",
            forge(
                &other_key,
                Some(ours.kid()),
                &claims("berth", "berth", now, now + 300),
            ),
        ),
        (
            "alg none",
            format!("{}.{body}.", b64(r#"{"alg":"none","typ":"JWT"}"#)),
        ),
        ("HS256 keyed with our public key", hs256),
        (
            "expired",
            forge(
                &key,
                Some(ours.kid()),
                &claims("berth", "berth", now - 900, now - 300),
            ),
        ),
        (
            "not yet valid",
            forge(
                &key,
                Some(ours.kid()),
                &claims("berth", "berth", now + 600, now + 900),
            ),
        ),
        (
            "wrong audience",
            forge(
                &key,
                Some(ours.kid()),
                &claims("berth", "other-registry", now, now + 300),
            ),
        ),
        (
            "wrong issuer",
            forge(
                &key,
                Some(ours.kid()),
                &claims("mallory", "berth", now, now + 300),
            ),
        ),
        ("tampered claims", {
            let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
            parts[1] = b64(&claims("berth", "berth", now, now + 300)
                .to_string()
                .replace("team/app", "team/ap2"));
            parts.join(".")
        }),
        ("garbage", "not-a-jwt".to_owned()),
    ];
    for (what, t) in cases {
        let r = call(&s, Method::GET, "/v2/team/app/tags/list", Some(&t)).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{what}");
        assert!(
            challenge(&r).contains("error=\"invalid_token\""),
            "{what}: {}",
            challenge(&r)
        );
    }
}

#[tokio::test]
async fn name_tricks_get_nothing() {
    let s = server(AuthMode::Token, |_| {}).await;
    let carol = token(&s, Some("carol"), &["repository:team/app:pull,push"]).await;
    push(&s, "team/app", "1", &carol).await;
    let long = format!("repository:team/{}:pull", "a".repeat(300));
    for scope in [
        "repository:team/../secret:pull",
        "repository:team/app/../../secret:pull",
        "repository:Team/App:pull",
        "repository:team%2Fapp:pull",
        "repository:team//app:pull",
        long.as_str(),
    ] {
        let t = token(&s, Some("carol"), &[scope]).await;
        assert_eq!(access_of(&t), json!([]), "{scope}");
    }
    // Sent byte for byte (HTTP clients would normalise `..` away).
    for path in [
        "/v2/team/../team/app/manifests/1",
        "/v2/team/app/../app/manifests/1",
        "/v2/team%2Fapp/manifests/1",
        "/v2/Team/app/manifests/1",
        "/v2/team/app%2F..%2Fother/manifests/1",
    ] {
        let status = raw_get(&s, path, &carol).await;
        assert!(status.starts_with("HTTP/1.1 4"), "{path}: {status}");
    }
    // A name outside the grammar is 400 NAME_INVALID, with or without a token: never a
    // challenge for a scope no token service grants.
    let c = crate::support::client();
    for path in [
        "/v2/Team/App/manifests/1",
        "/v2/a..b/tags/list",
        "/v2/x/-y/tags/list",
    ] {
        for bearer in [None, Some(carol.as_str())] {
            let mut r = c.get(s.url(path));
            if let Some(b) = bearer {
                r = r.bearer_auth(b);
            }
            let r = r.send().await.unwrap();
            assert_eq!(r.status(), 400, "{path}");
            assert!(r.headers().get("www-authenticate").is_none(), "{path}");
            assert!(r.text().await.unwrap().contains("NAME_INVALID"), "{path}");
        }
    }
}

/// A GET with the path exactly as given; the status line.
async fn raw_get(s: &TestServer, path: &str, bearer: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {bearer}\r\nConnection: close\r\n\r\n",
        s.addr
    );
    c.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn failed_logins_are_rate_limited_per_address() {
    let s = server(AuthMode::Token, |c| {
        c.auth.max_failures = 3;
        c.auth.failure_window = Duration::from_secs(2);
    })
    .await;
    let get = |pwd: &'static str| {
        client()
            .get(s.url("/auth/token?service=berth"))
            .basic_auth("bob", Some(pwd))
            .send()
    };
    for _ in 0..3 {
        assert_eq!(
            get("guess").await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
    }
    let r = get("bob-pw").await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "even the right password waits"
    );
    assert!(r.headers().contains_key("retry-after"));
    // Basic straight on the API counts the same.
    let r = client()
        .get(s.url("/v2/"))
        .basic_auth("bob", Some("bob-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(get("bob-pw").await.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn catalog_lists_only_what_the_caller_may_pull() {
    let s = server(AuthMode::Token, |_| {}).await;
    for repo in ["other/a", "public/b", "team/c", "team/d", "zzz/e"] {
        let scope = format!("repository:{repo}:pull,push");
        let t = token(&s, Some("alice"), &[scope.as_str()]).await;
        push(&s, repo, "1", &t).await;
    }
    let list = |t: String, q: &'static str| {
        let s = &s;
        async move {
            let r = call(s, Method::GET, &format!("/v2/_catalog{q}"), Some(&t)).await;
            assert_eq!(r.status(), StatusCode::OK);
            let link = r
                .headers()
                .get("link")
                .map(|l| l.to_str().unwrap().to_owned());
            let v: Value = r.json().await.unwrap();
            (v["repositories"].clone(), link)
        }
    };
    let cat = ["registry:catalog:*"];
    let (all, _) = list(token(&s, Some("alice"), &cat).await, "").await;
    assert_eq!(
        all,
        json!(["other/a", "public/b", "team/c", "team/d", "zzz/e"])
    );
    let (bob, _) = list(token(&s, Some("bob"), &cat).await, "").await;
    assert_eq!(bob, json!(["public/b", "team/c", "team/d"]));
    let (anon, _) = list(token(&s, None, &cat).await, "").await;
    assert_eq!(anon, json!(["public/b"]));
    // Pages of n are filled past repositories the caller cannot see.
    let (page, link) = list(token(&s, Some("bob"), &cat).await, "?n=2").await;
    assert_eq!(page, json!(["public/b", "team/c"]));
    assert!(link.unwrap().contains("last=team%2Fc"));
    let (page, link) = list(token(&s, Some("bob"), &cat).await, "?n=2&last=team%2Fc").await;
    assert_eq!(page, json!(["team/d"]));
    assert_eq!(link, None);
}

#[tokio::test]
async fn cross_repository_mount_needs_pull_on_the_source() {
    let s = server(AuthMode::Token, |c| {
        c.auth.rule.push(rule(&["secret/**"], &["bob"], &["push"]));
    })
    .await;
    let admin = token(&s, Some("alice"), &["repository:secret/x:pull,push"]).await;
    push(&s, "secret/x", "1", &admin).await;
    let layer = digest(&image_for("secret/x").blobs[1]);
    let carol = token(
        &s,
        Some("carol"),
        &["repository:team/m:pull,push", "repository:secret/x:pull"],
    )
    .await;
    let mount = |from: &str| format!("/v2/team/m/blobs/uploads/?mount={layer}&from={from}");
    // carol cannot read secret/x: a plain upload session instead of the mount.
    let r = call(&s, Method::POST, &mount("secret/x"), Some(&carol)).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = call(
        &s,
        Method::POST,
        &format!("/v2/team/m/blobs/uploads/?mount={layer}"),
        Some(&carol),
    )
    .await;
    assert_eq!(
        r.status(),
        StatusCode::ACCEPTED,
        "no mount from anywhere for non-admins"
    );
    assert_eq!(
        call(
            &s,
            Method::HEAD,
            &format!("/v2/team/m/blobs/{layer}"),
            Some(&carol)
        )
        .await
        .status(),
        StatusCode::NOT_FOUND
    );
    // With pull on the source it mounts.
    let both = token(
        &s,
        Some("alice"),
        &["repository:team/m:pull,push", "repository:secret/x:pull"],
    )
    .await;
    let r = call(&s, Method::POST, &mount("secret/x"), Some(&both)).await;
    assert_eq!(r.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn basic_mode_checks_every_request() {
    let s = server(AuthMode::Basic, |_| {}).await;
    let r = call(&s, Method::GET, "/v2/", None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(challenge(&r).starts_with("Basic realm="));
    let r = client()
        .get(s.url("/v2/"))
        .basic_auth("carol", Some("carol-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = client()
        .get(s.url("/v2/"))
        .basic_auth("carol", Some("nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Signed in but not allowed: 403 DENIED (no token to fetch would help).
    let r = client()
        .post(s.url("/v2/team/x/blobs/uploads/"))
        .basic_auth("bob", Some("bob-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "DENIED");
    let r = client()
        .post(s.url("/v2/team/x/blobs/uploads/"))
        .basic_auth("carol", Some("carol-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // A whole push with Basic credentials on every request.
    image_for("team/basic")
        .push(
            &s.root(),
            "team/basic",
            "1",
            Auth::Basic("carol", "carol-pw"),
        )
        .await;
    // No token service in Basic mode.
    assert_eq!(
        client()
            .get(s.url("/auth/token"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn tokens_of_a_trusted_external_issuer_are_accepted() {
    let keys = tempfile::tempdir().unwrap();
    let ext = berth_auth::SigningKey::load_or_generate(&keys.path().join("ext.key")).unwrap();
    std::fs::write(keys.path().join("ext.pub"), ext.public_pem()).unwrap();
    let jwks_key = berth_auth::SigningKey::load_or_generate(&keys.path().join("jwks.key")).unwrap();
    let jwks_pem = std::fs::read(keys.path().join("jwks.key")).unwrap();
    let jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(
        &EncodingKey::from_ec_pem(&jwks_pem).unwrap(),
        Algorithm::ES256,
    )
    .unwrap();
    std::fs::write(
        keys.path().join("jwks.json"),
        json!({"keys": [jwk]}).to_string(),
    )
    .unwrap();
    let s = server(AuthMode::Token, |c| {
        c.auth.token.trusted = vec![
            berth::config::TrustedSection {
                issuer: "gitlab".into(),
                key: Some(keys.path().join("ext.pub")),
                jwks: None,
            },
            berth::config::TrustedSection {
                issuer: "harbor".into(),
                key: None,
                jwks: Some(keys.path().join("jwks.json")),
            },
        ];
    })
    .await;
    let scope = [berth_auth::Scope::repository(
        "team/ext",
        berth_auth::Actions::PULL.union(berth_auth::Actions::PUSH),
    )];
    let gitlab = berth_auth::Issuer::new(ext, "gitlab", "berth", Duration::from_secs(300));
    let harbor = berth_auth::Issuer::new(jwks_key, "harbor", "berth", Duration::from_secs(300));
    let t = gitlab.issue("dave", &scope).unwrap().token;
    push(&s, "team/ext", "1", &t).await;
    let t = harbor.issue("erin", &scope).unwrap().token;
    assert_eq!(
        call(&s, Method::GET, "/v2/team/ext/manifests/1", Some(&t))
            .await
            .status(),
        StatusCode::OK
    );
    // The issuer name must match the key: gitlab's key cannot speak for harbor.
    let ext2 = berth_auth::SigningKey::from_pem(
        &std::fs::read_to_string(keys.path().join("ext.key")).unwrap(),
    )
    .unwrap();
    let spoof = berth_auth::Issuer::new(ext2, "harbor", "berth", Duration::from_secs(300));
    let t = spoof.issue("erin", &scope).unwrap().token;
    assert_eq!(
        call(&s, Method::GET, "/v2/team/ext/manifests/1", Some(&t))
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn behind_a_trusted_proxy_failures_count_per_forwarded_client() {
    let s = server(AuthMode::Token, |c| {
        c.auth.max_failures = 3;
        c.auth.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let get = |client_addr: &'static str, pwd: &'static str| {
        client()
            .get(s.url("/auth/token?service=berth"))
            .header("x-forwarded-for", client_addr)
            .basic_auth("bob", Some(pwd))
            .send()
    };
    for _ in 0..3 {
        assert_eq!(
            get("203.0.113.1", "guess").await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        get("203.0.113.1", "bob-pw").await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Everyone else behind the same proxy is unaffected.
    assert_eq!(
        get("203.0.113.2", "bob-pw").await.unwrap().status(),
        StatusCode::OK
    );
    // The attacker cannot shake off the block by writing another address further left.
    assert_eq!(
        get("198.51.100.9, 203.0.113.1", "bob-pw")
            .await
            .unwrap()
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}
