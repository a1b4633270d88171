//! Pieces shared by the MQTT-based streams (`mqtt`, `aws-iot`, `azure-iot-hub`): where to
//! connect, matching QoS 1 publishes to their PUBACKs, waiting for CONNACK, and logging a long
//! outage readably ([`FailureLog`], which the HTTP stream uses too).
//!
//! PUBACK matching (crate-notes, "rumqttc 0.25"): rumqttc does not return the packet id of a
//! publish. Each publish goes into rumqttc's request channel and onto [`Inflight`]'s FIFO of
//! record sequence numbers in the same critical section, so both have the same order; when the
//! event loop reports `Outgoing::Publish(pkid)` the FIFO's head is that publish, and
//! `Incoming::PubAck(pkid)` then names the record to remove from the store. Publishes that are
//! not queue records (status, events, twin/shadow) carry `None`.

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, Packet, QoS, Transport};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// QoS 1 publishes in flight, in rumqttc's order.
#[derive(Default)]
pub struct Inflight {
    /// Handed to rumqttc, not yet written to the socket.
    fifo: VecDeque<Option<u64>>,
    /// Written, waiting for PUBACK.
    by_pkid: HashMap<u16, Option<u64>>,
}

impl Inflight {
    /// Queue a QoS 1 publish and its FIFO entry together. False when rumqttc's request channel
    /// is full or closed (the connection is going away).
    pub fn publish(
        &mut self,
        client: &AsyncClient,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
        seq: Option<u64>,
    ) -> bool {
        match client.try_publish(topic, QoS::AtLeastOnce, retain, payload) {
            Ok(()) => {
                self.fifo.push_back(seq);
                true
            }
            Err(_) => false,
        }
    }

    /// rumqttc wrote the publish with this packet id.
    pub fn written(&mut self, pkid: u16) {
        let seq = self.fifo.pop_front().flatten();
        self.by_pkid.insert(pkid, seq);
    }

    /// A PUBACK: `Some(seq)` when it acknowledged a queue record, `None` otherwise.
    pub fn acked(&mut self, pkid: u16) -> Option<u64> {
        self.by_pkid.remove(&pkid).flatten()
    }

    /// Publishes not yet acknowledged (records and others).
    pub fn len(&self) -> usize {
        self.fifo.len() + self.by_pkid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where an MQTT client connects.
#[derive(Clone)]
pub struct Endpoint {
    /// Host name, or the whole URL for WebSocket transports (rumqttc wants it so).
    pub host: String,
    pub port: u16,
    pub transport: Transport,
    /// The server for log lines: the URL without user, password, query or fragment (a
    /// WebSocket URL may carry a signature or credentials).
    pub shown: String,
}

/// Parse `mqtt://`, `mqtts://`, `ws://` or `wss://` URLs. `tls` builds the TLS configuration
/// when the scheme needs one.
pub fn endpoint(
    server: &str,
    tls: impl Fn() -> Result<Arc<rustls::ClientConfig>, String>,
) -> Result<Endpoint, String> {
    let url = url::Url::parse(server)
        .map_err(|e| format!("server {:?}: {e}", crate::model::redact_url_str(server)))?;
    let shown = crate::model::redact_url(&url);
    let host = url
        .host_str()
        .ok_or_else(|| format!("server {shown:?}: no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let rustls = |c| rumqttc::TlsConfiguration::Rustls(c);
    let (transport, port, host) = match url.scheme() {
        "mqtt" => (Transport::Tcp, url.port().unwrap_or(1883), host),
        "mqtts" => (
            Transport::Tls(rustls(tls()?)),
            url.port().unwrap_or(8883),
            host,
        ),
        // rumqttc wants the whole URL as the "host" for WebSocket transports.
        "ws" => (Transport::Ws, url.port().unwrap_or(80), server.to_string()),
        "wss" => (
            Transport::Wss(rustls(tls()?)),
            url.port().unwrap_or(443),
            server.to_string(),
        ),
        s => return Err(format!("server scheme {s:?} is not mqtt, mqtts, ws or wss")),
    };
    Ok(Endpoint {
        host,
        port,
        transport,
        shown,
    })
}

/// Poll until CONNACK. `Ok(false)` when `cancel` fired first.
pub async fn until_connack(
    eventloop: &mut EventLoop,
    cancel: &CancellationToken,
) -> Result<bool, ConnectionError> {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(false),
            ev = eventloop.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(true),
                Ok(_) => {}
                Err(e) => return Err(e),
            },
        }
    }
}

/// Disconnect politely and let the event loop write what is queued (bounded).
pub async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) {
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

/// Counts consecutive failures so that an outage of days stays readable in the log: the first
/// three failures are logged, then every tenth.
#[derive(Default)]
pub struct FailureLog {
    failures: u64,
}

impl FailureLog {
    /// Count a failure; true when this one should be logged. Returns the count too.
    pub fn failed(&mut self) -> (bool, u64) {
        self.failures += 1;
        (self.failures <= 3 || self.failures % 10 == 0, self.failures)
    }

    /// Failures since the last reset.
    pub fn count(&self) -> u64 {
        self.failures
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_endpoints_keep_the_url_for_rumqttc_but_log_it_without_secrets() {
        let no_tls = || Err("no TLS for ws://".to_string());
        let e = endpoint(
            "ws://gw:hunter2@broker.example:8080/mqtt?sig=S3CRET",
            no_tls,
        )
        .unwrap();
        assert_eq!(
            e.host,
            "ws://gw:hunter2@broker.example:8080/mqtt?sig=S3CRET"
        );
        assert_eq!(e.port, 8080);
        assert_eq!(e.shown, "ws://broker.example:8080/mqtt?***");
        let e = endpoint("mqtt://broker.example", no_tls).unwrap();
        assert_eq!((e.host.as_str(), e.port), ("broker.example", 1883));
        let err = endpoint("bogus://u:pw@x/?k=SECRET", no_tls).err().unwrap();
        assert!(!err.contains("SECRET") && !err.contains("pw@"), "{err}");
    }
}
