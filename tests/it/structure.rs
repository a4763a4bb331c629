//! The structure issue 16 set up, kept: no import cycle between the modules of a crate;
//! `storage` and `auth` free of axum; the HTTP layer free of SQL, object stores and upstream
//! clients. Read from the sources, so a change that breaks it fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(sources(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

/// Code without comments and without a trailing `#[cfg(test)]` module.
fn code(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => &text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Top-level module → the top-level modules it refers to (`crate::x`).
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in sources(src) {
        let rel = p.strip_prefix(src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let top = top.trim_end_matches(".rs").to_owned();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = code(&p);
        let mut refs = BTreeSet::new();
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + 7..];
            if let Some(list) = rest.strip_prefix('{') {
                let list = &list[..list.find('}').unwrap_or(list.len())];
                refs.extend(list.split(',').filter_map(|item| {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    (!name.is_empty()).then_some(name)
                }));
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                refs.insert(name);
            }
        }
        refs.remove(&top);
        g.entry(top).or_default().extend(refs);
    }
    g
}

fn cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_owned());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_owned());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    g.keys()
        .find_map(|n| visit(n, g, &mut Vec::new(), &mut done))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn no_crate_has_an_import_cycle_between_its_modules() {
    for src in ["src", "storage/src", "auth/src", "conformance/src"] {
        let g = module_graph(&root().join(src));
        assert!(g.len() > 3, "{src}: no modules found");
        if let Some(c) = cycle(&g) {
            panic!("{src}: import cycle {}", c.join(" -> "));
        }
    }
}

#[test]
fn layers_keep_to_their_dependencies() {
    for (dir, banned) in [
        ("storage", &["axum"][..]),
        ("auth", &["axum", "berth_storage", "berth-storage"][..]),
        ("src/api", &["rusqlite", "object_store", "reqwest"][..]),
        (
            "conformance",
            &["berth_storage", "berth_auth", "berth::"][..],
        ),
    ] {
        for p in sources(&root().join(dir)) {
            let text = code(&p);
            for b in banned {
                assert!(!text.contains(b), "{} uses {b}", p.display());
            }
        }
        let manifest = root().join(dir).join("Cargo.toml");
        if let Ok(m) = std::fs::read_to_string(&manifest) {
            let deps = m.split("[dev-dependencies]").next().unwrap_or("");
            for b in banned {
                assert!(!deps.contains(b), "{} depends on {b}", manifest.display());
            }
        }
    }
}
