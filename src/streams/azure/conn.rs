//! One MQTT connection to IoT Hub for one device identity, from CONNECT to its end.
//!
//! The connection publishes what it is handed (records and downlink events) as QoS 1
//! device-to-cloud messages and reports each record's PUBACK ([`Report::Done`]) after removing
//! the record from the queue; its owner (the gateway runner or the dispatcher) decides what to
//! hand and re-sends what was not acknowledged when the connection ends. Cloud-to-device messages
//! become downlink requests; each is acknowledged to IoT Hub only after the scheduler stored it,
//! in arrival order (MQTT 3.1.1 §4.6). The connection ends itself ahead of its SAS token's
//! expiry (at 80 % of the default hour; see `renew_after`), after waiting for outstanding
//! PUBACKs.

use super::wire::{self, SasKey};
use super::Shared;
use crate::model::{correlation_id, now_us, DownlinkEvent, DownlinkRequest, Eui64, Record};
use crate::streams::connect::SessionEnd;
use crate::streams::error::SessionError;
use crate::streams::format::{render_or_drop, rfc3339, Delivery};
use crate::streams::mqtt::client::{self, Inflight, Intake};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, Publish, QoS};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a stop or a renewal waits for outstanding PUBACKs.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// CONNECT (TCP, TLS, WebSocket, CONNACK) must complete within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Twin reported properties at most this often per device identity.
pub(super) const TWIN_EVERY: Duration = Duration::from_secs(60);
/// rumqttc packet limit both ways: a 256 KB message plus its topic.
const MAX_PACKET: usize = wire::MAX_MESSAGE + 4096;
/// Publishes that are not records (events, twin) allowed in flight beside the records.
const EXTRA: usize = 16;
/// Device-stream answers waiting to be published.
const TUNNEL_ANSWERS: usize = 16;

/// The LoRaWAN device behind a per-device identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LoraDevice {
    pub application: String,
    pub device: String,
    pub dev_eui: Eui64,
}

/// An IoT Hub device identity.
#[derive(Debug, Clone)]
pub(super) struct Identity {
    pub hub_id: String,
    pub key: SasKey,
    /// `identity = "device"`: the LoRaWAN device; None for the gateway identity.
    pub device: Option<LoraDevice>,
}

/// What a connection tells its owner, tagged with the connection id.
#[derive(Debug)]
pub(super) enum Report {
    /// CONNACK accepted.
    Connected,
    /// The record left the queue (PUBACK, or dropped as undeliverable).
    Done(u64),
    /// A message came from IoT Hub (keeps a per-device connection from idling out).
    Activity,
    /// The last report of a connection: `Stopped` (daemon stop, idle, room for another
    /// device), `Renew` (the SAS token is about to expire: reconnect at once with a new one) or
    /// `Failed` (CONNACK refused: bad key, unknown or disabled device, expired token; or the
    /// connection broke).
    Closed(SessionEnd),
}

fn unix_now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// How long after issuing a token whose life is `left` (its expiry is in whole seconds, so up
/// to a second less than `ttl`) its connection is renewed: a fifth of `ttl` ahead of the expiry,
/// and at least half of it (at most a minute) ahead for short tokens, so the CONNECT, the drain
/// of in-flight PUBACKs and the reconnect fit on a loaded gateway. 3600 s → 2,880 s; 3 s →
/// 0.5-1.5 s. (Renewing at 80 % of `ttl` from the CONNACK left a 3 s token no margin at all
/// once the handshake was slow: the hub closed the connection for its expired token.)
fn renew_after(ttl: Duration, left: Duration) -> Duration {
    let margin = (ttl / 5).max((ttl / 2).min(Duration::from_secs(60)));
    left.saturating_sub(margin)
}

