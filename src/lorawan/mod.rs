//! The LoRaWAN 1.0.x layer: pure, synchronous functions on byte slices, tested with published
//! vectors. No sockets, no disk, no clocks (time comes in as arguments).
//!
//! - [`frame`]: header peek, MIC, FRMPayload encryption, frame building;
//! - [`fcnt`]: 16→32-bit frame-counter reconstruction and replay classification;
//! - [`adr`]: the network's adaptive data rate (per-device state and decisions);
//! - [`dedup`]: the deduplication window that merges receptions of one frame;
//! - [`mac`]: every 1.0.x MAC command, bytes ↔ typed values, both directions;
//! - [`mac_state`]: the network's MAC layer of one device: pending commands, answers, ADR;
//! - [`otaa`]: JoinRequest, session keys, JoinAccept;
//! - [`region`]: regional parameters (RP002-1.0.4): data rates, RX windows, payload sizes,
//!   power, channels, CFLists;
//! - [`session`]: device sessions looked up by DevAddr and the uplink decision (MIC decides
//!   between devices sharing a DevAddr).

pub mod adr;
pub mod dedup;
pub mod fcnt;
pub mod frame;
pub mod mac;
pub mod mac_state;
pub mod otaa;
pub mod region;
pub mod session;
