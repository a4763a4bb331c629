//! The page handlers. Each reads what it shows through the storage API, in bounded pieces,
//! after checking that the viewer may pull the repository (the API's policy); a repository
//! the viewer may not see gets the same 404 as one that does not exist.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use axum::extract::{RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use berth_auth::{Actions, Scope};
use berth_storage::{Digest, Reference, RepoName};
use futures_util::StreamExt as _;
use maud::{Markup, html};

use super::UiError;
use super::session::{self, Viewer};
use super::view::{self, Config, Facts, Kind};
use crate::state::AppState;

/// Rows per listing page.
const PAGE: usize = 50;
/// Database pages the repository list reads at most for one page of visible names.
const SCAN: usize = 20;
/// The largest config a page reads.
const MAX_CONFIG: u64 = 4 << 20;
/// Referrers shown at most, over every level of the tree.
const MAX_REFERRERS: usize = 200;

type Page = Result<Response, UiError>;

fn params(raw: Option<&str>) -> HashMap<String, String> {
    form_urlencoded::parse(raw.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn page(title: &str, v: &Viewer, state: &AppState, body: Markup) -> Response {
    let sign_in = state.auth.is_some();
    Html(view::layout(title, v.user.as_deref(), sign_in, &v.csrf, body).into_string())
        .into_response()
}

fn may(state: &AppState, v: &Viewer, repo: &str, actions: Actions) -> bool {
    crate::auth::permits(
        state.auth.as_deref(),
        &v.caller,
        &[Scope::repository(repo, actions)],
    )
}

/// A repository page's start: who is looking, the query's parameters, and the repository
/// its `name` names when the viewer may pull it.
async fn open_repo(
    state: &AppState,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<(Viewer, HashMap<String, String>, RepoName), UiError> {
    let v = session::viewer(state, headers).await?;
    let p = params(query);
    let repo = readable(state, &v, p.get("name"))?;
    Ok((v, p, repo))
}

/// The repository named by `name`, when the viewer may pull it.
fn readable(state: &AppState, v: &Viewer, name: Option<&String>) -> Result<RepoName, UiError> {
    let name = name.ok_or_else(|| UiError::BadRequest("no repository named".into()))?;
    let repo: RepoName = name.parse().map_err(|_| UiError::NotFound)?;
    if !may(state, v, repo.as_str(), Actions::PULL) {
        return Err(UiError::NotFound);
    }
    Ok(repo)
}

fn cached(state: &AppState, name: &str) -> bool {
    state
        .registry
        .proxy()
        .is_some_and(|p| p.is_cache_name(name))
}

/// `/ui/?q=&after=`: repositories whose names contain `q`, 50 a page, only those the viewer
/// may see.
pub(super) async fn repositories(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Page {
    let v = session::viewer(&state, &headers).await?;
    let p = params(q.as_deref());
    let needle = p.get("q").map_or("", |s| s.trim());
    let mut after = p.get("after").cloned();
    // Filtering by rights may thin a page: read on, up to SCAN database pages, then offer to
    // continue from the last name read (a page never reads the whole registry).
    let mut shown: Vec<String> = Vec::new();
    let mut resume: Option<String> = None;
    'scan: for _ in 0..SCAN {
        let page = state
            .store()
            .find_repos(needle, after.as_deref(), PAGE)
            .await?;
        for name in &page.items {
            let visible = match state.auth.as_deref() {
                None => true,
                Some(a) => a.may_list(&v.caller, name),
            };
            if !visible {
                continue;
            }
            if shown.len() == PAGE {
                resume = shown.last().cloned();
                break 'scan;
            }
            shown.push(name.clone());
        }
        after = page.items.last().cloned();
        if !page.more {
            break;
        }
        resume = after.clone();
    }
    let next = resume.map(|last| format!("/ui/?q={}&after={}", enc(needle), enc(&last)));
    let body = html! {
        h1 { "Repositories" }
        form.search method="get" action="/ui/" {
            input type="search" name="q" id="q" value=(needle) placeholder="Search by name" autofocus;
            button type="submit" { "Search" }
        }
        @if shown.is_empty() && next.is_some() {
            p.empty { "None of the repositories read so far is one you may see; the next page reads on." }
        } @else if shown.is_empty() {
            p.empty { "No repositories" @if !needle.is_empty() { " match " code { (needle) } } "." }
        } @else {
            table id="repositories" {
                thead { tr { th { "Name" } th { "Kind" } } }
                tbody {
                    @for name in &shown {
                        tr {
                            td { a href={ "/ui/repo?name=" (enc(name)) } { (name) } }
                            td { @if cached(&state, name) { span.badge.cached { "cached" } } @else { span.badge.local { "local" } } }
                        }
                    }
                }
            }
        }
        @if let Some(n) = next { p.pager { a id="next" href=(n) { "Next page →" } } }
    };
    Ok(page("Repositories", &v, &state, body))
}

/// What a tag listing shows of an image config: its platform and build time.
type Summary = (String, Option<String>);

/// A content-addressed cache of what a tag listing shows of an image config (its platform
/// and build time): configs never change, so entries never go stale. Per process, cleared
/// when it holds [`CONFIGS_KEPT`] entries.
static CONFIGS: OnceLock<Mutex<HashMap<String, Summary>>> = OnceLock::new();
const CONFIGS_KEPT: usize = 10_000;

async fn config_summary(state: &AppState, repo: &RepoName, digest: &str) -> Option<Summary> {
    let cache = CONFIGS.get_or_init(Default::default);
    if let Some(hit) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(digest) {
        return Some(hit.clone());
    }
    let d: Digest = digest.parse().ok()?;
    let bytes = state.store().peek_blob(repo, &d, MAX_CONFIG).await.ok()??;
    let c = Config::of(&bytes);
    let summary = (c.platform, c.created);
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() >= CONFIGS_KEPT {
        map.clear();
    }
    map.insert(digest.to_owned(), summary.clone());
    Some(summary)
}

/// `/ui/repo?name=&after=`: a repository's tags, 50 a page.
pub(super) async fn repository(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Page {
    let (v, p, repo) = open_repo(&state, &headers, q.as_deref()).await?;
    let after = p.get("after").map(String::as_str);
    let rows = state.store().tag_rows(&repo, after, PAGE + 1).await?;
    let more = rows.len() > PAGE;
    let rows = &rows[..rows.len().min(PAGE)];
    let total = state.store().count_tags(&repo).await?;
    let may_delete =
        may(&state, &v, repo.as_str(), Actions::DELETE) && !cached(&state, repo.as_str());
    // The configs of the page's images, read at most 8 at a time.
    let facts: Vec<Facts> = rows
        .iter()
        .map(|r| Facts::of(&r.media_type, &r.content))
        .collect();
    let configs: Vec<Option<String>> = facts
        .iter()
        .map(|f| match (&f.kind, &f.config) {
            (Kind::Image, Some((d, _))) => Some(d.clone()),
            _ => None,
        })
        .collect();
    let summaries: Vec<Option<Summary>> = futures_util::stream::iter(configs)
        .map(|d| {
            let (state, repo) = (state.clone(), repo.clone());
            async move {
                match d {
                    Some(d) => config_summary(&state, &repo, &d).await,
                    None => None,
                }
            }
        })
        .buffered(8)
        .collect()
        .await;
    let name = repo.as_str();
    let next = rows
        .last()
        .filter(|_| more)
        .map(|r| format!("/ui/repo?name={}&after={}", enc(name), enc(&r.tag)));
    let body = html! {
        p.crumbs { a href="/ui/" { "Repositories" } " / " }
        h1 { (name) " " @if cached(&state, name) { span.badge.cached { "cached" } } }
        p { (total) " tags" }
        @if rows.is_empty() {
            p.empty { "No tags." }
        } @else {
            table id="tags" {
                thead { tr {
                    th { "Tag" } th { "Digest" } th { "Kind" } th.num { "Size" } th { "Platforms" }
                    th { "Created" } th { "Pushed" } th { "Last pulled" }
                    @if may_delete { th {} }
                } }
                tbody {
                    @for ((r, f), s) in rows.iter().zip(&facts).zip(&summaries) {
                        tr data-tag=(r.tag) {
                            td { a href={ "/ui/image?name=" (enc(name)) "&ref=" (enc(&r.tag)) } { (r.tag) } }
                            td { code title=(r.digest) { (view::short(&r.digest)) } }
                            td { (f.kind.label()) }
                            td.num data-bytes=(f.total) { (view::size(f.total)) }
                            td.platforms {
                                @if f.kind == Kind::Index { (f.platform_list()) }
                                @else if let Some((platform, _)) = s { (platform) }
                            }
                            td { @if let Some((_, Some(c))) = s { (c.get(..10).unwrap_or(c)) } }
                            td { (view::time(r.pushed)) }
                            td { @if let Some(t) = r.last_pulled { (view::time(t)) } @else { "never" } }
                            @if may_delete {
                                td {
                                    form.delete method="post" action="/ui/delete" data-confirm={ "Delete tag " (r.tag) "? The image stays if other tags or digests use it." } {
                                        input type="hidden" name="csrf" value=(v.csrf);
                                        input type="hidden" name="name" value=(name);
                                        input type="hidden" name="tag" value=(r.tag);
                                        button.danger type="submit" { "Delete" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(n) = next { p.pager { a id="next" href=(n) { "Next page →" } } }
    };
    Ok(page(name, &v, &state, body))
}

fn reference(p: &HashMap<String, String>, key: &str) -> Result<Reference, UiError> {
    p.get(key)
        .ok_or_else(|| UiError::BadRequest(format!("no {key} given")))?
        .parse()
        .map_err(|_| UiError::NotFound)
}

/// The host clients pull from: the public URL's, or the one this request was sent to.
fn pull_host(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(u) = &state.config.public_url {
        let rest = u.split_once("://").map_or(u.as_str(), |(_, r)| r);
        return rest.trim_end_matches('/').to_owned();
    }
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("localhost:5000")
        .to_owned()
}

fn pull_commands(
    state: &AppState,
    headers: &HeaderMap,
    name: &str,
    r: &str,
) -> Vec<(&'static str, String)> {
    let host = pull_host(state, headers);
    let sep = if r.contains(':') { '@' } else { ':' };
    let image = format!("{host}/{name}{sep}{r}");
    let https = state.config.tls.enabled()
        || state
            .config
            .public_url
            .as_deref()
            .is_some_and(|u| u.starts_with("https://"));
    let (ctr_flag, crane_flag) = if https {
        ("", "")
    } else {
        (" --plain-http", " --insecure")
    };
    vec![
        ("docker", format!("docker pull {image}")),
        ("podman", format!("podman pull {image}")),
        ("ctr", format!("ctr image pull{ctr_flag} {image}")),
        ("crane", format!("crane pull{crane_flag} {image} image.tar")),
    ]
}

/// A referrer and those that refer to it.
struct Node {
    r: berth_storage::Referrer,
    children: Vec<Node>,
}

/// The referrers of `subject`, and theirs, up to three levels and [`MAX_REFERRERS`] in all.
async fn referrer_tree(
    state: &AppState,
    repo: &RepoName,
    subject: &Digest,
) -> Result<Vec<Node>, UiError> {
    let mut budget = MAX_REFERRERS;
    let mut level: Vec<(Vec<usize>, Digest)> = vec![(vec![], subject.clone())];
    let mut roots: Vec<Node> = Vec::new();
    for _ in 0..3 {
        let mut next = Vec::new();
        for (path, d) in level {
            if budget == 0 {
                break;
            }
            let mut found = state.store().referrers(repo, &d, None).await?;
            found.truncate(budget);
            budget -= found.len();
            let siblings = {
                let mut at = &mut roots;
                for i in &path {
                    at = &mut at[*i].children;
                }
                at
            };
            for r in found {
                if let Ok(child) = r.digest.parse::<Digest>() {
                    let mut p = path.clone();
                    p.push(siblings.len());
                    next.push((p, child));
                }
                siblings.push(Node {
                    r,
                    children: Vec::new(),
                });
            }
        }
        level = next;
    }
    Ok(roots)
}

fn tree(name: &str, nodes: &[Node]) -> Markup {
    html! {
        ul.tree {
            @for n in nodes {
                li.referrer data-digest=(n.r.digest) {
                    span.badge { (n.r.artifact_type.as_deref().unwrap_or(&n.r.media_type)) }
                    " "
                    a href={ "/ui/image?name=" (enc(name)) "&ref=" (enc(&n.r.digest)) } { code { (view::short(&n.r.digest)) } }
                    " " (view::size(n.r.size))
                    @if !n.children.is_empty() { (tree(name, &n.children)) }
                }
            }
        }
    }
}

/// `/ui/image?name=&ref=`: one manifest: what it is made of, how to pull it, what refers to it.
pub(super) async fn image(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Page {
    let (v, p, repo) = open_repo(&state, &headers, q.as_deref()).await?;
    let r = reference(&p, "ref")?;
    let m = state.store().peek_manifest(&repo, &r).await?;
    let mut facts = Facts::of(&m.media_type, &m.bytes);
    let config = match facts.kind {
        Kind::Image => read_config(&state, &repo, &facts).await?,
        _ => None,
    };
    if let Some(c) = &config {
        facts.attach_history(c);
    }
    let referrers = referrer_tree(&state, &repo, &m.digest).await?;
    let name = repo.as_str();
    let shown_ref = r.to_string();
    let pretty = serde_json::from_slice::<serde_json::Value>(&m.bytes)
        .and_then(|j| serde_json::to_string_pretty(&j))
        .unwrap_or_else(|_| String::from_utf8_lossy(&m.bytes).into_owned());
    let digest = m.digest.to_string();
    let commands = pull_commands(&state, &headers, name, &shown_ref);
    let tags = state
        .store()
        .list_tags(&repo, None, PAGE)
        .await
        .map(|p| p.items)
        .unwrap_or_default();
    let body = html! {
        p.crumbs { a href="/ui/" { "Repositories" } " / " a href={ "/ui/repo?name=" (enc(name)) } { (name) } " / " }
        h1 { (name) @if matches!(r, Reference::Tag(_)) { ":" (shown_ref) } }
        dl.facts {
            dt { "Digest" } dd { code id="digest" { (digest) } }
            dt { "Kind" } dd id="kind" { (facts.kind.label()) }
            dt { "Media type" } dd { code { (facts.media_type) } }
            @if let Some(at) = &facts.artifact_type { dt { "Artifact type" } dd { code { (at) } } }
            dt { "Size" } dd id="total" data-bytes=(facts.total) { (view::size(facts.total)) }
            @if let Some(s) = &facts.subject {
                dt { "Subject" } dd { a href={ "/ui/image?name=" (enc(name)) "&ref=" (enc(s)) } { code { (view::short(s)) } } }
            }
        }
        h2 { "Pull" }
        ul.commands {
            @for (tool, cmd) in &commands {
                li { span.tool { (tool) } code.cmd { (cmd) } button.copy type="button" data-copy=(cmd) { "Copy" } }
            }
        }
        @if !facts.platforms.is_empty() {
            h2 { "Platforms" }
            table id="platforms" {
                thead { tr { th { "Platform" } th { "Manifest" } th.num { "Size" } } }
                tbody { @for pl in &facts.platforms {
                    tr { td.platform { (pl.name) } td { a href={ "/ui/image?name=" (enc(name)) "&ref=" (enc(&pl.digest)) } { code title=(pl.digest) { (view::short(&pl.digest)) } } } td.num { (view::size(pl.size)) } }
                } }
            }
        }
        @if let Some(c) = &config {
            h2 { "Config" }
            dl.facts id="config" {
                dt { "Platform" } dd id="platform" { (c.platform) }
                @if let Some(t) = &c.created { dt { "Created" } dd { (t) } }
                @if !c.entrypoint.is_empty() { dt { "Entrypoint" } dd { code { (c.entrypoint.join(" ")) } } }
                @if !c.cmd.is_empty() { dt { "Cmd" } dd { code { (c.cmd.join(" ")) } } }
                @if let Some(u) = &c.user { dt { "User" } dd { code { (u) } } }
                @if let Some(w) = &c.workdir { dt { "Workdir" } dd { code { (w) } } }
                @if !c.ports.is_empty() { dt { "Exposed ports" } dd { (c.ports.join(", ")) } }
                @if !c.env.is_empty() { dt { "Env" } dd { ul.plain { @for e in &c.env { li { code { (e) } } } } } }
                @if !c.labels.is_empty() { dt { "Labels" } dd { ul.plain { @for (k, val) in &c.labels { li { code { (k) "=" (val) } } } } } }
            }
        }
        @if !facts.layers.is_empty() {
            h2 { "Layers" }
            table id="layers" {
                thead { tr { th { "#" } th { "Digest" } th.num { "Size" } th { "Created by" } } }
                tbody { @for (i, l) in facts.layers.iter().enumerate() {
                    tr.layer data-digest=(l.digest) data-bytes=(l.size) {
                        td { (i + 1) } td { code title=(l.digest) { (view::short(&l.digest)) } } td.num { (view::size(l.size)) }
                        td.history { @if let Some(c) = &l.created_by { code { (c) } } }
                    }
                } }
            }
        }
        h2 { "Referrers" }
        @if referrers.is_empty() { p.empty id="no-referrers" { "Nothing refers to this manifest." } }
        @else { div id="referrers" { (tree(name, &referrers)) } }
        @if facts.kind != Kind::Index && !tags.is_empty() {
            h2 { "Compare" }
            form.compare method="get" action="/ui/compare" {
                input type="hidden" name="name" value=(name);
                input type="hidden" name="a" value=(shown_ref);
                label { "with " select name="b" id="compare-with" { @for t in &tags { option value=(t) { (t) } } } }
                button type="submit" { "Compare" }
            }
        }
        h2 { "Manifest" }
        p { a id="raw" href={ "/ui/raw?name=" (enc(name)) "&ref=" (enc(&digest)) } { "Exact bytes" } " (" (m.bytes.len()) " bytes)" }
        pre.manifest { code { (pretty) } }
    };
    Ok(page(name, &v, &state, body))
}

/// `/ui/raw?name=&ref=`: a manifest's exact bytes, as text.
pub(super) async fn raw(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Page {
    let (_, p, repo) = open_repo(&state, &headers, q.as_deref()).await?;
    let m = state
        .store()
        .peek_manifest(&repo, &reference(&p, "ref")?)
        .await?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
            (
                header::HeaderName::from_static("docker-content-digest"),
                m.digest.to_string(),
            ),
        ],
        m.bytes,
    )
        .into_response())
}

/// The config a manifest names, when the repository holds it and it is at most
/// [`MAX_CONFIG`] bytes.
async fn read_config(
    state: &AppState,
    repo: &RepoName,
    facts: &Facts,
) -> Result<Option<Config>, UiError> {
    let Some(d) = facts
        .config
        .as_ref()
        .and_then(|(d, _)| d.parse::<Digest>().ok())
    else {
        return Ok(None);
    };
    let bytes = state.store().peek_blob(repo, &d, MAX_CONFIG).await?;
    Ok(bytes.map(|b| Config::of(&b)))
}

/// An image to compare: the manifest itself, or for an index the image for `platform` (or
/// its first).
async fn comparable(
    state: &AppState,
    repo: &RepoName,
    r: &Reference,
    platform: Option<&str>,
) -> Result<(String, Facts, Config), UiError> {
    let m = state.store().peek_manifest(repo, r).await?;
    let mut digest = m.digest.to_string();
    let mut facts = Facts::of(&m.media_type, &m.bytes);
    if facts.kind == Kind::Index {
        let pick = facts
            .platforms
            .iter()
            .find(|p| Some(p.name.as_str()) == platform)
            .or_else(|| facts.platforms.iter().find(|p| p.name == "linux/amd64"))
            .or_else(|| facts.platforms.first())
            .ok_or(UiError::NotFound)?;
        let child: Reference = pick.digest.parse().map_err(|_| UiError::NotFound)?;
        let m = state.store().peek_manifest(repo, &child).await?;
        digest = m.digest.to_string();
        facts = Facts::of(&m.media_type, &m.bytes);
    }
    let config = read_config(state, repo, &facts).await?.unwrap_or_default();
    facts.attach_history(&config);
    Ok((digest, facts, config))
}

fn layer_rows(id: &str, layers: &[&view::Layer]) -> Markup {
    html! {
        table id=(id) {
            thead { tr { th { "Digest" } th.num { "Size" } th { "Created by" } } }
            tbody { @for l in layers {
                tr.layer data-digest=(l.digest) { td { code title=(l.digest) { (view::short(&l.digest)) } } td.num { (view::size(l.size)) } td.history { @if let Some(c) = &l.created_by { code { (c) } } } }
            } }
        }
    }
}

/// `/ui/compare?name=&a=&b=`: what changed between two tags or digests.
pub(super) async fn compare(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Page {
    let (v, p, repo) = open_repo(&state, &headers, q.as_deref()).await?;
    let (ra, rb) = (reference(&p, "a")?, reference(&p, "b")?);
    let (da, fa, ca) = comparable(&state, &repo, &ra, None).await?;
    let (db, fb, cb) = comparable(&state, &repo, &rb, Some(ca.platform.as_str())).await?;
    let (shared, removed, added) = view::layer_diff(&fa.layers, &fb.layers);
    let differences = ca.differences(&cb);
    let name = repo.as_str();
    let body = html! {
        p.crumbs { a href="/ui/" { "Repositories" } " / " a href={ "/ui/repo?name=" (enc(name)) } { (name) } " / " }
        h1 { "Compare " (ra) " → " (rb) }
        table id="summary" {
            thead { tr { th {} th { (ra) } th { (rb) } th { "Change" } } }
            tbody {
                tr { th { "Manifest" } td { code { (view::short(&da)) } } td { code { (view::short(&db)) } } td {} }
                tr { th { "Platform" } td { (ca.platform) } td { (cb.platform) } td {} }
                tr { th { "Size" } td { (view::size(fa.total)) } td { (view::size(fb.total)) } td id="delta" { (view::delta(fa.total, fb.total)) } }
                tr { th { "Layers" } td { (fa.layers.len()) } td { (fb.layers.len()) } td {} }
            }
        }
        h2 { "Shared layers (" (shared.len()) ")" } (layer_rows("shared", &shared))
        h2 { "Removed layers (" (removed.len()) ")" } (layer_rows("removed", &removed))
        h2 { "Added layers (" (added.len()) ")" } (layer_rows("added", &added))
        h2 { "Config differences" }
        @if differences.is_empty() { p.empty { "None." } }
        @else {
            table id="config-diff" {
                thead { tr { th { "Setting" } th { (ra) } th { (rb) } } }
                tbody { @for (k, a, b) in &differences { tr { th { (k) } td { code { (a) } } td { code { (b) } } } } }
            }
        }
    };
    Ok(page("Compare", &v, &state, body))
}

/// `/ui/cache`: per upstream, its health and what this process's cache did for it; cache
/// size and garbage collection.
pub(super) async fn cache(State(state): State<AppState>, headers: HeaderMap) -> Page {
    let v = session::viewer(&state, &headers).await?;
    let gc = state.store().last_gc_run().await?;
    let interval = state.config.gc.interval;
    let proxy = state.registry.proxy();
    let body = html! {
        h1 { "Cache" }
        @match proxy {
            None => p.empty { "No upstreams are configured: Berth is not caching any registry." },
            Some(proxy) => {
                @let policy = proxy.evict_policy();
                p id="cache-size" {
                    @match (proxy.last_eviction(), policy.max_bytes.is_some() || policy.max_age.is_some()) {
                        (Some((at, r)), _) => {
                            "Cached images hold " (view::size(r.bytes_after))
                            @if let Some(max) = policy.max_bytes { " of a " (view::size(max)) " cap (max_size)" }
                            " (measured " (view::time(at)) ")."
                        }
                        (None, true) => {
                            "Cache size: measured by the first eviction run, a few minutes after start."
                            @if let Some(max) = policy.max_bytes { " The cap (max_size) is " (view::size(max)) "." }
                        }
                        (None, false) => {
                            "No max_size or max_age is set: nothing is evicted and the size is not measured."
                        }
                    }
                    @if let Some(age) = policy.max_age { " Images unpulled for " (humantime::format_duration(age)) " go." }
                }
                p.note { "Counts are this process's, since it started." }
                @for u in proxy.upstreams() {
                    @let s = u.stats.snapshot(10);
                    section.upstream data-upstream=(u.name) {
                        h2 { (u.name) @if u.default { " " span.badge { "default" } } }
                        table.health {
                            thead { tr { th { "Endpoint" } th { "State" } th { "Last error" } } }
                            tbody { @for h in u.health() {
                                @let up = h.availability() == crate::proxy::health::Availability::Up;
                                tr { td { code { (h.url()) } } td { @if up { span.badge.up { "up" } } @else { span.badge.down { "down" } } } td { (h.last_error().unwrap_or_default()) } }
                            } }
                        }
                        @let asked = s.hits + s.misses;
                        dl.facts {
                            dt { "Hit ratio" } dd.hits data-hits=(s.hits) data-misses=(s.misses) {
                                @if asked == 0 { "no requests yet" } @else { (format!("{:.0} %", 100.0 * s.hits as f64 / asked as f64)) " (" (s.hits) " of " (asked) ")" }
                            }
                            dt { "Served from cache" } dd.served data-bytes=(s.served_bytes) { (view::size(s.served_bytes)) }
                            dt { "Fetched upstream" } dd.fetched data-bytes=(s.fetched_bytes) { (view::size(s.fetched_bytes)) }
                        }
                        h3 { "Most pulled" }
                        @if s.top.is_empty() { p.empty { "Nothing pulled yet." } }
                        @else {
                            table.top {
                                thead { tr { th { "Image" } th.num { "Pulls" } } }
                                tbody { @for (image, n) in &s.top {
                                    @let (repo, tag) = image.rsplit_once(':').unwrap_or((image.as_str(), ""));
                                    tr { td { a href={ "/ui/image?name=" (enc(repo)) "&ref=" (enc(tag)) } { (image) } } td.num { (n) } }
                                } }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Garbage collection" }
        @match &gc {
            None => p id="gc" { "No collection has run yet." },
            Some(run) => p id="gc" {
                "Last run " (view::time(run.finished_at)) ": freed " (run.report.blobs) " blobs (" (view::size(run.report.blob_bytes)) ") and "
                (run.report.manifests) " manifests, in " (humantime::format_duration(std::time::Duration::from_millis(run.duration.as_millis() as u64))) "."
            },
        }
        p id="gc-next" {
            @if interval.is_zero() { "Scheduled collection is off." }
            @else {
                "Runs every " (humantime::format_duration(interval))
                @if let Some(run) = &gc { "; next about " (view::time(run.started_at + interval.as_secs() as i64)) }
                "."
            }
        }
    };
    Ok(page("Cache", &v, &state, body))
}

/// `GET /ui/login`.
pub(super) async fn login_form(State(state): State<AppState>, headers: HeaderMap) -> Page {
    let v = session::viewer(&state, &headers).await?;
    Ok(login_page(&state, &v, None, StatusCode::OK))
}

fn login_page(state: &AppState, v: &Viewer, error: Option<&str>, status: StatusCode) -> Response {
    let body = html! {
        h1 { "Sign in" }
        @if state.auth.is_none() { p { "Authentication is off: everything is open." } }
        @else {
            @if let Some(e) = error { p.error id="login-error" { (e) } }
            form.login method="post" action="/ui/login" {
                label { "User " input type="text" name="user" id="login-user" autocomplete="username" required; }
                label { "Password " input type="password" name="password" id="login-password" autocomplete="current-password" required; }
                button type="submit" id="login-submit" { "Sign in" }
            }
        }
    };
    (status, page("Sign in", v, state, body)).into_response()
}

/// `POST /ui/login`: checks the password like the API's Basic auth (failures count toward
/// the address's limit) and sets the session cookie.
pub(super) async fn login(State(state): State<AppState>, req: Request) -> Page {
    let headers = req.headers().clone();
    if !session::same_site(&headers) {
        return Err(UiError::Forbidden("cross-site request refused"));
    }
    let ip = crate::auth::client_ip(&req, &state.config.auth.trusted_proxies);
    let form = read_form(&state, req).await?;
    let v = session::viewer(&state, &headers).await?;
    let Some(auth) = state.auth.as_deref() else {
        return Ok(Redirect::to("/ui/").into_response());
    };
    let user = form.get("user").map_or("", String::as_str);
    let password = form.get("password").map_or("", String::as_str);
    match auth.login(ip, user, password).await {
        Ok(()) => {}
        Err(crate::auth::Rejection::TooManyFailures(d)) => {
            let msg = format!(
                "Too many failed sign-ins; try again in {} s.",
                d.as_secs().max(1)
            );
            return Ok(login_page(
                &state,
                &v,
                Some(&msg),
                StatusCode::TOO_MANY_REQUESTS,
            ));
        }
        Err(_) => {
            return Ok(login_page(
                &state,
                &v,
                Some("Wrong user or password."),
                StatusCode::UNAUTHORIZED,
            ));
        }
    }
    let ttl = state.config.ui.session_ttl;
    let expires = berth_storage::meta::now() + ttl.as_secs() as i64;
    let Some(value) = session::issue(&state, user, expires).await? else {
        return Ok(login_page(
            &state,
            &v,
            Some("Wrong user or password."),
            StatusCode::UNAUTHORIZED,
        ));
    };
    tracing::info!(user, "web UI sign-in");
    Ok((
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                session::set_cookie(&state, &value, ttl.as_secs()),
            ),
            (header::LOCATION, "/ui/".to_owned()),
        ],
    )
        .into_response())
}

/// The largest form the UI reads.
const MAX_FORM: usize = 64 * 1024;

/// A POSTed form: at most [`MAX_FORM`] bytes, sent within `limits.body_timeout` (the API's
/// bodies have the same bound on silence; a form is small, so this bounds it whole).
async fn read_form(state: &AppState, req: Request) -> Result<HashMap<String, String>, UiError> {
    let read = axum::body::to_bytes(req.into_body(), MAX_FORM);
    let body = tokio::time::timeout(state.limits.body_timeout, read)
        .await
        .map_err(|_| UiError::BadRequest("the form was not sent in time".into()))?
        .map_err(|_| UiError::BadRequest("the form is too large".into()))?;
    Ok(params(std::str::from_utf8(&body).ok()))
}

/// Reads a change's form and checks that it comes from this site with the viewer's token.
async fn change(
    state: &AppState,
    req: Request,
) -> Result<(Viewer, HashMap<String, String>), UiError> {
    let headers = req.headers().clone();
    if !session::same_site(&headers) {
        return Err(UiError::Forbidden("cross-site request refused"));
    }
    let v = session::viewer(state, &headers).await?;
    let form = read_form(state, req).await?;
    if !session::csrf_ok(&v, form.get("csrf").map_or("", String::as_str)) {
        return Err(UiError::Forbidden(
            "missing or wrong form token: reload the page and try again",
        ));
    }
    Ok((v, form))
}

/// `POST /ui/logout`.
pub(super) async fn logout(State(state): State<AppState>, req: Request) -> Page {
    change(&state, req).await?;
    Ok((
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, session::set_cookie(&state, "", 0)),
            (header::LOCATION, "/ui/".to_owned()),
        ],
    )
        .into_response())
}

/// `POST /ui/delete` (name, tag, csrf): deletes a tag, for a viewer the API would let.
pub(super) async fn delete_tag(State(state): State<AppState>, req: Request) -> Page {
    let (v, form) = change(&state, req).await?;
    let name = form.get("name").map_or("", String::as_str);
    let repo: RepoName = name.parse().map_err(|_| UiError::NotFound)?;
    if !may(&state, &v, repo.as_str(), Actions::DELETE) {
        return Err(UiError::Forbidden("you may not delete in this repository"));
    }
    let tag: berth_storage::Tag = form
        .get("tag")
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| UiError::BadRequest("no valid tag given".into()))?;
    // Through the façade, as the API deletes: a cache of an upstream is read-only.
    let at = crate::registry::At {
        name: repo.as_str(),
        ns: None,
    };
    match state
        .registry
        .delete_manifest(at, &Reference::Tag(tag.clone()))
        .await
    {
        Ok(()) => {}
        Err(crate::registry::Error::ReadOnly(_)) => {
            return Err(UiError::Forbidden(
                "a cache of an upstream registry is read-only",
            ));
        }
        Err(crate::registry::Error::Storage(e)) => return Err(e.into()),
        Err(e) => return Err(UiError::BadRequest(e.to_string())),
    }
    tracing::info!(repo = %repo, tag = %tag, user = v.user.as_deref().unwrap_or(""), "tag deleted from the web UI");
    Ok(Redirect::to(&format!("/ui/repo?name={}", enc(name))).into_response())
}
