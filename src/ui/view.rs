//! What pages show, computed from stored bytes: an image's layers, sizes, platforms and
//! config, and the difference of two images; plus the page frame and small formatting helpers.

use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

/// The page frame: title, navigation, who is signed in.
pub fn layout(title: &str, user: Option<&str>, sign_in: bool, csrf: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Berth" }
                link rel="stylesheet" href="/ui/static/berth.css";
                script src="/ui/static/berth.js" defer {}
            }
            body {
                header {
                    a.brand href="/ui/" { "Berth" }
                    nav {
                        a href="/ui/" { "Repositories" }
                        a href="/ui/cache" { "Cache" }
                    }
                    div.who {
                        @if let Some(u) = user {
                            span id="user" { (u) }
                            form method="post" action="/ui/logout" {
                                input type="hidden" name="csrf" value=(csrf);
                                button.link type="submit" { "Sign out" }
                            }
                        } @else if sign_in {
                            a id="sign-in" href="/ui/login" { "Sign in" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// `1.5 MB`-style sizes (powers of 1000, as registries and `docker images` show them).
pub fn size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A signed size difference.
pub fn delta(from: u64, to: u64) -> String {
    if to >= from {
        format!("+{}", size(to - from))
    } else {
        format!("−{}", size(from - to))
    }
}

/// A unix time as UTC, to the minute.
pub fn time(t: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(t).unwrap_or(0)),
    )
    .to_string()
    .replace('T', " ")
    .trim_end_matches('Z')
    .get(..16)
    .map_or_else(String::new, |s| format!("{s} UTC"))
}

/// `sha256:0123456789ab`: enough of a digest to tell it apart on a page.
pub fn short(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}

/// What a manifest is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An image: a config and layers.
    Image,
    /// An index or manifest list: images per platform.
    Index,
    /// An artifact (a manifest with an artifact type or a non-image config).
    Artifact,
}

impl Kind {
    /// Its label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Image => "image",
            Self::Index => "index",
            Self::Artifact => "artifact",
        }
    }
}

/// A layer, with the command that made it when the config says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Its digest.
    pub digest: String,
    /// Its size.
    pub size: u64,
    /// Its media type.
    pub media_type: String,
    /// The history entry that made it.
    pub created_by: Option<String>,
}

/// One image of an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `linux/arm64/v8`.
    pub name: String,
    /// The child manifest.
    pub digest: String,
    /// Its size.
    pub size: u64,
}

/// What a manifest's bytes say.
#[derive(Debug, Clone)]
pub struct Facts {
    /// Image, index or artifact.
    pub kind: Kind,
    /// The manifest's media type.
    pub media_type: String,
    /// The config descriptor's digest and size (images and artifacts).
    pub config: Option<(String, u64)>,
    /// Its artifact type (explicit, or a non-image config's media type).
    pub artifact_type: Option<String>,
    /// Layers, in order.
    pub layers: Vec<Layer>,
    /// An index's images.
    pub platforms: Vec<Platform>,
    /// The manifest it refers to, if any.
    pub subject: Option<String>,
    /// Manifest, config and layers (an index: the manifest and its children's manifests).
    pub total: u64,
}

