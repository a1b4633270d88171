//! Deduplication window: the same PHYPayload heard by several gateways (or received twice)
//! within `window` becomes one group, released when the window of its first reception ends.
//!
//! Pure and clock-free: the caller passes `Instant`s, so tests drive time by hand. Because the
//! window is the same for every group, first-reception order is also expiry order, and a
//! `VecDeque` replaces a timer wheel.

use crate::model::FastMap;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Pending groups above this are released early (oldest first) so memory stays bounded even if
/// a flood of distinct frames arrives faster than the window drains.
pub const MAX_PENDING: usize = 65_536;

pub struct Dedup<T> {
    window: Duration,
    /// The groups' keys in first-reception order; shared with `groups` (one copy per frame).
    order: VecDeque<(Instant, Arc<[u8]>)>,
    groups: FastMap<Arc<[u8]>, Vec<T>>,
}

impl<T> Dedup<T> {
    pub fn new(window: Duration) -> Self {
        Dedup {
            window,
            order: VecDeque::new(),
            groups: FastMap::default(),
        }
    }

    /// Add one reception, grouped by the bytes `key` finds in it (the PHYPayload). Returns
    /// true when it opened a new group.
    pub fn push(&mut self, now: Instant, item: T, key: impl FnOnce(&T) -> &[u8]) -> bool {
        let phy = key(&item);
        if let Some(g) = self.groups.get_mut(phy) {
            g.push(item);
            return false;
        }
        let phy: Arc<[u8]> = Arc::from(phy);
        self.order.push_back((now + self.window, phy.clone()));
        self.groups.insert(phy, vec![item]);
        true
    }

    /// When the oldest group is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.order.front().map(|(t, _)| *t)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Release every group whose window has ended (or that exceeds [`MAX_PENDING`]).
    pub fn pop_expired(&mut self, now: Instant, out: &mut Vec<(Arc<[u8]>, Vec<T>)>) {
        while let Some((deadline, _)) = self.order.front() {
            if *deadline > now && self.order.len() <= MAX_PENDING {
                break;
            }
            self.pop_front(out);
        }
    }

    /// Release everything (shutdown).
    pub fn drain(&mut self, out: &mut Vec<(Arc<[u8]>, Vec<T>)>) {
        while !self.order.is_empty() {
            self.pop_front(out);
        }
    }

    fn pop_front(&mut self, out: &mut Vec<(Arc<[u8]>, Vec<T>)>) {
        if let Some((_, key)) = self.order.pop_front() {
            if let Some(items) = self.groups.remove(&key) {
                out.push((key, items));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_within_window_and_releases_after() {
        let t0 = Instant::now();
        let w = Duration::from_millis(200);
        let mut d = Dedup::new(w);
        fn phy<'a>(r: &'a (&str, &str)) -> &'a [u8] {
            r.0.as_bytes()
        }
        assert!(d.push(t0, ("frame-a", "gw1"), phy));
        assert!(!d.push(t0 + Duration::from_millis(50), ("frame-a", "gw2"), phy));
        assert!(d.push(t0 + Duration::from_millis(60), ("frame-b", "gw1"), phy));
        let mut out = Vec::new();
        d.pop_expired(t0 + Duration::from_millis(199), &mut out);
        assert!(out.is_empty());
        assert_eq!(d.next_deadline(), Some(t0 + w));
        d.pop_expired(t0 + Duration::from_millis(200), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(&*out[0].0, b"frame-a");
        assert_eq!(out[0].1, vec![("frame-a", "gw1"), ("frame-a", "gw2")]);
        // A copy after the window is a new group (the FCnt check then calls it a repeat).
        assert!(d.push(t0 + Duration::from_millis(210), ("frame-a", "gw3"), phy));
        out.clear();
        d.drain(&mut out);
        assert_eq!(out.len(), 2);
        assert!(d.is_empty());
    }

    #[test]
    fn bounded_under_flood() {
        let t0 = Instant::now();
        let mut d = Dedup::new(Duration::from_secs(10));
        let mut out = Vec::new();
        for i in 0..(MAX_PENDING as u32 + 10) {
            d.push(t0, i.to_be_bytes(), |b| b.as_slice());
            d.pop_expired(t0, &mut out);
        }
        assert_eq!(d.len(), MAX_PENDING);
        assert_eq!(out.len(), 10);
        assert_eq!(out[0].1, vec![0u32.to_be_bytes()]);
    }
}