/// Run one connection and report its end.
pub(super) async fn run(
    sh: Arc<Shared>,
    who: Identity,
    conn_id: u64,
    mut records: mpsc::Receiver<(u64, Record)>,
    mut events: mpsc::Receiver<DownlinkEvent>,
    reports: mpsc::UnboundedSender<(u64, Report)>,
    close: CancellationToken,
) {
    let report = |r: Report| {
        let _ = reports.send((conn_id, r));
    };
    let end = session(&sh, &who, &mut records, &mut events, &report, &close).await;
    report(Report::Closed(end));
}

/// The MQTT options of a connection as `who`, with a fresh SAS token.
pub(super) fn options(sh: &Shared, who: &Identity) -> MqttOptions {
    options_until(sh, who, unix_now().as_secs() + sh.sas_ttl.as_secs())
}

/// [`options`] with a token that expires at `expiry` (Unix seconds).
fn options_until(sh: &Shared, who: &Identity, expiry: u64) -> MqttOptions {
    let token = wire::token(&wire::resource(&sh.hostname, &who.hub_id), &who.key, expiry);
    let window = sh.inflight + EXTRA;
    let mut o = MqttOptions::new(&who.hub_id, &sh.endpoint.host, sh.endpoint.port);
    o.set_transport(sh.endpoint.transport.clone());
    o.set_keep_alive(sh.keep_alive);
    // No resumed sessions: the store is the truth; IoT Hub keeps cloud-to-device messages in
    // the device's queue whatever the session flag.
    o.set_clean_session(true);
    o.set_inflight(u16::try_from(window).unwrap_or(u16::MAX));
    // Incoming: high on purpose, as for every MQTT stream (`client::MAX_INCOMING_PACKET`).
    o.set_max_packet_size(client::MAX_INCOMING_PACKET.max(MAX_PACKET), MAX_PACKET);
    o.set_credentials(wire::username(&sh.hostname, &who.hub_id), token.expose());
    o.set_manual_acks(true);
    o
}

