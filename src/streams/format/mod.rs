//! Message formats (`format` of a `[[stream]]`): what a stream sends for a record or a downlink
//! event, and how it reads the downlinks its destination sends.
//!
//! [`Formatter`] is the one place that decides, for one stream, a record's MQTT topic, its body
//! and content type, how several bodies share one HTTP request or one file, what a downlink
//! event becomes, and which MQTT topics carry downlinks and how they are read. The kinds
//! (`mqtt/`, `azure/`, `http/`, `lines.rs`) only move the bytes it makes.
//!
//! | `format` | body of a record | content type | MQTT topics | downlinks in (MQTT) |
//! |---|---|---|---|---|
//! | `tts` (default) | TTS v3 JSON ([`tts`]) | `application/json` | lorastream's (`{prefix}/{app}/devices/{dev}/up`, ...) | `down/push`, `down/replace` |
//! | `chirpstack` | ChirpStack v4 integration event ([`chirpstack`]) | `application/json` | `application/{app}/device/{dev_eui}/event/{up,join,ack,txack,log}` | `.../command/down` |
//! | `xml` | the `tts` JSON as an XML document ([`xml`]) | `application/xml` | lorastream's | as `tts` |
//! | `template` | rendered from the `tts` JSON ([`template`]) | `content_type` | lorastream's | as `tts` |
//!
//! Downlink events are in the stream's format too (TTS `downlink_*` messages; ChirpStack `ack`,
//! `txack`, `log`; their XML for `xml`), except for `template` streams, whose templates render
//! uplinks (and raw frames) only: their events stay `tts` JSON and joins are not sent. Several bodies in one HTTP request
//! ([`Formatter::batch`]): a JSON array for JSON, a `<messages>` document for XML, plain
//! concatenation for other template output; with `batch_max = 1` the one body as it is (TTS
//! webhook style). Lines (`file`, `stdout`): each body followed by a newline unless it ends with
//! one.
//!
//! Decoded payloads: every format takes the payload codec's result through [`Decoded`] (TTS
//! `uplink_message.decoded_payload`, ChirpStack `object`; `xml` and `template` follow the TTS
//! JSON), so adding the codecs changes [`decoded`] only.
//!
//! Guarantees: a body depends only on the record, the configuration and the delivery time (the
//! `lorastream.buffered` marker), so a redelivery is the same message with the same ids. Only a
//! template render can fail; [`render_or_drop`] then removes the record from the stream's queue
//! (it could never be sent), counts it and logs a rate-limited line.

pub mod chirpstack;
pub mod template;
pub mod tts;
pub mod xml;

pub use tts::{rfc3339, Delivery, UplinkExtras, LIVE_THRESHOLD};

use crate::config::{Config, Format, FormatConfig, Region, StreamConfig, StreamKind};
use crate::downlink::json as downlink_json;
use crate::logs::LogLimiter;
use crate::lorawan::session::DeviceClass;
use crate::model::{
    CodecOutput, DownlinkEvent, DownlinkOp, DownlinkRequest, Eui64, FastMap, NetId, Record, Uplink,
};
use crate::store::DropReason;
use crate::streams::StreamContext;
use std::sync::{Arc, Mutex};
use template::{Template, TemplateError};
use xml::XmlError;

/// What a payload codec made of an uplink's FRMPayload (contract, "Payload codecs").
#[derive(Debug, Clone, Copy, Default)]
pub struct Decoded<'a> {
    /// `decodeUplink`'s `data` (TTS `decoded_payload`, ChirpStack `object`).
    pub payload: Option<&'a serde_json::Map<String, serde_json::Value>>,
    /// `decodeUplink`'s `warnings` (TTS `decoded_payload_warnings`).
    pub warnings: &'a [String],
    /// Why there is no payload (TTS layout: `uplink_message.lorastream.codec_error`).
    pub error: Option<&'a str>,
}

/// The codec's result for an uplink, as the record carries it (`crate::codec` decodes it
/// before the uplink is stored).
pub fn decoded(u: &Uplink) -> Decoded<'_> {
    match &u.codec {
        None => Decoded::default(),
        Some(CodecOutput::Decoded { data, warnings }) => Decoded {
            payload: Some(&data.0),
            warnings,
            error: None,
        },
        Some(CodecOutput::Error(e)) => Decoded {
            payload: None,
            warnings: &[],
            error: Some(e),
        },
    }
}

