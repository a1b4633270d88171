//! Payload codecs: what a device's FRMPayload means (contract, "Payload codecs").
//!
//! Each device has a codec: its own `codec`, else its application's (`none`, `cayennelpp` or
//! `javascript`). The uplink stage decodes an uplink once, before it is stored, so every stream
//! shows the same `decoded_payload` (ChirpStack: `object`); a codec error never costs the
//! uplink: it is stored with the error instead ([`CodecOutput::Error`]), and the stage counts
//! and logs it. Downlinks that carry a `decoded_payload` instead of bytes are encoded on their
//! way into the scheduler ([`Codecs::encode_request`]); a refusal becomes `down/failed`.
//!
//! - [`cayenne`]: CayenneLPP, shaped as The Things Stack's decoder;
//! - [`js`]: TS013 JavaScript codecs on QuickJS, one thread per script, every call bounded.
//!
//! [`Codecs`] is built once from the configuration: one codec per distinct configuration (a
//! script shared by a hundred devices is loaded once), looked up by device id.

pub mod cayenne;
pub mod js;

use crate::config::{CodecConfig, Config};
use crate::model::{CodecOutput, DownlinkRequest, JsonObject, RequestError, Uplink, MAX_PAYLOAD};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// Why a codec gave no result for one payload. The text goes into the uplink
/// (`lorastream.codec_error`) or the `down/failed` event, so it says what went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error(transparent)]
    Lpp(#[from] cayenne::LppError),
    /// The script threw, or returned `errors`.
    #[error("JavaScript: {0}")]
    Script(String),
    /// The script returned something else than TS013 says.
    #[error("JavaScript: {0}")]
    Output(String),
    #[error("JavaScript: stopped after {0:?} (codec_timeout_ms)")]
    Timeout(std::time::Duration),
    #[error("JavaScript: the script used more than its {} MiB of memory", .0 / (1024 * 1024))]
    Memory(usize),
    #[error("JavaScript: too many calls waiting for the script")]
    Busy,
    #[error("JavaScript: the codec is not running")]
    Stopped,
    /// The script could not be loaded (at start).
    #[error("cannot load the codec script: {0}")]
    Load(String),
}

/// The `decodeUplink` input (TS013 §5.1): the FRMPayload, its port, when it was received.
#[derive(Debug, Clone, Copy)]
pub struct UplinkInput<'a> {
    pub bytes: &'a [u8],
    pub f_port: u8,
    /// Unix µs (TS013 `recvTime`).
    pub recv_time_us: i64,
}

/// The `decodeUplink` output: `data` and `warnings`.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub data: Map<String, Value>,
    pub warnings: Vec<String>,
}

/// The `encodeDownlink` output: `bytes`, and the `fPort` the codec chose (else the request's).
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub f_port: Option<u8>,
}

/// One configured codec.
#[derive(Debug)]
pub enum Codec {
    CayenneLpp,
    JavaScript(js::Script),
}

impl Codec {
    /// Its `codec` name, the `codec` label of `lorastream_codec_errors_total`.
    pub fn name(&self) -> &'static str {
        match self {
            Codec::CayenneLpp => "cayennelpp",
            Codec::JavaScript(_) => "javascript",
        }
    }

    /// `decodeUplink`.
    pub async fn decode_uplink(&self, input: UplinkInput<'_>) -> Result<Decoded, CodecError> {
        match self {
            Codec::CayenneLpp => Ok(Decoded {
                data: cayenne::decode_uplink(input.bytes)?,
                warnings: Vec::new(),
            }),
            Codec::JavaScript(s) => s.decode_uplink(input).await,
        }
    }

    /// `encodeDownlink`.
    pub async fn encode_downlink(
        &self,
        f_port: u8,
        data: &Map<String, Value>,
    ) -> Result<Encoded, CodecError> {
        match self {
            Codec::CayenneLpp => Ok(Encoded {
                bytes: cayenne::encode_downlink(data)?,
                f_port: None,
            }),
            Codec::JavaScript(s) => s.encode_downlink(f_port, data).await,
        }
    }
}