async fn session(
    sh: &Shared,
    who: &Identity,
    records: &mut mpsc::Receiver<(u64, Record)>,
    events: &mut mpsc::Receiver<DownlinkEvent>,
    report: &impl Fn(Report),
    close: &CancellationToken,
) -> SessionEnd {
    let window = sh.inflight + EXTRA;
    let issued = tokio::time::Instant::now();
    let now = unix_now();
    let expiry = now.as_secs() + sh.sas_ttl.as_secs();
    let renew_at =
        issued + renew_after(sh.sas_ttl, Duration::from_secs(expiry).saturating_sub(now));
    let o = options_until(sh, who, expiry);
    let (client, mut eventloop) = AsyncClient::new(o, window + 16);

    match client::until_connack(&mut eventloop, close, CONNECT_TIMEOUT).await {
        Ok(true) => {}
        Ok(false) => return SessionEnd::Stopped,
        Err(e) => return SessionEnd::failed(e),
    }
    let mut driver = client::Driver::start(eventloop);
    report(Report::Connected);
    if sh.ctx.downlinks.is_some() {
        let _ = client.try_subscribe(wire::devicebound_filter(&who.hub_id), QoS::AtLeastOnce);
    }
    if sh.twin {
        // Twin responses come only to subscribers (IoT Hub MQTT docs, "Device twins").
        let _ = client.try_subscribe("$iothub/twin/res/#", QoS::AtMostOnce);
    }
    // Remote commands as direct methods of the gateway's own device (IoT Hub MQTT docs,
    // "Respond to a direct method"): requests on `$iothub/methods/POST/{name}/?$rid={rid}`,
    // answers on `$iothub/methods/res/{status}/?$rid={rid}`, published by this loop.
    let commands = sh.ctx.commands.clone().filter(|_| who.device.is_none());
    if commands.is_some() {
        let _ = client.try_subscribe(METHODS_FILTER, QoS::AtMostOnce);
    }
    let (method_tx, mut method_rx) =
        tokio::sync::mpsc::channel::<(String, Vec<u8>)>(crate::daemon::commands::MAX_RUNNING + 1);
    // Remote access as device streams of the gateway's own device (see `tunnel.rs`): requests
    // on `$iothub/streams/POST/{port}/?$rid=...`, answers on `$iothub/streams/res/{status}/`,
    // published by this loop.
    let tunnels = sh.tunnels.clone().filter(|_| who.device.is_none());
    if tunnels.is_some() {
        let _ = client.try_subscribe(super::tunnel::FILTER, QoS::AtMostOnce);
    }
    let (tunnel_tx, mut tunnel_rx) = tokio::sync::mpsc::channel::<String>(TUNNEL_ANSWERS);
    // Cloud-to-device messages are handled one at a time, in order, off the polling task. A
    // renewal or stop waits until they are acknowledged too, so a stored downlink is not
    // redelivered (and queued twice) after the reconnect.
    let intake = Intake::start(client.clone(), sh.ctx.downlinks.clone());

    let mut inflight = Inflight::default();
    let mut rid = 0u64;
    let mut draining: Option<(Instant, SessionEnd)> = None;
    let mut watchdog = client::Watchdog::new(crate::config::stream_defaults::MQTT_RESPONSE_TIMEOUT);
    let end = loop {
        let room = draining.is_none() && inflight.len() < window;
        tokio::select! {
            _ = client::hung(watchdog.deadline()) => {
                break SessionEnd::failed(SessionError::NoResponse(watchdog.timeout()));
            }
            ev = driver.next() => match ev.inspect(|e| watchdog.saw(e)) {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => inflight.written(pkid),
                Ok(Event::Incoming(Packet::PubAck(a))) => {
                    if let Some(seq) = inflight.acked(a.pkid) {
                        if let Err(e) = sh.ctx.queue.ack(seq) {
                            tracing::error!(stream = %sh.ctx.name, error = %e, "cannot remove an acknowledged record");
                        }
                        report(Report::Done(seq));
                    }
                }
                Ok(Event::Incoming(Packet::Publish(mut p))) => {
                    report(Report::Activity);
                    if let (Some(t), true) = (&tunnels, p.topic.starts_with("$iothub/streams/")) {
                        if p.qos != QoS::AtMostOnce {
                            let _ = client.try_ack(&p);
                        }
                        if let Some(answer) = t.on_request(&p.topic, &sh.ctx.cancel) {
                            if tunnel_tx.try_send(answer).is_err() {
                                tracing::warn!(stream = %sh.ctx.name, "too many device-stream requests at once; one is not answered");
                            }
                        }
                        continue;
                    }
                    if let (Some(c), Some((name, rid))) = (
                        &commands,
                        method_request(&p.topic).map(|(n, r)| (n.to_string(), r.to_string())),
                    ) {
                        // An oversized request is answered as not JSON.
                        client::shed_oversized(&mut p);
                        direct_method(c, &sh.ctx.name, &name, &rid, p.payload.to_vec(), &method_tx);
                        continue;
                    }
                    let req = match client::shed_oversized(&mut p) {
                        None => incoming(sh, who, &p),
                        Some(len) => {
                            sh.ctx.metrics.downlink_too_large(&sh.ctx.name);
                            tracing::warn!(stream = %sh.ctx.name, device = %who.hub_id, len, max = client::MAX_DOWNLINK_MESSAGE, "cloud-to-device message too large: refused");
                            incoming(sh, who, &p).map(|r| client::too_large(r, len))
                        }
                    };
                    if !intake.push(req, p) {
                        sh.ctx.metrics.stream_error(&sh.ctx.name, "downlinks_backlog");
                        tracing::warn!(stream = %sh.ctx.name, device = %who.hub_id, "too many cloud-to-device messages at once; IoT Hub will redeliver the rest");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    if s.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                        tracing::warn!(stream = %sh.ctx.name, device = %who.hub_id, "IoT Hub refused a subscription");
                    }
                }
                Ok(_) => {}
                Err(e) => break SessionEnd::failed(e),
            },
            Some((seq, r)) = records.recv(), if room => {
                if !publish_record(sh, who, &client, &mut inflight, &mut rid, seq, &r, report) {
                    break SessionEnd::failed(SessionError::ClientClosed);
                }
            }
            Some(topic) = tunnel_rx.recv(), if room => {
                if !inflight.publish(&client, &topic, Vec::new(), false, None) {
                    break SessionEnd::failed(SessionError::ClientClosed);
                }
            }
            Some((topic, body)) = method_rx.recv(), if room => {
                if !inflight.publish(&client, &topic, body, false, None) {
                    break SessionEnd::failed(SessionError::ClientClosed);
                }
            }
            Some(e) = events.recv(), if room => {
                let Some(body) = sh.ctx.format.event_body(&e) else { continue };
                let mut props = vec![
                    ("$.ct", sh.ctx.format.events_content_type().to_string()),
                    ("$.ce", "utf-8".to_string()),
                    ("type", format!("downlink_{}", e.kind.as_str())),
                    ("application", e.application.clone()),
                    ("device", e.device.clone()),
                    ("dev_eui", e.dev_eui.to_string()),
                ];
                if let Some(it) = &e.item {
                    // Every event of one downlink carries its correlation id.
                    props.push(("$.cid", correlation_id("downlink", it.id)));
                }
                let topic = topic_of(&who.hub_id, &props);
                if !inflight.publish(&client, &topic, body, false, None) {
                    break SessionEnd::failed(SessionError::ClientClosed);
                }
            }
            _ = tokio::time::sleep_until(renew_at), if draining.is_none() => {
                draining = Some((Instant::now(), SessionEnd::Renew));
            }
            _ = close.cancelled(), if draining.is_none() => {
                draining = Some((Instant::now(), SessionEnd::Stopped));
            }
            _ = tokio::time::sleep(Duration::from_millis(50)), if draining.is_some() => {
                if let Some((since, _)) = &draining {
                    let idle = inflight.is_empty() && intake.settled();
                    if idle || since.elapsed() > DRAIN_GRACE {
                        driver.disconnect(&client).await;
                        break draining.take().map(|(_, e)| e).unwrap_or(SessionEnd::Stopped);
                    }
                }
            }
        }
    };
    drop(intake);
    end
}