const IMAGE_CONFIGS: [&str; 2] = [
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

fn platform_name(p: &Value) -> String {
    let mut name = format!(
        "{}/{}",
        p["os"].as_str().unwrap_or("?"),
        p["architecture"].as_str().unwrap_or("?")
    );
    if let Some(v) = p["variant"].as_str() {
        name.push('/');
        name.push_str(v);
    }
    name
}

impl Facts {
    /// The facts of `bytes` (a manifest of `media_type`).
    pub fn of(media_type: &str, bytes: &[u8]) -> Self {
        let v: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
        let media_type = v["mediaType"].as_str().unwrap_or(media_type).to_owned();
        let size = |d: &Value| d["size"].as_u64().unwrap_or(0);
        let text = |d: &Value, k: &str| d[k].as_str().unwrap_or_default().to_owned();
        let layers: Vec<Layer> = v["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| Layer {
                digest: text(l, "digest"),
                size: size(l),
                media_type: text(l, "mediaType"),
                created_by: None,
            })
            .collect();
        let platforms: Vec<Platform> = v["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| Platform {
                name: if m["platform"].is_object() {
                    platform_name(&m["platform"])
                } else {
                    "unknown".to_owned()
                },
                digest: text(m, "digest"),
                size: size(m),
            })
            .collect();
        let config = v["config"]["digest"]
            .as_str()
            .map(|d| (d.to_owned(), size(&v["config"])));
        let config_type = v["config"]["mediaType"].as_str();
        let artifact_type = v["artifactType"].as_str().map(str::to_owned).or_else(|| {
            config_type
                .filter(|c| !IMAGE_CONFIGS.contains(c))
                .map(str::to_owned)
        });
        let kind = if v["manifests"].is_array() {
            Kind::Index
        } else if artifact_type.is_some() {
            Kind::Artifact
        } else {
            Kind::Image
        };
        let total = bytes.len() as u64
            + config.as_ref().map_or(0, |c| c.1)
            + layers.iter().map(|l| l.size).sum::<u64>()
            + platforms.iter().map(|p| p.size).sum::<u64>();
        Self {
            kind,
            media_type,
            config,
            artifact_type,
            layers,
            platforms,
            subject: v["subject"]["digest"].as_str().map(str::to_owned),
            total,
        }
    }

    /// Gives each layer the history entry that made it (entries marked `empty_layer` made
    /// none), from an image config.
    pub fn attach_history(&mut self, config: &Config) {
        let mut made = config.history.iter().filter(|h| !h.empty_layer);
        for l in &mut self.layers {
            l.created_by = made.next().map(|h| h.created_by.clone());
        }
    }

    /// The platforms, for a listing (`linux/amd64, linux/arm64`), or the config's for an image.
    pub fn platform_list(&self) -> String {
        self.platforms
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One history entry of an image config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// The command.
    pub created_by: String,
    /// Whether it made no layer.
    pub empty_layer: bool,
}

/// What an image config says, as a page shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// `linux/amd64`.
    pub platform: String,
    /// When it was built.
    pub created: Option<String>,
    /// `ENTRYPOINT`.
    pub entrypoint: Vec<String>,
    /// `CMD`.
    pub cmd: Vec<String>,
    /// `ENV`, as `K=V`.
    pub env: Vec<String>,
    /// Labels, sorted.
    pub labels: Vec<(String, String)>,
    /// Exposed ports, sorted.
    pub ports: Vec<String>,
    /// `USER`.
    pub user: Option<String>,
    /// `WORKDIR`.
    pub workdir: Option<String>,
    /// The build history.
    pub history: Vec<History>,
}

impl Config {
    /// The config in `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let v: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
        let c = &v["config"];
        let strings = |x: &Value| -> Vec<String> {
            x.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        };
        let mut labels: Vec<(String, String)> = c["Labels"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect();
        labels.sort();
        let mut ports: Vec<String> = c["ExposedPorts"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k.clone())
            .collect();
        ports.sort();
        let nonempty = |x: &Value| x.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
        Self {
            platform: platform_name(&v),
            created: v["created"].as_str().map(str::to_owned),
            entrypoint: strings(&c["Entrypoint"]),
            cmd: strings(&c["Cmd"]),
            env: strings(&c["Env"]),
            labels,
            ports,
            user: nonempty(&c["User"]),
            workdir: nonempty(&c["WorkingDir"]),
            history: v["history"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|h| History {
                    created_by: h["created_by"].as_str().unwrap_or_default().to_owned(),
                    empty_layer: h["empty_layer"].as_bool().unwrap_or(false),
                })
                .collect(),
        }
    }

    /// The settings two configs disagree on: (setting, this one's, the other's).
    pub fn differences(&self, other: &Self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        let mut field = |name: &str, a: String, b: String| {
            if a != b {
                out.push((name.to_owned(), a, b));
            }
        };
        field("platform", self.platform.clone(), other.platform.clone());
        field(
            "entrypoint",
            self.entrypoint.join(" "),
            other.entrypoint.join(" "),
        );
        field("cmd", self.cmd.join(" "), other.cmd.join(" "));
        field(
            "user",
            self.user.clone().unwrap_or_default(),
            other.user.clone().unwrap_or_default(),
        );
        field(
            "workdir",
            self.workdir.clone().unwrap_or_default(),
            other.workdir.clone().unwrap_or_default(),
        );
        field("ports", self.ports.join(" "), other.ports.join(" "));
        let keyed = |xs: &[String]| -> std::collections::BTreeMap<String, String> {
            xs.iter()
                .map(|e| {
                    let (k, v) = e.split_once('=').unwrap_or((e, ""));
                    (k.to_owned(), v.to_owned())
                })
                .collect()
        };
        let (ea, eb) = (keyed(&self.env), keyed(&other.env));
        for k in ea
            .keys()
            .chain(eb.keys())
            .collect::<std::collections::BTreeSet<_>>()
        {
            field(
                &format!("env {k}"),
                ea.get(k).cloned().unwrap_or_default(),
                eb.get(k).cloned().unwrap_or_default(),
            );
        }
        let (la, lb): (
            std::collections::BTreeMap<_, _>,
            std::collections::BTreeMap<_, _>,
        ) = (
            self.labels.iter().cloned().collect(),
            other.labels.iter().cloned().collect(),
        );
        for k in la
            .keys()
            .chain(lb.keys())
            .collect::<std::collections::BTreeSet<_>>()
        {
            field(
                &format!("label {k}"),
                la.get(k).cloned().unwrap_or_default(),
                lb.get(k).cloned().unwrap_or_default(),
            );
        }
        out
    }
}

