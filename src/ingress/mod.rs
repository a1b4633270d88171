//! Ingress: the Semtech UDP (GWMP v2) server that packet forwarders send to.
//!
//! We use the `semtech-udp` crate's packet types but run our own socket loop instead of its
//! server runtime, because of documented limits of that runtime (crate-notes): it panics on
//! socket errors, parses datagrams all-or-nothing (one odd `rxpk` loses the whole PUSH_DATA and
//! its ACK), delays ACKs behind a 100-slot channel when the consumer is slow, and registers
//! gateways only on PULL_DATA. Here the ACK goes out as soon as the 12-byte header is valid,
//! every `rxpk` is parsed on its own, the socket gets a large receive buffer (bursts are lost in
//! the kernel first), and nothing a forwarder sends can stop the loop.
//!
//! - [`gwmp`]: pure codec (header, ACKs, JSON → [`gwmp::Reception`]);
//! - `rxpk`: the direct reader of the usual PUSH_DATA body (version-1 entries), which `gwmp`
//!   tries before the crate's serde types;
//! - [`udp`]: the socket loop and the table of known forwarders ([`udp::Gateways`]).

pub mod gwmp;
mod rxpk;
pub mod udp;