/// The direct methods' subscription.
const METHODS_FILTER: &str = "$iothub/methods/POST/#";

/// `$iothub/methods/POST/{name}/?$rid={rid}` → (name, rid).
fn method_request(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix("$iothub/methods/POST/")?;
    let (name, query) = rest.split_once("/?")?;
    let rid = query.split('&').find_map(|kv| kv.strip_prefix("$rid="))?;
    (!name.is_empty()).then_some((name, rid))
}

/// Run a direct method as a remote command off the loop; its answer (status 200 when the
/// command succeeded, 400 otherwise, the reply document as the payload) comes back on `out`.
fn direct_method(
    commands: &crate::daemon::commands::Commands,
    stream: &str,
    name: &str,
    rid: &str,
    body: Vec<u8>,
    out: &tokio::sync::mpsc::Sender<(String, Vec<u8>)>,
) {
    let topic = |ok: bool| {
        format!(
            "$iothub/methods/res/{}/?$rid={rid}",
            if ok { 200 } else { 400 }
        )
    };
    let Some(slot) = commands.try_start() else {
        let reply = commands.busy(stream, name, &body);
        let _ = out.try_send((topic(false), serde_json::to_vec(&reply).unwrap_or_default()));
        return;
    };
    let (commands, stream, name, out) = (
        commands.clone(),
        stream.to_string(),
        name.to_string(),
        out.clone(),
    );
    let topic_ok = topic(true);
    let topic_err = topic(false);
    tokio::spawn(async move {
        let reply = commands.run(&stream, &name, &body).await;
        let ok = reply["ok"] == true;
        let bytes = serde_json::to_vec(&reply).unwrap_or_default();
        let _ = out
            .send((if ok { topic_ok } else { topic_err }, bytes))
            .await;
        drop(slot);
    });
}

fn topic_of(hub_id: &str, props: &[(&str, String)]) -> String {
    let p: Vec<(&str, &str)> = props.iter().map(|(k, v)| (*k, v.as_str())).collect();
    wire::events_topic(hub_id, &p)
}