/// The devices of `cfg` as the formats see them, by DevEUI.
fn device_facts(cfg: &Config) -> FastMap<Eui64, DeviceFacts> {
    use crate::config::Activation;
    cfg.devices
        .iter()
        .map(|d| {
            let join_eui = match &d.activation {
                Activation::Otaa { join_eui, .. } => *join_eui,
                Activation::Abp { .. } => None,
            };
            let f = DeviceFacts {
                id: d.id.clone(),
                application: d.application.clone(),
                class: d.class,
                join_eui,
            };
            (d.dev_eui, f)
        })
        .collect()
}

/// What a device is, for the formats (from its `[[device]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFacts {
    pub id: String,
    pub application: String,
    pub class: DeviceClass,
    /// The configured JoinEUI of an OTAA device (`end_device_ids.join_eui`).
    pub join_eui: Option<Eui64>,
}

/// What the formats need from the configuration besides the stream's own settings: the
/// region, the NetID and the devices. Built once and shared by every stream; the devices are
/// replaced when the configuration is reloaded ([`Facts::set_devices`]).
#[derive(Debug, Default)]
pub struct Facts {
    pub region: Region,
    /// `[gateway] sub_band` (US915/AU915): ChirpStack's region configuration id names it.
    pub sub_band: Option<u8>,
    pub net_id: NetId,
    devices: std::sync::RwLock<FastMap<Eui64, DeviceFacts>>,
}

impl Facts {
    pub fn new(cfg: &Config) -> Facts {
        Facts {
            region: cfg.gateway.region,
            sub_band: cfg.gateway.sub_band,
            net_id: cfg.gateway.net_id,
            devices: std::sync::RwLock::new(device_facts(cfg)),
        }
    }

    /// The devices of a reloaded configuration.
    pub fn set_devices(&self, cfg: &Config) {
        let new = device_facts(cfg);
        if let Ok(mut d) = self.devices.write() {
            *d = new;
        }
    }

    /// The device with this DevEUI (a copy).
    pub fn device(&self, dev_eui: Eui64) -> Option<DeviceFacts> {
        self.devices.read().ok()?.get(&dev_eui).cloned()
    }

    fn join_eui(&self, dev_eui: Eui64) -> Option<Eui64> {
        self.devices.read().ok()?.get(&dev_eui)?.join_eui
    }

    fn class(&self, dev_eui: Eui64) -> Option<DeviceClass> {
        Some(self.devices.read().ok()?.get(&dev_eui)?.class)
    }

    fn extras<'a>(&self, u: &'a Uplink) -> UplinkExtras<'a> {
        UplinkExtras {
            join_eui: self.join_eui(u.dev_eui),
            net_id: Some(self.net_id),
            decoded: decoded(u),
        }
    }

    /// ChirpStack's event metadata for a device.
    fn meta(&self, dev_eui: Eui64) -> chirpstack::EventMeta {
        let (common, config) = chirpstack::region_names(self.region, self.sub_band);
        chirpstack::EventMeta {
            device_class: match self.class(dev_eui) {
                Some(DeviceClass::C) => chirpstack::DeviceClass::C,
                _ => chirpstack::DeviceClass::A,
            },
            region_common_name: common,
            region_config_id: config,
            ..chirpstack::EventMeta::default()
        }
    }
}

/// Why a record has no body in a stream's format.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("cannot write the XML document: {0}")]
    Xml(#[from] XmlError),
}

/// How several bodies of one stream are put together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// JSON values: an array.
    Json,
    /// XML documents: one `<messages>` document.
    Xml,
    /// Anything else: concatenated.
    Text,
}

/// The format's variant, with what it needs.
#[derive(Debug)]
enum Variant {
    Tts,
    ChirpStack,
    Xml,
    Template {
        template: Arc<Template>,
        content_type: String,
    },
}

