//! The web UI over HTTP: what its pages show of real content (layers, history, platforms,
//! referrers, comparisons, the cache), who sees and changes what (the API's rights, sessions,
//! forged requests), and listings that stay bounded over 10,000 repositories and tags. The
//! same pages in headless Chromium: `real_clients_in_chromium_*`.

use std::time::Duration;

use berth::config::{AuthMode, RuleSection};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Auth, Image, OCI_INDEX, OCI_MANIFEST, TestServer, client, digest};

fn no_redirects() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// POSTs the form `body` to `url` with an optional session cookie and further headers.
async fn post_form(
    url: String,
    cookie: Option<&str>,
    body: String,
    extra: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = no_redirects()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body);
    if let Some(c) = cookie {
        req = req.header("cookie", format!("berth_session={c}"));
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

/// GET `path` with an optional session cookie: status, body, server time (ms).
async fn get(s: &TestServer, path: &str, cookie: Option<&str>) -> (StatusCode, String, f64) {
    let mut req = no_redirects().get(s.url(path));
    if let Some(c) = cookie {
        req = req.header("cookie", format!("berth_session={c}"));
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let ms = r
        .headers()
        .get("server-timing")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("render;dur="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    (status, r.text().await.unwrap(), ms)
}

/// An image whose config has history (one entry made no layer), env, labels, ports and an
/// entrypoint; `layers` are the layer blobs.
fn built_image(arch: &str, layers: &[Vec<u8>], env: &[&str], label: &str) -> Image {
    let mut history = vec![json!({"created_by": "ENV LANG=C.UTF-8", "empty_layer": true})];
    history.extend(
        (0..layers.len())
            .map(|i| json!({"created_by": format!("RUN make step-{i} # {}", digest(&layers[i]))})),
    );
    let config = serde_json::to_vec(&json!({
        "architecture": arch, "os": "linux", "created": "2026-11-30T12:00:00Z",
        "config": {
            "Entrypoint": ["/usr/bin/app"], "Cmd": ["--serve"], "Env": env,
            "Labels": {"org.opencontainers.image.title": label, "note": "<script>alert(1)</script>"},
            "ExposedPorts": {"8080/tcp": {}}, "User": "app", "WorkingDir": "/srv",
        },
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| digest(l)).collect::<Vec<_>>()},
        "history": history,
    }))
    .unwrap();
    let mut blobs = vec![config];
    blobs.extend(layers.iter().cloned());
    Image::oci(blobs)
}

/// An artifact of `artifact_type` about `subject` (a manifest descriptor).
fn artifact(artifact_type: &str, subject: &Value, payload: &[u8]) -> Image {
    let empty = b"{}".to_vec();
    let manifest = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest(&empty), "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": digest(payload), "size": payload.len()}],
        "subject": subject,
    })
    .to_string();
    Image::with_manifest(manifest, OCI_MANIFEST, vec![empty, payload.to_vec()])
}

fn descriptor(i: &Image) -> Value {
    json!({"mediaType": i.media_type, "digest": i.digest(), "size": i.manifest.len()})
}

/// What the test images are, for checking pages against.
struct Fixture {
    v1: Image,
    v2: Image,
    amd64: Image,
    arm64: Image,
    index: Image,
    signature: Image,
    sbom: Image,
    sbom_signature: Image,
}

