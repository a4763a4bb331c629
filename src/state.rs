//! Shared server state handed to every handler.

use std::sync::Arc;

use berth_storage::Store;

use crate::config::Config;

/// What handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The registry's storage.
    pub store: Arc<Store>,
    /// The configuration the server runs with.
    pub config: Arc<Config>,
}

impl AppState {
    /// Opens storage as `config` says.
    pub async fn open(config: Config) -> Result<Self, berth_storage::Error> {
        crate::metrics::handle();
        let storage = config
            .storage_config()
            .map_err(|e| berth_storage::Error::Internal(e.to_string()))?;
        let store = Store::open(&storage).await?;
        Ok(Self {
            store: Arc::new(store),
            config: Arc::new(config),
        })
    }
}