/// A stream's format (see the module docs).
pub struct Formatter {
    stream: String,
    variant: Variant,
    facts: Arc<Facts>,
    /// `topic_prefix` (mqtt, aws-iot): lorastream's topics.
    prefix: String,
    /// ChirpStack downlinks: the application of an application-scoped stream (subscription).
    application: Option<String>,
    /// HTTP `batch_max = 1`: one message per request, not a batch of one.
    single: bool,
    warn: Mutex<LogLimiter>,
}

impl std::fmt::Debug for Formatter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Formatter")
            .field("stream", &self.stream)
            .field("format", &self.format().name())
            .finish()
    }
}

/// `Content-Type` of JSON bodies.
pub const JSON: &str = "application/json";

impl Formatter {
    pub fn new(cfg: &StreamConfig, facts: Arc<Facts>) -> Formatter {
        let variant = match &cfg.format {
            FormatConfig::Tts => Variant::Tts,
            FormatConfig::ChirpStack => Variant::ChirpStack,
            FormatConfig::Xml => Variant::Xml,
            FormatConfig::Template(t) => Variant::Template {
                template: t.template.clone(),
                content_type: t.content_type.clone(),
            },
        };
        let (prefix, single) = match &cfg.kind {
            StreamKind::Mqtt(m) => (m.topic_prefix.clone(), false),
            StreamKind::AwsIot(a) => (a.mqtt.topic_prefix.clone(), false),
            StreamKind::Http(h) => (String::new(), h.batch_max == 1),
            _ => (String::new(), false),
        };
        let application = match &cfg.scope {
            crate::model::Scope::Application(a) => Some(a.clone()),
            _ => None,
        };
        Formatter {
            stream: cfg.name.clone(),
            variant,
            facts,
            prefix,
            application,
            single,
            warn: Mutex::new(LogLimiter::new()),
        }
    }

    pub fn format(&self) -> Format {
        match self.variant {
            Variant::Tts => Format::Tts,
            Variant::ChirpStack => Format::ChirpStack,
            Variant::Xml => Format::Xml,
            Variant::Template { .. } => Format::Template,
        }
    }

    /// `Content-Type` of a record's body (HTTP header, IoT Hub `$.ct`).
    pub fn content_type(&self) -> &str {
        match &self.variant {
            Variant::Tts | Variant::ChirpStack => JSON,
            Variant::Xml => xml::CONTENT_TYPE,
            Variant::Template { content_type, .. } => content_type,
        }
    }

    /// `Content-Type` of a downlink event's body (templates render records only).
    pub fn events_content_type(&self) -> &str {
        match &self.variant {
            Variant::Xml => xml::CONTENT_TYPE,
            _ => JSON,
        }
    }

    fn shape(&self) -> Shape {
        match &self.variant {
            Variant::Tts | Variant::ChirpStack => Shape::Json,
            Variant::Xml => Shape::Xml,
            Variant::Template { content_type, .. } if is_json(content_type) => Shape::Json,
            Variant::Template { .. } => Shape::Text,
        }
    }

    fn events_shape(&self) -> Shape {
        match &self.variant {
            Variant::Xml => Shape::Xml,
            _ => Shape::Json,
        }
    }

    /// The TTS JSON of a record.
    fn tts(&self, r: &Record, d: Delivery) -> Vec<u8> {
        match r {
            Record::Uplink(u) => tts::uplink_json(u, &self.facts.extras(u), d),
            _ => tts::record_json(r, &UplinkExtras::default(), d),
        }
    }

    /// The record's TTS JSON whatever the format: the context of the e-mail stream's subject
    /// and body templates.
    pub(crate) fn tts_json(&self, r: &Record, d: Delivery) -> Vec<u8> {
        self.tts(r, d)
    }

