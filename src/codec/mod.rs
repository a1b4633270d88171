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
//! - `js`: TS013 JavaScript codecs on QuickJS, one thread per script, every call bounded (cargo
//!   feature `js`, on by default; a build without it refuses `codec = "javascript"`).
//!
//! [`Codecs`] is built once from the configuration: one codec per distinct configuration (a
//! script shared by a hundred devices is loaded once), looked up by device id.

pub mod cayenne;
#[cfg(feature = "js")]
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
    #[cfg(feature = "js")]
    JavaScript(js::Script),
}

impl Codec {
    /// Its `codec` name, the `codec` label of `lorastream_codec_errors_total`.
    pub fn name(&self) -> &'static str {
        match self {
            Codec::CayenneLpp => "cayennelpp",
            #[cfg(feature = "js")]
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
            #[cfg(feature = "js")]
            Codec::JavaScript(s) => s.decode_uplink(input).await,
        }
    }

    /// `encodeDownlink`.
    #[cfg_attr(not(feature = "js"), allow(unused_variables))] // `f_port`: only scripts see it
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
            #[cfg(feature = "js")]
            Codec::JavaScript(s) => s.encode_downlink(f_port, data).await,
        }
    }
}

/// Codecs loaded for a reload, not in effect yet ([`Codecs::prepare`]).
pub struct Prepared(HashMap<String, Arc<Codec>>);

/// Every device's codec, built from the configuration (again on a reload: [`Codecs::reload`]).
#[derive(Debug, Default)]
pub struct Codecs {
    by_device: std::sync::RwLock<HashMap<String, Arc<Codec>>>,
}

impl Codecs {
    /// No device has a codec.
    pub fn none() -> Codecs {
        Codecs::default()
    }

    /// The codec of every device of `cfg` that has one: each script is loaded once (on its
    /// own thread), however many devices use it. Fails when a script cannot be loaded.
    pub fn from_config(cfg: &Config) -> Result<Codecs, CodecError> {
        Ok(Codecs {
            by_device: std::sync::RwLock::new(Self::build(cfg)?),
        })
    }

    /// Take the codecs of a reloaded configuration (scripts are loaded again: a changed file
    /// takes effect). On an error nothing changes.
    pub fn reload(&self, cfg: &Config) -> Result<(), CodecError> {
        self.install(Self::prepare(cfg)?);
        Ok(())
    }

    /// A reload in two steps: load the codecs of `cfg` (this can fail) ...
    pub fn prepare(cfg: &Config) -> Result<Prepared, CodecError> {
        Ok(Prepared(Self::build(cfg)?))
    }

    /// ... and put them in effect.
    pub fn install(&self, p: Prepared) {
        if let Ok(mut m) = self.by_device.write() {
            *m = p.0;
        }
    }

