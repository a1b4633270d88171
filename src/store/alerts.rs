//! The alert engine's open alerts (table `alerts`), written at once and durably (fsynced), so a
//! restart neither forgets an open alert nor sends its `firing` again (see `crate::alerts`).
//!
//! Key: the alert's key (rule and subject, as the engine makes it); value: the engine's own
//! encoding. The store does not look inside.

use super::backend::{Batch, Kv};
use super::{Store, StoreError};

pub(crate) const ALERTS: &str = "alerts";

impl Store {
    /// Every stored open alert.
    pub fn alerts_load(&self) -> Result<Vec<Kv>, StoreError> {
        let mut out = Vec::new();
        self.engine()?
            .scan(ALERTS, |k, v| out.push((k.to_vec(), v.to_vec())))?;
        Ok(out)
    }

    /// Store (`Some`) or remove (`None`) one alert; fsynced before it returns.
    pub async fn alert_put(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), StoreError> {
        let mut b = Batch::default();
        match value {
            Some(v) => b.put(ALERTS, key, v),
            None => b.delete(ALERTS, key),
        }
        self.write_now(b).await
    }
}