/// Pushes the test images to `root`: `web/app:1.0` and `:1.1` (two shared layers, one
/// changed), `web/multi:latest` (an index over amd64 and arm64), and referrers of `1.0`: a
/// signature, an SBOM, and a signature of the SBOM.
async fn fill(root: &str, auth: Auth<'_>) -> Fixture {
    let layer = |seed: u64, n: usize| crate::support::noise(n, seed);
    let (l1, l2, l3, l4) = (
        layer(1, 120_000),
        layer(2, 40_000),
        layer(3, 9_000),
        layer(4, 15_000),
    );
    let v1 = built_image(
        "amd64",
        &[l1.clone(), l2.clone(), l3],
        &["VERSION=1", "MODE=prod"],
        "app one",
    );
    let v2 = built_image(
        "amd64",
        &[l1, l2, l4],
        &["VERSION=2", "MODE=prod"],
        "app two",
    );
    v1.push(root, "web/app", "1.0", auth).await;
    v2.push(root, "web/app", "1.1", auth).await;
    let amd64 = built_image("amd64", &[layer(5, 30_000)], &["ARCH=amd64"], "multi");
    let arm64 = built_image("arm64", &[layer(6, 31_000)], &["ARCH=arm64"], "multi");
    amd64.push(root, "web/multi", &amd64.digest(), auth).await;
    arm64.push(root, "web/multi", &arm64.digest(), auth).await;
    let mut children = vec![descriptor(&amd64), descriptor(&arm64)];
    children[0]["platform"] = json!({"os": "linux", "architecture": "amd64"});
    children[1]["platform"] = json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
    let index = Image::with_manifest(
        json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}).to_string(),
        OCI_INDEX,
        vec![],
    );
    index.push(root, "web/multi", "latest", auth).await;
    let signature = artifact(
        "application/vnd.dev.cosign.artifact.sig.v1+json",
        &descriptor(&v1),
        b"signature of 1.0",
    );
    let sbom = artifact(
        "application/spdx+json",
        &descriptor(&v1),
        b"{\"spdxVersion\":\"SPDX-2.3\"}",
    );
    let sbom_signature = artifact(
        "application/vnd.dev.cosign.artifact.sig.v1+json",
        &descriptor(&sbom),
        b"signature of the sbom",
    );
    for a in [&signature, &sbom, &sbom_signature] {
        a.push(root, "web/app", &a.digest(), auth).await;
    }
    Fixture {
        v1,
        v2,
        amd64,
        arm64,
        index,
        signature,
        sbom,
        sbom_signature,
    }
}

/// The layers of an image as (digest, size), config excluded.
fn layers(i: &Image) -> Vec<(String, usize)> {
    i.blobs[1..].iter().map(|b| (digest(b), b.len())).collect()
}

fn total(i: &Image) -> usize {
    i.manifest.len() + i.blobs.iter().map(Vec::len).sum::<usize>()
}