    /// The body of a record; `None` when the format sends nothing for it: a template renders
    /// uplinks (and raw frames), not joins, which would only fail an uplink template.
    pub fn body(&self, r: &Record, d: Delivery) -> Result<Option<Vec<u8>>, FormatError> {
        Ok(Some(match &self.variant {
            Variant::Tts => self.tts(r, d),
            Variant::Xml => xml::record_xml(r, &self.tts(r, d))?,
            Variant::Template { .. } if matches!(r, Record::Join(_)) => return Ok(None),
            // A template renders uplinks; an alert goes as its own JSON (the rule named this
            // stream, so the operator wants it here).
            Variant::Template { .. } if matches!(r, Record::Alert(_)) => self.tts(r, d),
            Variant::Template { template, .. } => {
                template.render_json(&self.tts(r, d))?.into_bytes()
            }
            Variant::ChirpStack => match r {
                Record::Uplink(u) => chirpstack::uplink_event(
                    u,
                    crate::lorawan::region::uplink_dr(self.facts.region, &u.settings),
                    decoded(u).payload,
                    &self.facts.meta(u.dev_eui),
                ),
                Record::Join(j) => chirpstack::join_event(j, &self.facts.meta(j.dev_eui)),
                // Refused at load time (config: a gateway-scoped stream cannot be
                // `chirpstack`); should one come anyway, the TTS layout is better than nothing.
                Record::GatewayFrame(_) => self.tts(r, d),
                // ChirpStack has no alert event: the alert's own JSON.
                Record::Alert(_) => self.tts(r, d),
            },
        }))
    }

    /// The MQTT topic of a record.
    pub fn topic(&self, r: &Record) -> String {
        match (&self.variant, r) {
            (Variant::ChirpStack, Record::Uplink(u)) => {
                chirpstack::event_topic(&u.application, u.dev_eui, chirpstack::Event::Up)
            }
            (Variant::ChirpStack, Record::Join(j)) => {
                chirpstack::event_topic(&j.application, j.dev_eui, chirpstack::Event::Join)
            }
            _ => tts::topic(&self.prefix, r),
        }
    }

    /// The body of a downlink event; `None` when the format has no such event (ChirpStack
    /// publishes nothing when a downlink is queued).
    pub fn event_body(&self, e: &DownlinkEvent) -> Option<Vec<u8>> {
        Some(match &self.variant {
            Variant::ChirpStack => chirpstack::downlink_event(e, &self.facts.meta(e.dev_eui))?.1,
            Variant::Xml => {
                let json = downlink_json::event_json(e);
                match xml::json_to_xml(xml::APPLICATION_UP, &json) {
                    Ok(doc) => doc,
                    // The event JSON is ours and always an object; keep the JSON if not.
                    Err(_) => json,
                }
            }
            Variant::Tts | Variant::Template { .. } => downlink_json::event_json(e),
        })
    }

    /// A downlink event as an MQTT message (topic, body).
    pub fn event_message(&self, e: &DownlinkEvent) -> Option<(String, Vec<u8>)> {
        if let Variant::ChirpStack = self.variant {
            let (event, body) = chirpstack::downlink_event(e, &self.facts.meta(e.dev_eui))?;
            return Some((
                chirpstack::event_topic(&e.application, e.dev_eui, event),
                body,
            ));
        }
        let topic = format!(
            "{}/{}/devices/{}/down/{}",
            self.prefix,
            e.application,
            e.device,
            e.kind.as_str()
        );
        Some((topic, self.event_body(e)?))
    }

    /// The MQTT topic filters that carry downlinks to this stream.
    pub fn downlink_filters(&self) -> Vec<String> {
        match &self.variant {
            Variant::ChirpStack => vec![chirpstack::command_subscription(
                self.application.as_deref(),
            )],
            _ => ["push", "replace"]
                .iter()
                .map(|op| format!("{}/+/devices/+/down/{op}", self.prefix))
                .collect(),
        }
    }

    /// A message on a downlink topic as a request for the scheduler; `None` when the topic is
    /// not a downlink topic of this format or names no device (logged at debug, counted by the
    /// caller's metrics as nothing: it is acknowledged and forgotten).
    pub fn downlink_request(&self, topic: &str, payload: &[u8]) -> Option<DownlinkRequest> {
        match &self.variant {
            Variant::ChirpStack => {
                chirpstack::downlink_request(&self.stream, topic, payload, |eui| {
                    self.facts.device(eui).map(|d| d.id)
                })
            }
            _ => self.lorastream_downlink(topic, payload),
        }
    }

