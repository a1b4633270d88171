//! Per-device downlink queues, persisted so a restart keeps what clouds asked to send.
//!
//! Key: DevEUI (8) + sequence (8, BE), so a prefix scan gives a device's queue in order.

use super::backend::Batch;
use super::{Store, StoreError, DOWN};
use crate::model::{DownlinkItem, Eui64};

fn key(eui: Eui64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&eui.0);
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

impl Store {
    /// Append (or, with `replace`, replace the queue with) `items`; fsync before returning, so
    /// the cloud may be acknowledged afterwards. Returns the items removed by a replace.
    /// Refuses (Ok(Err)) when the queue would exceed `max_len`.
    pub async fn downlinks_enqueue(
        &self,
        eui: Eui64,
        items: &[DownlinkItem],
        replace: bool,
        max_len: usize,
    ) -> Result<Result<Vec<DownlinkItem>, usize>, StoreError> {
        let mut removed = Vec::new();
        // Strict read: a replace must see every queued item to remove it.
        let existing = self.read_downlinks(eui)?;
        if items.len() > max_len {
            return Ok(Err(0));
        }
        // A replace is one atomic commit: the old queue never half-exists beside the new one.
        let mut batch = Batch::default();
        if replace {
            for (k, item) in existing {
                batch.delete(DOWN, &k);
                removed.push(item);
            }
        } else if existing.len() + items.len() > max_len {
            return Ok(Err(existing.len()));
        }
        for it in items {
            let seq = self.next_seq();
            batch.put(DOWN, &key(eui, seq), &postcard::to_stdvec(it)?);
        }
        self.write_now(batch).await?;
        Ok(Ok(removed))
    }

    /// A device's queued downlinks, in order, with their store keys. While the engine is being
    /// reopened after a disk error this is empty (the items stay stored and are found again
    /// once it is back), so the scheduler does not log an error for every uplink meanwhile.
    pub fn downlinks(&self, eui: Eui64) -> Result<Vec<(Vec<u8>, DownlinkItem)>, StoreError> {
        match self.read_downlinks(eui) {
            Err(StoreError::Unavailable) => Ok(Vec::new()),
            r => r,
        }
    }

    /// [`Store::downlinks`] without hiding a reopening engine: `Err(StoreError::Unavailable)`
    /// then, so an empty answer really means an empty queue (the scheduler remembers that).
    pub(crate) fn read_downlinks(
        &self,
        eui: Eui64,
    ) -> Result<Vec<(Vec<u8>, DownlinkItem)>, StoreError> {
        let mut out = Vec::new();
        let engine = self.engine()?;
        let mut bad = Batch::default();
        for (k, v) in engine.prefix(DOWN, &eui.0)? {
            match postcard::from_bytes::<DownlinkItem>(&v) {
                Ok(item) => out.push((k, item)),
                Err(_) => {
                    tracing::warn!(dev_eui = %eui, "removing an unreadable queued downlink");
                    bad.delete(DOWN, &k);
                }
            }
        }
        if !bad.is_empty() {
            // Not durable at once: a corrupt entry that comes back is removed again.
            engine.commit(&bad, false)?;
        }
        Ok(out)
    }

    /// Remove one downlink (sent unconfirmed, acknowledged, or given up).
    pub async fn downlink_remove(&self, key: &[u8]) -> Result<(), StoreError> {
        let mut b = Batch::default();
        b.delete(DOWN, key);
        self.write_now(b).await
    }
}