/// Every device's codec, built once from the configuration.
#[derive(Debug, Default)]
pub struct Codecs {
    by_device: HashMap<String, Arc<Codec>>,
}

impl Codecs {
    /// No device has a codec.
    pub fn none() -> Codecs {
        Codecs::default()
    }

    /// The codec of every device of `cfg` that has one: each script is loaded once (on its
    /// own thread), however many devices use it. Fails when a script cannot be loaded.
    pub fn from_config(cfg: &Config) -> Result<Codecs, CodecError> {
        let mut built: HashMap<CodecConfig, Arc<Codec>> = HashMap::new();
        let mut by_device = HashMap::new();
        for d in &cfg.devices {
            let c = cfg.codec_of(d);
            let codec = match built.get(&c) {
                Some(codec) => codec.clone(),
                None => {
                    let codec = Arc::new(match &c {
                        CodecConfig::None => continue,
                        CodecConfig::CayenneLpp => Codec::CayenneLpp,
                        CodecConfig::JavaScript { script } => Codec::JavaScript(js::Script::start(
                            script,
                            cfg.gateway.codec_timeout(),
                        )?),
                    });
                    built.insert(c, codec.clone());
                    codec
                }
            };
            by_device.insert(d.id.clone(), codec);
        }
        Ok(Codecs { by_device })
    }

    /// The codec of a device (by its id), if it has one.
    pub fn of(&self, device: &str) -> Option<&Codec> {
        self.by_device.get(device).map(|c| &**c)
    }

    pub fn is_empty(&self) -> bool {
        self.by_device.is_empty()
    }

    /// Decode an uplink with its device's codec: `None` when the device has none or the uplink
    /// carries no application payload (no FPort, or FPort 0: MAC commands). On an error the
    /// codec's name comes with it (for the metric).
    pub async fn decode(&self, u: &Uplink) -> Option<(CodecOutput, Option<&'static str>)> {
        let f_port = u.f_port.filter(|p| *p > 0)?;
        let codec = self.of(&u.device)?;
        let input = UplinkInput {
            bytes: &u.payload,
            f_port,
            recv_time_us: u.received_at_us,
        };
        Some(match codec.decode_uplink(input).await {
            Ok(d) => (
                CodecOutput::Decoded {
                    data: JsonObject(d.data),
                    warnings: d.warnings,
                },
                None,
            ),
            Err(e) => (CodecOutput::Error(e.to_string()), Some(codec.name())),
        })
    }

    /// Encode the items of a request that carry a `decoded_payload` with the device's codec;
    /// the first that cannot be encoded refuses the request (the scheduler then sends
    /// `down/failed` with the reason, as for any invalid request).
    pub async fn encode_request(&self, mut req: DownlinkRequest) -> DownlinkRequest {
        let Ok(items) = &mut req.items else {
            return req;
        };
        if items.iter().all(|it| it.decoded_payload.is_none()) {
            return req;
        }
        let codec = self.of(&req.device);
        let mut refusal = None;
        for (index, it) in items.iter_mut().enumerate() {
            let Some(data) = it.decoded_payload.take() else {
                continue;
            };
            let Some(codec) = codec else {
                refusal = Some(RequestError::NoEncoder { index });
                break;
            };
            match codec.encode_downlink(it.f_port, &data).await {
                Ok(e) if e.bytes.len() > MAX_PAYLOAD => {
                    refusal = Some(RequestError::TooLong {
                        index,
                        len: e.bytes.len(),
                    });
                    break;
                }
                Ok(e) => {
                    it.payload = e.bytes;
                    if let Some(p) = e.f_port {
                        it.f_port = p;
                    }
                }
                Err(e) => {
                    refusal = Some(RequestError::Encode {
                        index,
                        codec: codec.name(),
                        reason: e.to_string(),
                    });
                    break;
                }
            }
        }
        if let Some(r) = refusal {
            req.items = Err(r);
        }
        req
    }
}