/// The device-to-cloud topic of a record (with its property bag); `content_type` is the
/// stream format's (`$.ct`: `application/json`, `application/xml`, or a template's
/// `content_type`; the body is always UTF-8).
pub(super) fn message_topic(hub_id: &str, r: &Record, content_type: &str) -> String {
    let mut props = vec![
        ("$.ct", content_type.to_string()),
        ("$.ce", "utf-8".to_string()),
        ("$.mid", r.correlation_id()),
    ];
    match r {
        Record::Uplink(u) => {
            props.push(("type", "uplink".into()));
            props.push(("application", u.application.to_string()));
            props.push(("device", u.device.to_string()));
            props.push(("dev_eui", u.dev_eui.to_string()));
            if let Some(p) = u.f_port {
                props.push(("f_port", p.to_string()));
            }
            props.push(("f_cnt", u.f_cnt.to_string()));
        }
        Record::Join(j) => {
            props.push(("type", "join".into()));
            props.push(("application", j.application.clone()));
            props.push(("device", j.device.clone()));
            props.push(("dev_eui", j.dev_eui.to_string()));
        }
        Record::GatewayFrame(g) => {
            props.push(("type", "frame".into()));
            props.push(("gateway", g.rx.gateway.to_string()));
        }
        // Refused by the config check for IoT Hub streams; sent as JSON should one come.
        Record::Alert(a) => {
            props.push(("type", "alert".into()));
            props.push(("kind", a.kind.clone()));
        }
    }
    topic_of(hub_id, &props)
}

#[allow(clippy::too_many_arguments)]
fn publish_record(
    sh: &Shared,
    who: &Identity,
    client: &AsyncClient,
    inflight: &mut Inflight,
    rid: &mut u64,
    seq: u64,
    r: &Record,
    report: &impl Fn(Report),
) -> bool {
    let Some(body) = render_or_drop(&sh.ctx, seq, r, Delivery { now_us: now_us() }) else {
        // Dropped from the queue: done with it.
        report(Report::Done(seq));
        return true;
    };
    let topic = message_topic(&who.hub_id, r, sh.ctx.format.content_type());
    let size = topic.len() + body.len();
    if size > wire::MAX_MESSAGE {
        // IoT Hub would refuse it forever: drop it rather than block the queue.
        crate::streams::too_large::drop_record(
            &sh.ctx,
            seq,
            r,
            size,
            Some(wire::MAX_MESSAGE),
            "IoT Hub's 256 KB message limit",
        );
        report(Report::Done(seq));
        return true;
    }
    if !inflight.publish(client, &topic, body, false, Some(seq)) {
        return false;
    }
    sh.ctx.metrics.stream_published(&sh.ctx.name, 1);
    if let (true, Record::Uplink(u)) = (sh.twin, r) {
        let due = sh.last_twin.lock().map(|mut m| {
            let now = Instant::now();
            match m.get(&who.hub_id) {
                Some(t) if now.duration_since(*t) < TWIN_EVERY => false,
                _ => {
                    m.insert(who.hub_id.clone(), now);
                    true
                }
            }
        });
        if due.unwrap_or(false) {
            *rid += 1;
            let best = u.rx.first();
            let seen = serde_json::json!({
                "application": u.application,
                "device": u.device,
                "dev_eui": u.dev_eui.to_string(),
                "f_cnt": u.f_cnt,
                "rssi": best.map(|x| x.rssi),
                "snr": best.map(|x| x.snr),
                "gateway": best.map(|x| x.gateway.to_string()),
                "last_seen": rfc3339(u.received_at_us),
            });
            let doc = if who.device.is_some() {
                serde_json::json!({ "lorawan": seen })
            } else {
                serde_json::json!({ "lorastream": {
                    "last_uplink": seen,
                    "queue_depth": sh.ctx.queue.len(),
                }})
            };
            // Best effort: a twin update is not a queue record.
            inflight.publish(
                client,
                wire::twin_patch_topic(*rid),
                doc.to_string().into_bytes(),
                false,
                None,
            );
        }
    }
    true
}

