//! Deduplication window: the same PHYPayload heard by several gateways (or received twice)
//! within `window` becomes one group, released when the window of its first reception ends.
//!
//! Pure and clock-free: the caller passes `Instant`s, so tests drive time by hand. Because the
//! window is the same for every group, first-reception order is also expiry order, and a
//! `VecDeque` replaces a timer wheel.

use crate::model::FastMap;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Pending groups above this are released early (oldest first) so memory stays bounded even if
/// a flood of distinct frames arrives faster than the window drains.
pub const MAX_PENDING: usize = 65_536;

pub struct Dedup<T> {
    window: Duration,
    order: VecDeque<(Instant, Vec<u8>)>,
    groups: FastMap<Vec<u8>, Vec<T>>,
}

impl<T> Dedup<T> {
    pub fn new(window: Duration) -> Self {
        Dedup {
            window,
            order: VecDeque::new(),
            groups: FastMap::default(),
        }
    }

    /// Add one reception. Returns true when it opened a new group.
    pub fn push(&mut self, now: Instant, phy: &[u8], item: T) -> bool {
        if let Some(g) = self.groups.get_mut(phy) {
            g.push(item);
            return false;
        }
        self.groups.insert(phy.to_vec(), vec![item]);
        self.order.push_back((now + self.window, phy.to_vec()));
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
    pub fn pop_expired(&mut self, now: Instant, out: &mut Vec<(Vec<u8>, Vec<T>)>) {
        while let Some((deadline, _)) = self.order.front() {
            if *deadline > now && self.order.len() <= MAX_PENDING {
                break;
            }
            self.pop_front(out);
        }
    }

    /// Release everything (shutdown).
    pub fn drain(&mut self, out: &mut Vec<(Vec<u8>, Vec<T>)>) {
        while !self.order.is_empty() {
            self.pop_front(out);
        }
    }

    fn pop_front(&mut self, out: &mut Vec<(Vec<u8>, Vec<T>)>) {
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
        assert!(d.push(t0, b"frame-a", "gw1"));
        assert!(!d.push(t0 + Duration::from_millis(50), b"frame-a", "gw2"));
        assert!(d.push(t0 + Duration::from_millis(60), b"frame-b", "gw1"));
        let mut out = Vec::new();
        d.pop_expired(t0 + Duration::from_millis(199), &mut out);
        assert!(out.is_empty());
        assert_eq!(d.next_deadline(), Some(t0 + w));
        d.pop_expired(t0 + Duration::from_millis(200), &mut out);
        assert_eq!(out, vec![(b"frame-a".to_vec(), vec!["gw1", "gw2"])]);
        // A copy after the window is a new group (the FCnt check then calls it a repeat).
        assert!(d.push(t0 + Duration::from_millis(210), b"frame-a", "gw3"));
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
            d.push(t0, &i.to_be_bytes(), i);
            d.pop_expired(t0, &mut out);
        }
        assert_eq!(d.len(), MAX_PENDING);
        assert_eq!(out.len(), 10);
        assert_eq!(out[0].1, vec![0]);
    }
}
