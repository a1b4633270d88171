//! # lorastream
//!
//! A LoRaWAN daemon that runs on the gateway itself. It takes frames from the local Semtech UDP
//! packet forwarder, does the network- and application-server work for the devices whose keys it
//! holds, keeps every message in an on-disk queue until the cloud has acknowledged it, and
//! streams it to MQTT brokers and clouds.
//!
//! ## Data path
//!
//! ```text
//! packet forwarder ─UDP─▶ ingress ─▶ uplink ─────────▶ store ─▶ streams ─▶ MQTT broker / cloud
//!                         (GWMP)     (lorawan: dedup,  (redb,    (one queue      │
//!                                     MIC, FCnt,        journal,  and cursor     │ PUBACK / 2xx
//!                                     decrypt, joins)   a queue   each)          ▼
//!                            ▲                          per       ◀── ack = delete from queue
//!                            │ PULL_RESP                stream)      │
//!                         downlink ◀──── DownlinkHandle ─────────────┘ cloud downlinks
//!                         (RX1/RX2/class C, FCntDown)
//! ```
//!
//! | module       | role                                                              |
//! |--------------|-------------------------------------------------------------------|
//! | [`ingress`]  | Semtech UDP server: ACKs, parsing, forwarder table                |
//! | [`lorawan`]  | pure LoRaWAN 1.0.x: frames, MIC, crypto, FCnt, dedup, sessions, regions |
//! | [`codec`]    | payload codecs: CayenneLPP, TS013 JavaScript; decoded once, before the store |
//! | [`uplink`]   | the stage joining them: dedup window → verdict → store; OTAA answers |
//! | [`store`]    | durable per-stream queues, session counters, downlink queues      |
//! | [`streams`]  | destinations: MQTT (TLS, WebSocket), AWS IoT, Azure IoT Hub, HTTP, stdout, file |
//! | [`downlink`] | the scheduler: device downlink queues, RX1/RX2/class C, events    |
//! | [`devices`]  | the device registry from the config and the store                 |
//! | [`activity`] | recent activity for the status page (bounded rings, no payloads)  |
//! | [`alerts`]   | operator alerts (`[[alert]]`): fired and resolved once, persisted   |
//! | [`daemon`]   | wiring, task start and ordered stop, `/health`                    |
//! | [`config`]   | the TOML file, typed once, defaults, errors with file:line:key    |
//! | [`metrics`]  | Prometheus `/metrics` and the HTTP endpoint                      |
//! | [`web`]      | the status page (`/`, `/api/status`) on the metrics listener     |
//! | [`logs`]     | log set-up (text, JSON, journald), SIGHUP level reload, rate-limited warnings |
//! | [`liveness`] | heartbeats of the main loops, for the systemd watchdog           |
//! | [`model`]    | shared plain types (EUIs, keys that never print, records, scopes) |
//! | [`sim`]      | simulated forwarder and devices for demo, simulate, tests, benches |
//! | [`cli`]      | the `lorastream` command                                          |
//!
//! Guarantees are stated at the top of each module; the README says them in plain words.
//!
//! ## Example: the LoRaWAN layer on its own
//!
//! ```
//! use lorastream::lorawan::frame;
//! use lorastream::model::{AesKey, DevAddr};
//!
//! // A LoRaWAN 1.0 uplink (published example): DevAddr 49BE7DF1, FCnt 2, FPort 1.
//! let phy = hex::decode("40F17DBE4900020001954378762B11FF0D").unwrap();
//! let nwk: AesKey = "44024241ed4ce9a68c6a8bc055233fd3".parse().unwrap();
//! let app: AesKey = "ec925802ae430ca77fd3dd73cb2cc588".parse().unwrap();
//! let header = frame::peek_data_up(&phy).unwrap();
//! assert_eq!(header.dev_addr, DevAddr(0x49BE_7DF1));
//! assert!(frame::mic_ok(&phy, &nwk, 2));
//! assert_eq!(frame::decrypt(&phy, &nwk, &app, 2).unwrap().frm_payload, b"test");
//! ```
//!
//! ## Example: a configuration checked like `lorastream check` does
//!
//! ```
//! let err = lorastream::config::Config::parse("[gateway]\nlisten = \"nowhere\"\n", "gw.toml")
//!     .unwrap_err()
//!     .to_string();
//! assert!(err.starts_with("gw.toml:2: [gateway] key `listen`"), "{err}");
//! ```

pub mod activity;
pub mod alerts;
pub mod cli;
pub mod codec;
pub mod config;
pub mod daemon;
pub(crate) mod devices;
pub mod downlink;
pub mod ingress;
pub mod liveness;
pub(crate) mod logs;
pub mod lorawan;
pub mod metrics;
mod metrics_process;
pub mod model;
pub mod postcard_buf;
pub mod sim;
pub mod store;
pub mod streams;
pub(crate) mod uplink;
pub mod vec_write;
pub mod web;

/// The package version and the git commit it was built from (`build.rs`; `unknown` when built
/// outside a git checkout without `LORASTREAM_COMMIT`), as `--version` and the first log line
/// show them: `0.1.0 (commit 1a0d537c2f4e)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("LORASTREAM_COMMIT"),
    ")"
);
/// The git commit alone (see [`VERSION`]).
pub const COMMIT: &str = env!("LORASTREAM_COMMIT");