/// A message from IoT Hub → the downlink request it carries (None: nothing to queue; it is
/// acknowledged all the same, so that IoT Hub does not redeliver it forever).
fn incoming(sh: &Shared, who: &Identity, p: &Publish) -> Option<DownlinkRequest> {
    if let Some(status) = wire::twin_response_status(&p.topic) {
        if !(200..300).contains(&status) {
            tracing::warn!(stream = %sh.ctx.name, device = %who.hub_id, status, "IoT Hub refused a twin update");
        }
        return None;
    }
    let Some(props) = wire::parse_devicebound(&p.topic, &who.hub_id) else {
        tracing::debug!(stream = %sh.ctx.name, topic = %p.topic, "message on an unexpected topic ignored");
        return None;
    };
    sh.ctx.downlinks.as_ref()?;
    let device = who
        .device
        .as_ref()
        .map(|d| (d.application.as_str(), d.device.as_str()));
    let req = wire::downlink_request(&sh.ctx.name, sh.raw_downlinks, device, &props, &p.payload);
    if req.is_none() {
        sh.ctx.metrics.downlink_event("unroutable");
        tracing::warn!(stream = %sh.ctx.name, device = %who.hub_id,
            "cloud-to-device message without a LoRaWAN device dropped: set the application and device properties (or end_device_ids in the JSON body)");
    }
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_leaves_room_before_the_token_expires() {
        let s = Duration::from_secs;
        // A day-long token, issued exactly on a second: renewed at 80 %.
        assert_eq!(renew_after(s(3600), s(3600)), s(2880));
        // Long tokens keep a fifth, short ones half (at most a minute) of their life.
        assert_eq!(renew_after(s(600), s(600)), s(480));
        assert_eq!(renew_after(s(120), s(120)), s(60));
        assert_eq!(renew_after(s(3), s(3)), Duration::from_millis(1500));
        // Whole-second expiry: a 3 s token issued at x.9 s lives 2.1 s.
        assert_eq!(
            renew_after(s(3), Duration::from_millis(2100)),
            Duration::from_millis(600)
        );
        assert_eq!(
            renew_after(s(2), Duration::from_millis(500)),
            Duration::ZERO
        );
    }

    #[test]
    fn message_properties_per_record_kind() {
        use crate::model::GatewayFrame;
        use crate::sim::fixtures;
        let mut u = fixtures::uplink(1, 9);
        (u.id, u.application, u.device, u.f_port) = (1, "farm".into(), "soil 1".into(), None);
        let (settings, rx) = (u.settings.clone(), fixtures::rx(Eui64::from_u64(0xAA55)));
        let up = Record::Uplink(u);
        let t = message_topic("d1", &up, "application/json");
        assert_eq!(
            t,
            format!(
                "devices/d1/messages/events/$.ct=application%2Fjson&$.ce=utf-8&$.mid={}&type=uplink\
                 &application=farm&device=soil%201&dev_eui=0000000000000001&f_cnt=9",
                wire::url_encode(&correlation_id("uplink", 1))
            ),
            "no f_port for a frame without FPort"
        );
        assert!(
            message_topic("d1", &up, "application/xml")
                .starts_with("devices/d1/messages/events/$.ct=application%2Fxml&$.ce=utf-8&"),
            "the format's content type"
        );
        let frame = Record::GatewayFrame(GatewayFrame {
            id: 2,
            phy_payload: vec![0x40],
            crc_ok: true,
            settings,
            rx,
        });
        let props = wire::parse_devicebound(
            &message_topic("gw", &frame, "application/json").replace("/events/", "/devicebound/"),
            "gw",
        )
        .unwrap();
        assert_eq!(wire::prop(&props, "type"), Some("frame"));
        assert_eq!(wire::prop(&props, "gateway"), Some("000000000000AA55"));
        assert_eq!(wire::prop(&props, "device"), None);
    }
}