    /// `{prefix}/{application}/devices/{device}/down/{push|replace}` → request.
    fn lorastream_downlink(&self, topic: &str, payload: &[u8]) -> Option<DownlinkRequest> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [application, "devices", device, "down", op] = parts.as_slice() else {
            return None;
        };
        let op = match *op {
            "push" => DownlinkOp::Push,
            "replace" => DownlinkOp::Replace,
            _ => return None,
        };
        let (items, names) = match downlink_json::parse_body(payload, &self.stream) {
            Ok(b) => (Ok(b.items), b.names),
            Err(e) => (Err(e), None),
        };
        Some(DownlinkRequest {
            stream: self.stream.clone(),
            application: application.to_string(),
            device: device.to_string(),
            op,
            items,
            names,
        })
    }

    /// Record bodies as the body of one HTTP request.
    pub fn batch(&self, bodies: Vec<Vec<u8>>) -> Vec<u8> {
        join(self.shape(), self.single, bodies)
    }

    /// Downlink event bodies as the body of one HTTP request.
    pub fn batch_events(&self, bodies: Vec<Vec<u8>>) -> Vec<u8> {
        join(self.events_shape(), self.single, bodies)
    }

    /// A body as a line of a `file` / `stdout` stream.
    pub fn line(mut body: Vec<u8>) -> Vec<u8> {
        if body.last() != Some(&b'\n') {
            body.push(b'\n');
        }
        body
    }
}

/// A JSON media type: `application/json` or a `+json` suffix (RFC 6839), parameters ignored.
pub(crate) fn is_json(content_type: &str) -> bool {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    media == "application/json" || media.ends_with("+json")
}

/// Several bodies as one (see [`Formatter::batch`]).
fn join(shape: Shape, single: bool, mut bodies: Vec<Vec<u8>>) -> Vec<u8> {
    if single && bodies.len() == 1 {
        return bodies.pop().unwrap_or_default();
    }
    let size: usize = bodies.iter().map(|b| b.len() + 1).sum();
    let mut out = Vec::with_capacity(size + 64);
    match shape {
        Shape::Json => {
            out.push(b'[');
            for (i, b) in bodies.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(b);
            }
            out.push(b']');
        }
        Shape::Xml => {
            out.extend_from_slice(xml::DECLARATION.as_bytes());
            out.extend_from_slice(b"<messages>");
            for b in &bodies {
                out.extend_from_slice(b.strip_prefix(xml::DECLARATION.as_bytes()).unwrap_or(b));
            }
            out.extend_from_slice(b"</messages>");
        }
        Shape::Text => {
            for b in &bodies {
                out.extend_from_slice(b);
            }
        }
    }
    out
}

/// The body of a queued record in the stream's format. `None` means the record has left the
/// queue and the stream goes on with the next one: the format sends nothing for it (a join on
/// a template stream: acknowledged), or it cannot be made (a template that cannot render it:
/// removed as a dead letter, counted as `lorastream_stream_errors_total{reason="format_error"}`
/// and logged, rate-limited).
pub(crate) fn render_or_drop(
    ctx: &StreamContext,
    seq: u64,
    r: &Record,
    d: Delivery,
) -> Option<Vec<u8>> {
    match ctx.format.body(r, d) {
        Ok(Some(b)) => Some(b),
        Ok(None) => {
            if let Err(err) = ctx.queue.ack(seq) {
                tracing::error!(stream = %ctx.name, seq, error = %err, "cannot remove a record the format does not send");
            }
            None
        }
        Err(e) => {
            ctx.metrics.stream_error(&ctx.name, "format_error");
            if let Err(err) = ctx.queue.drop_undeliverable(seq, DropReason::DeadLetter) {
                tracing::error!(stream = %ctx.name, seq, error = %err, "cannot remove a record that cannot be formatted");
            }
            let allow = ctx
                .format
                .warn
                .lock()
                .map(|mut w| w.allow())
                .unwrap_or(true);
            if allow {
                tracing::warn!(stream = %ctx.name, record = %r.correlation_id(), error = %e, "record cannot be put in the stream's format; dropped (fix the template)");
            }
            None
        }
    }
}

#[cfg(test)]
mod tests;