    fn build(cfg: &Config) -> Result<HashMap<String, Arc<Codec>>, CodecError> {
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
                        #[cfg(feature = "js")]
                        CodecConfig::JavaScript { script } => Codec::JavaScript(js::Script::start(
                            script,
                            cfg.gateway.codec_timeout(),
                        )?),
                        // The configuration refuses it already (`NO_JAVASCRIPT`).
                        #[cfg(not(feature = "js"))]
                        CodecConfig::JavaScript { .. } => {
                            return Err(CodecError::Load(crate::config::NO_JAVASCRIPT.into()))
                        }
                    });
                    built.insert(c, codec.clone());
                    codec
                }
            };
            by_device.insert(d.id.clone(), codec);
        }
        Ok(by_device)
    }

    /// The codec of a device (by its id), if it has one.
    pub fn of(&self, device: &str) -> Option<Arc<Codec>> {
        self.by_device.read().ok()?.get(device).cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.by_device.read().map(|m| m.is_empty()).unwrap_or(true)
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
            let Some(codec) = codec.as_deref() else {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DownlinkItem, DownlinkOp};
    use serde_json::json;

    fn codecs() -> Codecs {
        let src = r#"
[[application]]
id = "app"
codec = "cayennelpp"

[[device]]
application = "app"
id = "d1"
dev_eui = "0000000000000001"
dev_addr = "00000001"
nwk_s_key = "000102030405060708090a0b0c0d0e0f"
app_s_key = "000102030405060708090a0b0c0d0e0f"

[[device]]
application = "app"
id = "d2"
dev_eui = "0000000000000002"
dev_addr = "00000002"
nwk_s_key = "000102030405060708090a0b0c0d0e0f"
app_s_key = "000102030405060708090a0b0c0d0e0f"
codec = "none"
"#;
        Codecs::from_config(&Config::parse(src, "t.toml").unwrap()).unwrap()
    }

    #[tokio::test]
    async fn uplinks_are_decoded_only_on_application_ports_of_devices_with_a_codec() {
        let c = codecs();
        let mut u = crate::sim::fixtures::uplink(1, 1);
        u.payload = vec![3, 0x67, 1, 0x10];
        let (out, failed) = c.decode(&u).await.unwrap();
        assert_eq!(failed, None);
        let CodecOutput::Decoded { data, warnings } = out else {
            panic!("{out:?}")
        };
        assert_eq!(data.0["temperature_3"], json!(27.2));
        assert!(warnings.is_empty());
        u.payload = vec![3, 0x67, 1];
        let (out, failed) = c.decode(&u).await.unwrap();
        assert_eq!(failed, Some("cayennelpp"));
        assert!(matches!(out, CodecOutput::Error(e) if e.contains("payload ends inside")));
        // MAC-only frames (FPort 0, no FPort) and devices without a codec: nothing to decode.
        u.f_port = Some(0);
        assert!(c.decode(&u).await.is_none());
        u.f_port = None;
        assert!(c.decode(&u).await.is_none());
        u.f_port = Some(1);
        u.device = "d2".into();
        assert!(c.decode(&u).await.is_none());
    }

    fn item(decoded: Option<Json>) -> DownlinkItem {
        DownlinkItem {
            id: 1,
            f_port: 2,
            payload: vec![9],
            confirmed: false,
            priority: "NORMAL".into(),
            correlation_ids: vec![],
            stream: "s".into(),
            decoded_payload: decoded.map(|v| v.as_object().cloned().unwrap()),
        }
    }

    fn request(device: &str, items: Vec<DownlinkItem>) -> DownlinkRequest {
        DownlinkRequest {
            stream: "s".into(),
            application: String::new(),
            device: device.into(),
            op: DownlinkOp::Push,
            items: Ok(items),
            names: None,
        }
    }

    type Json = serde_json::Value;

    #[tokio::test]
    async fn downlink_requests_are_encoded_or_refused_whole() {
        let c = codecs();
        let r = c
            .encode_request(request(
                "d1",
                vec![item(None), item(Some(json!({"value_4": -1})))],
            ))
            .await;
        let items = r.items.unwrap();
        assert_eq!(items[0].payload, vec![9], "bytes given: untouched");
        assert_eq!(items[1].payload, vec![4, 0xFF, 0x9C]);
        assert!(items.iter().all(|i| i.decoded_payload.is_none()));
        // One item the codec refuses refuses the request, naming the item.
        let r = c
            .encode_request(request(
                "d1",
                vec![
                    item(Some(json!({"value_1": 1}))),
                    item(Some(json!({"x": 1}))),
                ],
            ))
            .await;
        let e = r.items.unwrap_err().to_string();
        assert!(
            e.starts_with("downlinks[1].decoded_payload: the device's codec (cayennelpp)"),
            "{e}"
        );
        let r = c
            .encode_request(request("d2", vec![item(Some(json!({"value_1": 1})))]))
            .await;
        assert_eq!(r.items.unwrap_err(), RequestError::NoEncoder { index: 0 });
    }
}
