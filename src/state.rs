//! Shared server state handed to every handler.

use std::sync::Arc;

use berth_storage::Store;

use crate::auth::{AuthService, AuthSetupError};
use crate::config::Config;
use crate::proxy::{Proxy, Spool};
use crate::registry::Registry;

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration cannot be used.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Storage did not open.
    #[error("opening storage: {0}")]
    Storage(#[from] berth_storage::Error),
    /// Authentication could not be set up.
    #[error(transparent)]
    Auth(#[from] AuthSetupError),
    /// The pull-through cache could not be set up.
    #[error("proxy: {0}")]
    Proxy(String),
}

/// What handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The registry: local storage, and the pull-through cache where configured.
    pub registry: Registry,
    /// The configuration the server runs with.
    pub config: Arc<Config>,
    /// Authentication and access control; `None` when `auth.mode` is `none`.
    pub auth: Option<Arc<AuthService>>,
    /// Bounds on connections, uploads and slow clients (per process).
    pub limits: crate::limits::Limits,
    /// The data directory's reserve and whether it is full (per process).
    pub disk: crate::disk::Disk,
}

impl AppState {
    /// Opens storage and sets up authentication and the cache as `config` says.
    pub async fn open(config: Config) -> Result<Self, StartError> {
        let auth = AuthService::from_config(&config)?.map(Arc::new);
        let disk = crate::disk::Disk::new(&config.data, config.limits.disk_reserve.as_u64());
        disk.prepare();
        let storage = config.storage_config()?;
        let mut store = Store::open(&storage).await?;
        match &config.peer_url {
            Some(url) => store.set_peer_url(url),
            None if config.metadata.replicated() && !config.proxy.upstream.is_empty() => {
                tracing::warn!(
                    "peer_url is not set: a replica missing a blob another replica is \
                     fetching waits for that fetch to finish instead of streaming it"
                );
            }
            None => {}
        }
        let store = Arc::new(store);
        let proxy = Proxy::from_config(&config, store.clone(), Spool::Server)
            .map_err(StartError::Proxy)?
            .map(Arc::new);
        let limits =
            crate::limits::Limits::new(&config.limits, crate::limits::raise_open_file_limit());
        Ok(Self {
            disk,
            limits,
            registry: Registry::new(store, proxy),
            config: Arc::new(config),
            auth,
        })
    }

    /// Local storage (background jobs, health, metrics).
    pub fn store(&self) -> &Arc<Store> {
        self.registry.store()
    }
}
