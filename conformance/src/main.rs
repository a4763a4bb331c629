//! `berth-conformance`: check a registry against the OCI distribution spec.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Check any registry against the OCI distribution spec over HTTP.
///
/// Settings may also come from the environment variables of the official OCI conformance suite.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Registry root URL, e.g. http://127.0.0.1:5000.
    #[arg(long, env = "OCI_ROOT_URL")]
    url: String,
    /// Repository to test in.
    #[arg(long, env = "OCI_NAMESPACE", default_value = "conformance/test")]
    namespace: String,
    /// Second repository for cross-repository mounts [default: <namespace>-crossmount].
    #[arg(long, env = "OCI_CROSSMOUNT_NAMESPACE")]
    crossmount_namespace: Option<String>,
    /// For a pull-through cache: push the pull workflow's content to this registry (the
    /// cache's upstream) and pull it through `--url`.
    #[arg(long, requires = "upstream_namespace")]
    upstream_url: Option<String>,
    /// The repository at `--upstream-url` that `--namespace` caches.
    #[arg(long)]
    upstream_namespace: Option<String>,
    /// User name, when the registry needs credentials.
    #[arg(long, env = "OCI_USERNAME")]
    username: Option<String>,
    /// Password.
    #[arg(long, env = "OCI_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Run the pull workflow (if no workflow is chosen, all run).
    #[arg(long, env = "OCI_TEST_PULL")]
    pull: Option<Flag>,
    /// Run the push workflow.
    #[arg(long, env = "OCI_TEST_PUSH")]
    push: Option<Flag>,
    /// Run the content discovery workflow.
    #[arg(long, env = "OCI_TEST_CONTENT_DISCOVERY")]
    content_discovery: Option<Flag>,
    /// Run the content management workflow.
    #[arg(long, env = "OCI_TEST_CONTENT_MANAGEMENT")]
    content_management: Option<Flag>,
    /// Run the extra checks (on unless workflows are chosen one by one).
    #[arg(long, env = "BERTH_CONFORMANCE_EXTRAS")]
    extras: Option<Flag>,
    /// Write a JUnit XML report here.
    #[arg(long, env = "OCI_JUNIT_REPORT")]
    junit: Option<PathBuf>,
    /// Seed for generated content (default: time based).
    #[arg(long)]
    seed: Option<u64>,
}

/// `1`/`true`/`yes` or `0`/`false`/`no`.
#[derive(Debug, Clone, Copy)]
struct Flag(bool);

impl std::str::FromStr for Flag {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(Self(true)),
            "0" | "false" | "no" | "off" | "" => Ok(Self(false)),
            _ => Err(format!("expected 1 or 0, got {s:?}")),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let a = Args::parse();
    let mut cfg = berth_conformance::Config::new(&a.url, &a.namespace);
    if let (Some(url), Some(namespace)) = (a.upstream_url.clone(), a.upstream_namespace.clone()) {
        cfg.upstream = Some(berth_conformance::Upstream {
            url,
            namespace,
            credentials: None,
        });
    }
    if let Some(c) = a.crossmount_namespace {
        cfg.crossmount_namespace = c;
    }
    if let (Some(u), Some(p)) = (a.username, a.password) {
        cfg.credentials = Some((u, p));
    }
    let chosen = [a.pull, a.push, a.content_discovery, a.content_management];
    if chosen.iter().any(|f| f.is_some_and(|f| f.0)) {
        let on = |f: Option<Flag>| f.is_some_and(|f| f.0);
        cfg.pull = on(a.pull);
        cfg.push = on(a.push);
        cfg.discovery = on(a.content_discovery);
        cfg.management = on(a.content_management);
        cfg.extras = on(a.extras);
    } else if let Some(e) = a.extras {
        cfg.extras = e.0;
    }
    if let Some(s) = a.seed {
        cfg.seed = s;
    }
    let report = match berth_conformance::run(cfg, true).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("berth-conformance: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(path) = a.junit
        && let Err(e) = std::fs::write(&path, report.junit())
    {
        eprintln!("berth-conformance: writing {}: {e}", path.display());
        return ExitCode::from(2);
    }
    println!("{}", report.summary());
    if report.failures().is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
