//! Per-device downlink queues, persisted so a restart keeps what clouds asked to send.
//!
//! Key: DevEUI (8) + sequence (8, BE), so a prefix scan gives a device's queue in order.

use super::{Store, StoreError};
use crate::model::{DownlinkItem, Eui64};
use std::sync::atomic::Ordering;

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
        let existing = self.downlinks(eui)?;
        if replace {
            for (k, item) in existing {
                self.down.remove(k)?;
                removed.push(item);
            }
        } else if existing.len() + items.len() > max_len {
            return Ok(Err(existing.len()));
        }
        if items.len() > max_len {
            return Ok(Err(0));
        }
        let mut batch = sled::Batch::default();
        for it in items {
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            batch.insert(&key(eui, seq), postcard::to_stdvec(it)?);
        }
        self.down.apply_batch(batch)?;
        self.fsync().await?;
        Ok(Ok(removed))
    }

    /// A device's queued downlinks, in order, with their store keys.
    pub fn downlinks(&self, eui: Eui64) -> Result<Vec<(Vec<u8>, DownlinkItem)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.down.scan_prefix(eui.0) {
            let (k, v) = kv?;
            match postcard::from_bytes::<DownlinkItem>(&v) {
                Ok(item) => out.push((k.to_vec(), item)),
                Err(_) => {
                    tracing::warn!(dev_eui = %eui, "removing an unreadable queued downlink");
                    self.down.remove(k)?;
                }
            }
        }
        Ok(out)
    }

    /// Remove one downlink (sent unconfirmed, acknowledged, or given up).
    pub async fn downlink_remove(&self, key: &[u8]) -> Result<(), StoreError> {
        self.down.remove(key)?;
        self.fsync().await?;
        Ok(())
    }
}
