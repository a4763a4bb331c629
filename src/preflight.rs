//! One validation for `berth check-config` and `berth serve`: everything the configuration
//! names is checked the way the server will use it, and every problem is reported at once.
//!
//! Beyond [`Config::validate`] (values that cannot work together): the data directory and a
//! storage root are directories (or can be made), secret files can be read, the TLS
//! certificate, key and client CA load and match, the htpasswd file, the access rules and the
//! keys of trusted token issuers load (and the token key, if it exists), a GCS service account
//! key reads as one, and upstream password files can be read. Nothing is written and nothing
//! is contacted: object stores, PostgreSQL and upstreams are checked when the server starts.

use std::path::Path;

use crate::config::{Config, ConfigError, StorageSection};

/// Every problem `config` has; empty when the server can start with it.
pub fn check(config: &Config) -> Vec<String> {
    let mut problems = match config.validate() {
        Ok(()) => Vec::new(),
        Err(ConfigError::Invalid(p)) => p,
        Err(e) => vec![e.to_string()],
    };
    directory("data", &config.data, &mut problems);
    if let StorageSection::Filesystem(f) = &config.storage
        && let Some(root) = &f.root
    {
        directory("storage.root", root, &mut problems);
    }
    if let Err(e) = config.storage_config() {
        problems.push(e.to_string());
    }
    if let StorageSection::Gcs(g) = &config.storage
        && let Some(key) = &g.service_account_key
        && let Err(e) = service_account_key(key)
    {
        problems.push(format!(
            "storage.service_account_key: {}: {e}",
            key.display()
        ));
    }
    if config.tls.enabled()
        && let Err(e) = crate::tls::server_config(&config.tls)
    {
        problems.push(format!("tls: {e}"));
    }
    if let Err(e) = crate::auth::AuthService::check(config) {
        problems.push(format!("auth: {e}"));
    }
    for u in &config.proxy.upstream {
        if let Some(p) = &u.password_file
            && let Err(e) = std::fs::read_to_string(p)
        {
            problems.push(format!(
                "proxy.upstream {}: password_file {}: {e}",
                u.name,
                p.display()
            ));
        }
    }
    problems
}

/// A GCS service account key file as the client reads it: JSON with the key and the account.
fn service_account_key(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let key: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))?;
    let missing: Vec<_> = ["private_key", "private_key_id", "client_email"]
        .into_iter()
        .filter(|k| !key[*k].is_string())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "not a service account key: no {} (create a JSON key for the account)",
            missing.join(", ")
        ))
    }
}

/// `path` is a directory, or does not exist yet (it is created at start).
fn directory(key: &str, path: &Path, problems: &mut Vec<String>) {
    if path.exists() && !path.is_dir() {
        problems.push(format!("{key}: {} is not a directory", path.display()));
    }
}