/// Two images' layers: shared (in both), removed (only in the first), added (only in the
/// second), each in its image's order.
pub fn layer_diff<'a>(
    a: &'a [Layer],
    b: &'a [Layer],
) -> (Vec<&'a Layer>, Vec<&'a Layer>, Vec<&'a Layer>) {
    let in_a: std::collections::HashSet<&str> = a.iter().map(|l| l.digest.as_str()).collect();
    let in_b: std::collections::HashSet<&str> = b.iter().map(|l| l.digest.as_str()).collect();
    let shared = a
        .iter()
        .filter(|l| in_b.contains(l.digest.as_str()))
        .collect();
    let removed = a
        .iter()
        .filter(|l| !in_b.contains(l.digest.as_str()))
        .collect();
    let added = b
        .iter()
        .filter(|l| !in_a.contains(l.digest.as_str()))
        .collect();
    (shared, removed, added)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_times_and_digests_read_as_people_expect() {
        assert_eq!(size(999), "999 B");
        assert_eq!(size(1_500_000), "1.5 MB");
        assert_eq!(delta(2_000, 1_000), "−1.0 kB");
        assert_eq!(delta(1_000, 3_000), "+2.0 kB");
        assert_eq!(time(0), "1970-01-01 00:00 UTC");
        assert_eq!(short("sha256:0123456789abcdef0123"), "sha256:0123456789ab");
    }

    #[test]
    fn history_goes_to_the_layers_it_made() {
        let m = serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:c", "size": 10},
            "layers": [{"digest": "sha256:a", "size": 100}, {"digest": "sha256:b", "size": 1000}],
        });
        let c = serde_json::json!({
            "architecture": "arm64", "os": "linux", "variant": "v8",
            "config": {"Env": ["A=1", "B=2"], "Labels": {"x": "y"}, "ExposedPorts": {"80/tcp": {}}},
            "history": [
                {"created_by": "ADD root.tar /"},
                {"created_by": "ENV A=1", "empty_layer": true},
                {"created_by": "RUN make"},
            ],
        });
        let bytes = serde_json::to_vec(&m).unwrap();
        let mut f = Facts::of("", &bytes);
        let config = Config::of(&serde_json::to_vec(&c).unwrap());
        f.attach_history(&config);
        assert_eq!(f.kind, Kind::Image);
        assert_eq!(f.total, bytes.len() as u64 + 1110);
        let made: Vec<_> = f.layers.iter().map(|l| l.created_by.as_deref()).collect();
        assert_eq!(made, [Some("ADD root.tar /"), Some("RUN make")]);
        assert_eq!(config.platform, "linux/arm64/v8");
        let mut other = config.clone();
        other.env = vec!["A=1".into(), "C=3".into()];
        let d = config.differences(&other);
        assert_eq!(
            d,
            [
                ("env B".to_owned(), "2".to_owned(), String::new()),
                ("env C".to_owned(), String::new(), "3".to_owned())
            ]
        );
    }

    #[test]
    fn layers_are_shared_added_or_removed() {
        let l = |d: &str| Layer {
            digest: d.into(),
            size: 1,
            media_type: String::new(),
            created_by: None,
        };
        let (a, b) = ([l("1"), l("2"), l("3")], [l("1"), l("3"), l("4")]);
        let (shared, removed, added) = layer_diff(&a, &b);
        let ds = |v: Vec<&Layer>| v.iter().map(|l| l.digest.clone()).collect::<Vec<_>>();
        assert_eq!(ds(shared), ["1", "3"]);
        assert_eq!(ds(removed), ["2"]);
        assert_eq!(ds(added), ["4"]);
    }
}
