//! How roles get warehouse connections without knowing the configuration behind them.

use async_trait::async_trait;

use crate::{EngineError, Warehouse};

/// Opens a connection to a gateway's warehouse: one per worker slot (held for its life), one per
/// promotion. The CLI implements it from the project's gateways.
#[async_trait]
pub trait WarehouseFactory: Send + Sync {
    async fn connect(&self, gateway: &str) -> Result<Box<dyn Warehouse>, EngineError>;
}