/// The part of `page` inside the element with `id` (to its first `</table>`, `</div>` or
/// `</dl>`).
fn section<'a>(page: &'a str, id: &str) -> &'a str {
    let start = page
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page:\n{page}"));
    let rest = &page[start..];
    let end = ["</table>", "</div>", "</dl>"]
        .iter()
        .filter_map(|t| rest.find(t))
        .min()
        .unwrap_or(rest.len());
    &rest[..end]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pages_show_layers_history_platforms_referrers_and_comparisons() {
    let s = TestServer::start().await;
    let f = fill(&s.root(), Auth::None).await;

    // A browser asking for / lands on the UI; an API client does not.
    let r = no_redirects()
        .get(s.url("/"))
        .header("accept", "text/html,application/xhtml+xml")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], "/ui/");
    let r = client().get(s.url("/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    let (st, list, _) = get(&s, "/ui/?q=app", None).await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        list.contains(">web/app<") && !list.contains(">web/multi<"),
        "{list}"
    );

    // Tags: sizes, kind and platform per tag.
    let (_, repo, _) = get(&s, "/ui/repo?name=web/app", None).await;
    let tags = section(&repo, "tags");
    for (tag, image) in [("1.0", &f.v1), ("1.1", &f.v2)] {
        let row = &tags[tags.find(&format!("data-tag=\"{tag}\"")).unwrap()..];
        let row = &row[..row.find("</tr>").unwrap()];
        assert!(
            row.contains(&format!("data-bytes=\"{}\"", total(image))),
            "{row}"
        );
        assert!(
            row.contains("linux/amd64") && row.contains("2026-11-30"),
            "{row}"
        );
        assert!(row.contains(&image.digest()[..19]), "{row}");
    }
    assert!(
        repo.contains("data-confirm=\"Delete tag 1.0?"),
        "auth off: anyone may delete, as through the API"
    );

    // An image: layers with their sizes and the commands that made them, the config, pull
    // commands, referrers as a tree.
    let (_, page, _) = get(&s, "/ui/image?name=web/app&ref=1.0", None).await;
    let table = section(&page, "layers");
    for (i, (d, n)) in layers(&f.v1).iter().enumerate() {
        assert!(
            table.contains(&format!("data-digest=\"{d}\" data-bytes=\"{n}\"")),
            "layer {d} of {n} bytes: {table}"
        );
        assert!(
            table.contains(&format!("RUN make step-{i} # {d}")),
            "{table}"
        );
    }
    assert!(
        !table.contains("ENV LANG"),
        "an empty-layer entry made no layer"
    );
    let config = section(&page, "config");
    for want in [
        "linux/amd64",
        "/usr/bin/app",
        "--serve",
        "VERSION=1",
        "8080/tcp",
        "app one",
        "&lt;script&gt;alert(1)&lt;/script&gt;",
    ] {
        assert!(config.contains(want), "config shows {want}: {config}");
    }
    assert!(!page.contains("<script>alert"), "label text is escaped");
    let host = s.addr.to_string();
    assert!(page.contains(&format!("docker pull {host}/web/app:1.0")));
    assert!(page.contains(&format!("ctr image pull --plain-http {host}/web/app:1.0")));
    assert!(page.contains(&format!(
        "crane pull --insecure {host}/web/app:1.0 image.tar"
    )));
    let tree = section(&page, "referrers");
    let at = |d: &str| {
        tree.find(d)
            .unwrap_or_else(|| panic!("{d} in the tree: {tree}"))
    };
    let (sig, sbom, nested) = (
        at(&f.signature.digest()),
        at(&f.sbom.digest()),
        at(&f.sbom_signature.digest()),
    );
    // The SBOM's signature sits in a list nested under the SBOM.
    assert!(
        sbom < nested && tree[sbom..nested].contains("<ul class=\"tree\">"),
        "{tree}"
    );
    assert!(sig > 0 && tree.contains("application/spdx+json"));

    // The exact bytes are one click away.
    let raw = client()
        .get(s.url(&format!("/ui/raw?name=web/app&ref={}", f.v1.digest())))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(raw, f.v1.manifest);

    // An index: its platforms, each linking to its image.
    let (_, multi, _) = get(&s, "/ui/image?name=web/multi&ref=latest", None).await;
    let platforms = section(&multi, "platforms");
    for (p, child) in [("linux/amd64", &f.amd64), ("linux/arm64/v8", &f.arm64)] {
        assert!(
            platforms.contains(p) && platforms.contains(&child.digest()),
            "{platforms}"
        );
    }
    let (_, repo, _) = get(&s, "/ui/repo?name=web/multi", None).await;
    assert!(repo.contains("linux/amd64, linux/arm64/v8"), "{repo}");
    assert!(repo.contains(&format!(
        "data-bytes=\"{}\"",
        f.index.manifest.len() + f.amd64.manifest.len() + f.arm64.manifest.len()
    )));

    // Compare: two shared layers, one removed, one added, the size change, the env change.
    let (st, cmp, _) = get(&s, "/ui/compare?name=web/app&a=1.0&b=1.1", None).await;
    assert_eq!(st, StatusCode::OK, "{cmp}");
    let (l1, l2) = (layers(&f.v1), layers(&f.v2));
    let shared = section(&cmp, "shared");
    assert!(shared.contains(&l1[0].0) && shared.contains(&l1[1].0) && !shared.contains(&l1[2].0));
    assert!(section(&cmp, "removed").contains(&l1[2].0));
    assert!(section(&cmp, "added").contains(&l2[2].0));
    assert!(!section(&cmp, "added").contains(&l1[0].0));
    let diff = section(&cmp, "config-diff");
    assert!(
        diff.contains("env VERSION") && diff.contains("label org.opencontainers.image.title"),
        "{diff}"
    );
    assert!(
        !diff.contains("env MODE"),
        "unchanged settings are not listed: {diff}"
    );
    let change = total(&f.v2) as i64 - total(&f.v1) as i64;
    assert!(change > 0);
    assert!(
        section(&cmp, "summary").contains("+"),
        "a growth shows as +"
    );

    // Bad and unknown names answer 404 pages, not errors.
    assert_eq!(
        get(&s, "/ui/repo?name=no/such", None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&s, "/ui/repo?name=..%2Fetc", None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&s, "/ui/image?name=web/app&ref=9.9", None).await.0,
        StatusCode::NOT_FOUND
    );
    // The UI's security headers.
    let r = client().get(s.url("/ui/")).send().await.unwrap();
    assert!(
        r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
}

const USERS: &[(&str, &str)] = &[("alice", "alice-pw"), ("bob", "bob-pw")];

fn rule(repos: &[&str], users: &[&str], actions: &[&str]) -> RuleSection {
    let v = |x: &[&str]| x.iter().map(|s| (*s).to_owned()).collect();
    RuleSection {
        repositories: v(repos),
        users: v(users),
        actions: v(actions),
    }
}

/// A server where alice is an admin, bob may pull `team/**`, anyone may pull `public/**`.
async fn guarded(tweak: impl FnOnce(&mut berth::config::Config)) -> TestServer {
    TestServer::start_with(|c| {
        crate::support::with_users(c, AuthMode::Basic, USERS);
        c.auth.admins = vec!["alice".into()];
        c.auth.rule = vec![
            rule(&["team/**"], &["bob"], &["pull"]),
            rule(&["public/**"], &["anonymous", "*"], &["pull"]),
        ];
        tweak(c);
    })
    .await
}

/// Signs in; the session cookie's value and the whole `Set-Cookie`.
async fn sign_in(
    s: &TestServer,
    user: &str,
    password: &str,
) -> Result<(String, String), StatusCode> {
    let r = post_form(
        s.url("/ui/login"),
        None,
        format!("user={user}&password={password}"),
        &[],
    )
    .await;
    if r.status() != StatusCode::SEE_OTHER {
        return Err(r.status());
    }
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    let value = set
        .strip_prefix("berth_session=")
        .and_then(|v| v.split(';').next())
        .unwrap()
        .to_owned();
    Ok((value, set))
}

/// The CSRF token on a page (from its sign-out form).
fn csrf(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .expect("a form token on the page")
        + 19;
    page[at..at + page[at..].find('"').unwrap()].to_owned()
}

/// POSTs a tag delete; the status.
async fn delete(
    s: &TestServer,
    cookie: &str,
    token: &str,
    tag: &str,
    extra: &[(&str, &str)],
) -> StatusCode {
    post_form(
        s.url("/ui/delete"),
        Some(cookie),
        format!("csrf={token}&name=team%2Fapp&tag={tag}"),
        extra,
    )
    .await
    .status()
}

async fn tag_exists(s: &TestServer, tag: &str) -> bool {
    client()
        .head(s.url(&format!("/v2/team/app/manifests/{tag}")))
        .basic_auth("alice", Some("alice-pw"))
        .header("accept", crate::support::DOCKER_MANIFEST)
        .send()
        .await
        .unwrap()
        .status()
        == StatusCode::OK
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rights_sessions_and_forged_requests_follow_the_api_policy() {
    let s = guarded(|_| {}).await;
    let alice = Auth::Basic("alice", "alice-pw");
    for tag in ["1", "2", "3"] {
        Image::new(tag.parse().unwrap(), &[1000])
            .push(&s.root(), "team/app", tag, alice)
            .await;
    }
    Image::new(9, &[1000])
        .push(&s.root(), "public/base", "1", alice)
        .await;

    // Anonymous sees only what anonymous may pull, and the same 404 for a private repository
    // as for a missing one.
    let (_, list, _) = get(&s, "/ui/", None).await;
    assert!(
        list.contains(">public/base<") && !list.contains("team/app"),
        "{list}"
    );
    assert_eq!(
        get(&s, "/ui/repo?name=team/app", None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&s, "/ui/image?name=team/app&ref=1", None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&s, "/ui/raw?name=team/app&ref=1", None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&s, "/ui/repo?name=public/base", None).await.0,
        StatusCode::OK
    );
    // 1,100 private repositories sort before it: a page reads at most 1,000 names, shows what
    // anonymous may see of them (nothing) and links on from the last name read.
    fill_many(&s, 1_100, 0).await;
    let (_, list, _) = get(&s, "/ui/", None).await;
    assert!(
        !list.contains("public/base") && !list.contains("many/"),
        "{list}"
    );
    let next = list
        .split("id=\"next\" href=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a link on past the names read")
        .replace("&amp;", "&");
    let (_, list, _) = get(&s, &next, None).await;
    assert!(
        list.contains(">public/base<") && !list.contains("many/"),
        "{list}"
    );

    // Sign-in: a wrong password is refused; the cookie is HttpOnly, SameSite=Strict, for /ui.
    assert_eq!(
        sign_in(&s, "bob", "wrong").await.unwrap_err(),
        StatusCode::UNAUTHORIZED
    );
    let (bob, set) = sign_in(&s, "bob", "bob-pw").await.unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age=43200"] {
        assert!(set.contains(attr), "{set}");
    }
    assert!(
        !set.contains("Secure"),
        "plain HTTP: a Secure cookie would never come back"
    );
    let (_, list, _) = get(&s, "/ui/?q=team", Some(&bob)).await;
    assert!(
        list.contains(">team/app<") && list.contains("id=\"user\">bob<"),
        "{list}"
    );
    // bob may pull, not delete: no button, and a forged request with his own token is refused.
    let (_, page, _) = get(&s, "/ui/repo?name=team/app", Some(&bob)).await;
    assert!(
        page.contains("data-tag=\"1\"") && !page.contains("Delete"),
        "{page}"
    );
    assert_eq!(
        delete(&s, &bob, &csrf(&page), "1", &[]).await,
        StatusCode::FORBIDDEN
    );
    assert!(tag_exists(&s, "1").await);

    // alice may: the button is there and the delete takes the tag only.
    let (alice_cookie, _) = sign_in(&s, "alice", "alice-pw").await.unwrap();
    let (_, page, _) = get(&s, "/ui/repo?name=team/app", Some(&alice_cookie)).await;
    assert!(page.contains("data-confirm=\"Delete tag 1?"), "{page}");
    let token = csrf(&page);
    let host = s.addr.to_string();
    let origin = format!("http://{host}");
    // Forged: from another site (Origin, or a browser's Sec-Fetch-Site), without the token,
    // with another session's token.
    assert_eq!(
        delete(
            &s,
            &alice_cookie,
            &token,
            "1",
            &[("origin", "http://evil.example")]
        )
        .await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        delete(
            &s,
            &alice_cookie,
            &token,
            "1",
            &[("sec-fetch-site", "cross-site")]
        )
        .await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        delete(&s, &alice_cookie, "", "1", &[]).await,
        StatusCode::FORBIDDEN
    );
    let (_, bob_page, _) = get(&s, "/ui/", Some(&bob)).await;
    assert_eq!(
        delete(&s, &alice_cookie, &csrf(&bob_page), "1", &[]).await,
        StatusCode::FORBIDDEN
    );
    assert!(
        tag_exists(&s, "1").await,
        "no forged request deleted anything"
    );
    // Genuine.
    let st = delete(
        &s,
        &alice_cookie,
        &token,
        "1",
        &[
            ("origin", origin.as_str()),
            ("sec-fetch-site", "same-origin"),
        ],
    )
    .await;
    assert_eq!(st, StatusCode::SEE_OTHER);
    assert!(!tag_exists(&s, "1").await && tag_exists(&s, "2").await);

    // A tampered session is no session; a signed-out cookie is cleared.
    let mut parts: Vec<String> = alice_cookie.split('.').map(str::to_owned).collect();
    parts[1] = base64_url("bob");
    let forged = parts.join(".");
    let (_, list, _) = get(&s, "/ui/?q=team", Some(&forged)).await;
    assert!(
        !list.contains("team/app"),
        "a session whose user was changed is refused"
    );
    let r = post_form(
        s.url("/ui/logout"),
        Some(&alice_cookie),
        format!("csrf={token}"),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(
        r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );

    // A changed password ends the user's sessions.
    let htpasswd = s.dir.path().join("data/htpasswd");
    let htpasswd = if htpasswd.exists() {
        htpasswd
    } else {
        s.state.config.auth.htpasswd.clone().unwrap()
    };
    let text = std::fs::read_to_string(&htpasswd).unwrap();
    let changed: String = text
        .lines()
        .map(|l| {
            if l.starts_with("bob:") {
                format!(
                    "bob:{}\n",
                    berth_auth::htpasswd::hash("bob-new", 4).unwrap()
                )
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&htpasswd, changed).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (_, list, _) = get(&s, "/ui/?q=team", Some(&bob)).await;
        if !list.contains("team/app") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bob's session outlived his password"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn base64_url(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ui_can_be_turned_off() {
    let s = TestServer::start_with(|c| c.ui.enabled = false).await;
    assert_eq!(
        client().get(s.url("/ui/")).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let r = no_redirects()
        .get(s.url("/"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

/// Fills `s` with `repos` repositories and `tags` tags of one repository (`big/tags`), through
/// the storage API (a push each would take minutes); all share one small image.
async fn fill_many(s: &TestServer, repos: usize, tags: usize) {
    let store = s.state.store().clone();
    let image = Image::new(77, &[100]);
    let body = bytes::Bytes::from(image.manifest.clone());
    let mut put = Vec::new();
    for i in 0..repos {
        put.push((format!("many/repo-{i:05}"), "1".to_owned()));
    }
    for i in 0..tags {
        put.push(("big/tags".to_owned(), format!("v{i:05}")));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in put.chunks(500) {
        let (store, chunk, body) = (store.clone(), chunk.to_vec(), body.clone());
        tasks.spawn(async move {
            for (repo, tag) in chunk {
                store
                    .put_cached_manifest(
                        &repo.parse().unwrap(),
                        &tag.parse().unwrap(),
                        crate::support::DOCKER_MANIFEST,
                        body.clone(),
                    )
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn search_and_pages_stay_bounded_over_10000_repositories_and_10000_tags() {
    let s = TestServer::start().await;
    let started = std::time::Instant::now();
    fill_many(&s, 10_000, 10_000).await;
    eprintln!(
        "filled 10,000 repositories and 10,000 tags in {:?}",
        started.elapsed()
    );
    let mut times = Vec::new();
    // Search finds the one repository among 10,000.
    let (st, page, ms) = get(&s, "/ui/?q=repo-04321", None).await;
    times.push(("search", ms));
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        page.matches("<tr>").count(),
        2,
        "one header row, one match: {page}"
    );
    assert!(page.contains(">many/repo-04321<"));
    // Pages of 50, the next one after the last shown.
    let (_, first, ms) = get(&s, "/ui/?q=many", None).await;
    times.push(("repositories", ms));
    assert_eq!(first.matches("<tr>").count(), 51);
    assert!(first.contains(">many/repo-00049<") && !first.contains(">many/repo-00050<"));
    let next = first
        .split("id=\"next\" href=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a next link")
        .replace("&amp;", "&");
    let (_, second, ms) = get(&s, &next, None).await;
    times.push(("repositories, page 2", ms));
    assert!(second.contains(">many/repo-00050<") && second.contains(">many/repo-00099<"));
    assert!(!second.contains(">many/repo-00049<"));
    // One repository of 10,000 tags.
    let (_, tags, ms) = get(&s, "/ui/repo?name=big/tags", None).await;
    times.push(("10,000 tags", ms));
    assert!(
        tags.contains("10000 tags"),
        "{}",
        &tags[..tags.len().min(2000)]
    );
    assert_eq!(tags.matches("data-tag=").count(), 50);
    let (_, deep, ms) = get(&s, "/ui/repo?name=big/tags&after=v09000", None).await;
    times.push(("10,000 tags, deep page", ms));
    assert!(deep.contains("data-tag=\"v09001\"") && deep.contains("data-tag=\"v09050\""));
    let (_, _, ms) = get(&s, "/ui/image?name=big/tags&ref=v05000", None).await;
    times.push(("image", ms));
    // Server time, as the Server-Timing header tells (measured in bench/, not asserted here).
    eprintln!("server time per page (ms): {times:?}");
    assert!(times.iter().all(|(_, ms)| ms.is_finite()), "{times:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cache_page_shows_health_hits_bytes_and_the_most_pulled_images() {
    let upstream = TestServer::start().await;
    let image = Image::new(31, &[50_000, 20_000]);
    image
        .push(&upstream.root(), "library/app", "1", Auth::None)
        .await;
    let other = Image::new(32, &[10_000]);
    other
        .push(&upstream.root(), "library/tool", "2", Auth::None)
        .await;
    // Without read-ahead, whose fetches race the first pull's GETs (a blob it stored first
    // is a hit for the client): the counts below are then exact.
    let s = crate::proxy::cache(
        vec![crate::proxy::upstream("docker.io", &upstream.root(), |u| {
            u.read_ahead = false
        })],
        |_| {},
    )
    .await;
    for i in 0..3 {
        image
            .pull(&s.root(), "docker.io/library/app", "1", "")
            .await
            .unwrap();
        if i == 0 {
            // A client has a blob's last byte before the cache has synced and committed it;
            // a pull in that gap joins the fetch still running (a miss). The counts below are
            // for pulls after it.
            let held = crate::proxy::cached_blobs(
                &s,
                "docker.io/library/app",
                &image,
                Duration::from_secs(10),
            )
            .await;
            assert_eq!(
                held,
                image.blobs.len(),
                "the first pull's blobs were not stored"
            );
        }
    }
    other
        .pull(&s.root(), "docker.io/library/tool", "2", "")
        .await
        .unwrap();
    let (_, page, _) = get(&s, "/ui/cache", None).await;
    let section = &page[page
        .find("data-upstream=\"docker.io\"")
        .expect("the upstream")..];
    let blob_bytes = |i: &Image| i.blobs.iter().map(Vec::len).sum::<usize>();
    // Each blob fetched once, then served from the cache twice.
    assert!(
        section.contains(&format!(
            "class=\"fetched\" data-bytes=\"{}\"",
            blob_bytes(&image) + blob_bytes(&other)
        )),
        "{section}"
    );
    assert!(
        section.contains(&format!(
            "class=\"served\" data-bytes=\"{}\"",
            2 * blob_bytes(&image)
        )),
        "{section}"
    );
    // Misses: each image's manifest and blobs the first time (1 + 3, 1 + 2); hits: the second
    // and third pulls of the first (2 × (1 + 3)).
    assert!(
        section.contains("data-hits=\"8\" data-misses=\"7\""),
        "{section}"
    );
    assert!(section.contains("53 % (8 of 15)"), "{section}");
    assert!(section.contains("badge up"), "{section}");
    assert!(section.contains(&upstream.root()), "{section}");
    assert!(
        page.contains("No max_size or max_age is set"),
        "the size is not measured without eviction: {page}"
    );
    let top = &section[section.find("Most pulled").unwrap()..];
    let (app, tool) = (
        top.find("docker.io/library/app:1")
            .expect("app among the most pulled"),
        top.find("docker.io/library/tool:2")
            .expect("tool among the most pulled"),
    );
    assert!(app < tool, "the most pulled first: {top}");
    // Cached repositories are told apart in the list.
    let (_, list, _) = get(&s, "/ui/", None).await;
    assert!(
        list.contains("docker.io/library/app") && list.contains("badge cached"),
        "{list}"
    );

    // A cache of an upstream is read-only here as through the API: no delete button, and a
    // delete posted anyway is refused.
    let (_, page, _) = get(&s, "/ui/repo?name=docker.io/library/app", None).await;
    assert!(
        page.contains("data-tag=\"1\"") && !page.contains("form class=\"delete\""),
        "{page}"
    );
    // A valid token, from a local repository's page (auth is off: anyone may delete there).
    Image::new(33, &[100])
        .push(&s.root(), "local/app", "1", Auth::None)
        .await;
    let (_, local, _) = get(&s, "/ui/repo?name=local/app", None).await;
    let r = post_form(
        s.url("/ui/delete"),
        None,
        format!("csrf={}&name=docker.io%2Flibrary%2Fapp&tag=1", csrf(&local)),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let (_, page, _) = get(&s, "/ui/repo?name=docker.io/library/app", None).await;
    assert!(
        page.contains("data-tag=\"1\""),
        "the cached tag is still there"
    );

    // The upstream goes away: the next miss marks it down, with what failed.
    drop(upstream);
    let _ = client()
        .get(s.url("/v2/docker.io/library/gone/manifests/1"))
        .send()
        .await
        .unwrap();
    let (_, page, _) = get(&s, "/ui/cache", None).await;
    assert!(page.contains("badge down"), "{page}");
    // Garbage collection: the last run and what it freed.
    s.state
        .store()
        .gc(&berth_storage::GcPolicy::default(), false)
        .await
        .unwrap();
    let (_, page, _) = get(&s, "/ui/cache", None).await;
    assert!(
        page.contains("Last run") && page.contains("Runs every 1h"),
        "{page}"
    );
}

/// Issue 21's browser checks, in headless Chromium (`tests/browser/ui.py`): search among
/// 10,000 repositories, the image page against `skopeo inspect`, an index's platforms, the
/// referrers tree, compare, the cache page, a delete by a user with the right (after a
/// confirmation) and none by one without, anonymous views, a cross-site form refused.
/// Screenshots go to `target/ui-screenshots/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_clients_in_chromium_browse_search_compare_and_delete() {
    let skopeo = crate::support::require("skopeo");
    crate::support::require("chromium");
    crate::support::require("chromedriver");
    let upstream = TestServer::start().await;
    let cached = Image::new(41, &[30_000]);
    cached
        .push(&upstream.root(), "library/cached", "1", Auth::None)
        .await;
    let s = guarded(|c| {
        c.auth.rule.push(rule(
            &["web/**", "many/**", "docker.io/**"],
            &["anonymous", "*"],
            &["pull"],
        ));
        c.proxy.upstream = vec![crate::proxy::upstream(
            "docker.io",
            &upstream.root(),
            |_| {},
        )];
    })
    .await;
    let alice = Auth::Basic("alice", "alice-pw");
    let f = fill(&s.root(), alice).await;
    for tag in ["1", "2"] {
        Image::new(tag.parse().unwrap(), &[1000])
            .push(&s.root(), "team/app", tag, alice)
            .await;
    }
    fill_many(&s, 10_000, 0).await;
    cached
        .pull(&s.root(), "docker.io/library/cached", "1", "")
        .await
        .unwrap();

    let host = s.addr.to_string();
    let inspect = |args: &[&str]| -> Value {
        let out = std::process::Command::new(&skopeo)
            .arg("inspect")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let at = format!("docker://{host}/web/app:1.0");
    let creds = ["--tls-verify=false", "--creds", "alice:alice-pw"];
    let image = json!({
        "raw": inspect(&[&creds[..], &["--raw", &at]].concat()),
        "config": inspect(&[&creds[..], &["--config", &at]].concat()),
    });
    let index = inspect(&[
        "--tls-verify=false",
        "--creds",
        "alice:alice-pw",
        "--raw",
        &format!("docker://{host}/web/multi:latest"),
    ]);
    let (l1, l2) = (layers(&f.v1), layers(&f.v2));
    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots");
    let cfg = json!({
        "base": s.root(),
        "screenshots": shots,
        "search": {"needle": "repo-04321", "expect": "many/repo-04321"},
        "image": {"repo": "web/app", "tag": "1.0", "skopeo": image},
        "index": {"repo": "web/multi", "tag": "latest", "raw": index},
        "referrers": {
            "top": [f.signature.digest(), f.sbom.digest()],
            "nested": f.sbom_signature.digest(),
        },
        "compare": {
            "repo": "web/app", "a": "1.0", "b": "1.1",
            "shared": [l1[0].0.clone(), l1[1].0.clone()],
            "removed": [l1[2].0.clone()],
            "added": [l2[2].0.clone()],
        },
        "cached": "docker.io/library/cached:1",
    });
    let file = s.dir.path().join("ui-checks.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/ui.py");
    // Chromium leaves a directory in the temporary directory at every start, and its crash
    // reports' settings and dconf's cache under the home directory: all in this test's own
    // directory, so that they go with the test.
    let tmp = s.dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    // Five minutes at most (coreutils' timeout), off the runtime the server runs on.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("timeout")
            .args(["300", "python3"])
            .arg(&script)
            .arg(&file)
            .env("TMPDIR", &tmp)
            .env("XDG_CONFIG_HOME", &tmp)
            .env("XDG_CACHE_HOME", &tmp)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "browser checks failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for page in ["repositories", "repository", "image", "compare", "cache"] {
        assert!(
            shots.join(format!("{page}.png")).exists(),
            "a screenshot of {page}"
        );
    }
}

/// Replicas sign sessions with the secret they share through the metadata: a session made on
/// one replica is valid on another, and so is its form token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_from_one_replica_is_valid_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(
        &htpasswd,
        format!(
            "alice:{}\n",
            berth_auth::htpasswd::hash("alice-pw", 4).unwrap()
        ),
    )
    .unwrap();
    let extra = format!(
        "[auth]\nmode = \"basic\"\nhtpasswd = \"{}\"\nadmins = [\"alice\"]\n",
        htpasswd.display()
    );
    let cluster = crate::support::cluster::Cluster::start("ui-session", 2, &extra);
    let alice = Auth::Basic("alice", "alice-pw");
    for tag in ["1", "2"] {
        Image::new(tag.parse().unwrap(), &[1000])
            .push(&cluster.root(), "team/app", tag, alice)
            .await;
    }
    let r = post_form(
        format!("{}/ui/login", cluster.replica(0)),
        None,
        "user=alice&password=alice-pw".to_owned(),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let page = |i: usize| {
        let (url, cookie) = (cluster.replica(i), cookie.clone());
        async move {
            no_redirects()
                .get(format!("{url}/ui/repo?name=team/app"))
                .header("cookie", cookie)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let (on_0, on_1) = (page(0).await, page(1).await);
    assert!(
        on_1.contains("id=\"user\">alice<") && on_1.contains("data-tag=\"1\""),
        "{on_1}"
    );
    // The token of replica 0's page deletes through replica 1.
    let session = cookie.strip_prefix("berth_session=").unwrap();
    let r = post_form(
        format!("{}/ui/delete", cluster.replica(1)),
        Some(session),
        format!("csrf={}&name=team%2Fapp&tag=1", csrf(&on_0)),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let after = page(0).await;
    assert!(
        !after.contains("data-tag=\"1\"") && after.contains("data-tag=\"2\""),
        "{after}"
    );
}
