//! What every MQTT-based stream (`mqtt`, `aws-iot`, `azure-iot-hub`) does the same way with
//! rumqttc: where to connect ([`endpoint`]), waiting for CONNACK, matching QoS 1 publishes to
//! their PUBACKs ([`Inflight`]), taking cloud messages in order ([`Intake`]), the event loop on
//! its own task ([`Driver`]), and a polite disconnect.
//!
//! PUBACK matching (crate-notes, "rumqttc 0.25"): rumqttc does not return the packet id of a
//! publish. Each publish goes into rumqttc's request channel and onto [`Inflight`]'s FIFO of
//! record sequence numbers in the same step, so both have the same order; when the event loop
//! reports `Outgoing::Publish(pkid)` the FIFO's head is that publish, and `Incoming::PubAck(pkid)`
//! then names the record to remove from the store. Publishes that are not queue records
//! (status, events, twin/shadow) carry `None`.
//!
//! Limits (docs/reliability.md): rumqttc reads an incoming packet whole and ends the connection
//! on one above its limit, so the limit is set high on purpose ([`MAX_INCOMING_PACKET`]) and
//! a message above what a downlink request can need ([`MAX_DOWNLINK_MESSAGE`]) is refused alone
//! ([`shed_oversized`]): its body is freed at once and its device gets `down/failed`. A broker
//! that answers nothing ([`Watchdog`]) ends the connection within `response_timeout_s`.

use crate::config::{ServerUrl, Transport as Scheme};
use crate::downlink::DownlinkHandle;
use crate::model::DownlinkRequest;
use crate::model::FastMap;
use crate::streams::error::SessionError;
use crate::streams::tls::TlsError;
use rumqttc::{AsyncClient, Event, EventLoop, Packet, Publish, QoS, Transport};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// rumqttc's incoming packet limit: above it rumqttc cannot skip the packet and the connection
/// ends (the broker may send it again after the reconnect). Brokers should refuse such
/// messages at publish time (mosquitto: `message_size_limit`); AWS IoT (128 KiB) and IoT Hub
/// (64 KB to a device) never send one.
pub(crate) const MAX_INCOMING_PACKET: usize = 1024 * 1024;
/// Largest downlink message taken: 64 queued downlinks of 242 bytes in the downlink JSON take
/// about 40 KB. A larger one is refused alone.
pub(crate) const MAX_DOWNLINK_MESSAGE: usize = 64 * 1024;

/// A message over [`MAX_DOWNLINK_MESSAGE`]: free its body now (up to [`INTAKE_QUEUE`] messages
/// wait for the scheduler) and return its size; the caller refuses it alone.
pub(crate) fn shed_oversized(p: &mut Publish) -> Option<usize> {
    let len = p.payload.len();
    (len > MAX_DOWNLINK_MESSAGE).then(|| {
        p.payload = Default::default();
        len
    })
}

/// The request of a message refused for its size (`down/failed` where the device is known).
pub(crate) fn too_large(mut req: DownlinkRequest, len: usize) -> DownlinkRequest {
    req.items = Err(crate::model::RequestError::TooLarge {
        len,
        max: MAX_DOWNLINK_MESSAGE,
    });
    req
}

/// Notices a hung broker (a process stopped, a link that swallows packets): the first request
/// written since the broker was last heard (a publish, a subscribe, a keep-alive ping) starts a
/// timer that anything coming from the broker stops; when it runs out, the connection is over.
/// rumqttc alone notices only at the second unanswered ping, up to two keep-alives late.
pub(crate) struct Watchdog {
    timeout: Duration,
    waiting_since: Option<tokio::time::Instant>,
}

impl Watchdog {
    pub fn new(timeout: Duration) -> Watchdog {
        Watchdog {
            timeout,
            waiting_since: None,
        }
    }

    /// Feed every event of the event loop.
    pub fn saw(&mut self, ev: &Event) {
        match ev {
            Event::Incoming(_) => self.waiting_since = None,
            Event::Outgoing(
                rumqttc::Outgoing::Publish(_)
                | rumqttc::Outgoing::Subscribe(_)
                | rumqttc::Outgoing::PingReq,
            ) => {
                self.waiting_since
                    .get_or_insert_with(tokio::time::Instant::now);
            }
            Event::Outgoing(_) => {}
        }
    }

    /// When the broker counts as hung, if a request waits.
    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        self.waiting_since.map(|t| t + self.timeout)
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// Sleep until the watchdog's deadline (forever without one).
pub(crate) async fn hung(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// QoS 1 publishes in flight, in rumqttc's order.
#[derive(Default)]
pub(crate) struct Inflight {
    /// Handed to rumqttc, not yet written to the socket.
    fifo: VecDeque<Option<u64>>,
    /// Written, waiting for PUBACK.
    by_pkid: FastMap<u16, Option<u64>>,
}

impl Inflight {
    /// Queue a QoS 1 publish and its FIFO entry together. False when rumqttc's request channel
    /// is full or closed (the connection is going away).
    pub fn publish(
        &mut self,
        client: &AsyncClient,
        topic: impl Into<String>,
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

/// Where an MQTT client connects, in rumqttc's terms.
pub(crate) struct Endpoint {
    /// Host name, or the whole URL for WebSocket transports (rumqttc wants it so).
    pub host: String,
    pub port: u16,
    pub transport: Transport,
}

/// rumqttc's host, port and transport for a server. `tls` builds the TLS configuration when
/// the scheme needs one.
pub(crate) fn endpoint(
    server: &ServerUrl,
    tls: impl Fn() -> Result<Arc<rustls::ClientConfig>, TlsError>,
) -> Result<Endpoint, TlsError> {
    let rustls = |c| rumqttc::TlsConfiguration::Rustls(c);
    let host = server.host().to_string();
    let port = server.port();
    Ok(match server.transport() {
        Scheme::Tcp => Endpoint {
            host,
            port,
            transport: Transport::Tcp,
        },
        Scheme::Tls => Endpoint {
            host,
            port,
            transport: Transport::Tls(rustls(tls()?)),
        },
        // rumqttc wants the whole URL as the "host" for WebSocket transports.
        Scheme::Ws => Endpoint {
            host: server.url().to_string(),
            port,
            transport: Transport::Ws,
        },
        Scheme::Wss => Endpoint {
            host: server.url().to_string(),
            port,
            transport: Transport::Wss(rustls(tls()?)),
        },
    })
}

/// Poll until CONNACK, for at most `timeout`. `Ok(false)` when `cancel` fired first.
pub(crate) async fn until_connack(
    eventloop: &mut EventLoop,
    cancel: &CancellationToken,
    timeout: Duration,
) -> Result<bool, SessionError> {
    let wait = async {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(false),
                ev = eventloop.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(true),
                    Ok(_) => {}
                    Err(e) => return Err(SessionError::from_mqtt(e)),
                },
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .unwrap_or(Err(SessionError::ConnectTimeout(timeout)))
}

/// `check --online`: CONNECT with `o`, wait for the CONNACK (at most `timeout`), disconnect.
pub(crate) async fn probe(o: rumqttc::MqttOptions, timeout: Duration) -> Result<(), SessionError> {
    let (client, mut eventloop) = AsyncClient::new(o, 4);
    until_connack(&mut eventloop, &CancellationToken::new(), timeout).await?;
    let _ = client.try_disconnect();
    // Let the DISCONNECT go out (bounded).
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    Ok(())
}

/// Events a [`Driver`] reads ahead of the session loop: enough to keep the socket busy, few
/// enough that a slow session loop soon stops the reads (backpressure to the broker).
const DRIVER_QUEUE: usize = 64;

/// A connection's event loop on a task of its own, after CONNACK. Polled from a `select!`,
/// `EventLoop::poll`'s future (about 10 KB) was created and moved on every turn of the session
/// loop: callgrind counted ~45,000 instructions of `memcpy` per uplink for it (issue 16). On its
/// own task the poll future stays in place; the session loop reads the events from a channel.
/// Dropping the driver ends the task, and with it the connection.
pub(crate) struct Driver {
    events: mpsc::Receiver<Result<Event, rumqttc::ConnectionError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Driver {
    pub fn start(mut eventloop: EventLoop) -> Driver {
        let (tx, events) = mpsc::channel(DRIVER_QUEUE);
        let task = tokio::spawn(async move {
            loop {
                let ev = eventloop.poll().await;
                let end = ev.is_err();
                if tx.send(ev).await.is_err() || end {
                    return;
                }
            }
        });
        Driver { events, task }
    }

    /// The next event of the connection; the connection's error ends it.
    pub async fn next(&mut self) -> Result<Event, SessionError> {
        match self.events.recv().await {
            Some(ev) => ev.map_err(SessionError::from_mqtt),
            // The task ended without an error: it can only have been cancelled.
            None => Err(SessionError::ClientClosed),
        }
    }

    /// An event that is already waiting, without waiting for one (`None`: none is).
    pub fn try_next(&mut self) -> Option<Result<Event, SessionError>> {
        match self.events.try_recv() {
            Ok(ev) => Some(ev.map_err(SessionError::from_mqtt)),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => Some(Err(SessionError::ClientClosed)),
        }
    }

    /// Disconnect politely and let the event loop write what is queued (bounded).
    pub async fn disconnect(&mut self, client: &AsyncClient) {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Some(Ok(_)) = self.events.recv().await {}
        })
        .await;
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Cloud messages waiting for the scheduler at most, per connection. Beyond it a message is
/// left unacknowledged (the broker, or IoT Hub, delivers it again).
const INTAKE_QUEUE: usize = 256;

/// Incoming PUBLISHes of one connection, handled one at a time in arrival order: each downlink
/// request goes to the scheduler ([`DownlinkHandle::submit`]) and the message is acknowledged
/// to the broker only once the request is stored or refused. MQTT 3.1.1 §4.6 wants PUBACKs in
/// the order the PUBLISHes came; doing one at a time also keeps a `replace` followed by a
/// `push` in that order in the device's queue.
pub(crate) struct Intake {
    tx: mpsc::Sender<(Option<DownlinkRequest>, Publish)>,
    unacked: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Intake {
    /// Start taking messages for the connection of `client`.
    pub fn start(client: AsyncClient, downlinks: Option<DownlinkHandle>) -> Intake {
        let (tx, mut rx) = mpsc::channel::<(Option<DownlinkRequest>, Publish)>(INTAKE_QUEUE);
        let unacked = Arc::new(AtomicUsize::new(0));
        let count = unacked.clone();
        let task = tokio::spawn(async move {
            while let Some((req, p)) = rx.recv().await {
                if let (Some(req), Some(h)) = (req, &downlinks) {
                    if h.submit(req).await.is_err() {
                        // The scheduler stopped (the daemon is stopping): leave the message
                        // unacknowledged so that it is delivered again.
                        return;
                    }
                }
                let acked = client.ack(&p).await;
                count.fetch_sub(1, Ordering::SeqCst);
                if acked.is_err() {
                    return;
                }
            }
        });
        Intake { tx, unacked, task }
    }

    /// Hand over a message (with the downlink request it carries, if any). False when too
    /// many wait: the message stays unacknowledged.
    pub fn push(&self, req: Option<DownlinkRequest>, p: Publish) -> bool {
        self.unacked.fetch_add(1, Ordering::SeqCst);
        if self.tx.try_send((req, p)).is_err() {
            self.unacked.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Every message handed over has been acknowledged.
    pub fn settled(&self) -> bool {
        self.unacked.load(Ordering::SeqCst) == 0
    }
}

impl Drop for Intake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_endpoints_keep_the_url_for_rumqttc_but_print_without_secrets() {
        let no_tls = || Err(TlsError::NoRoots);
        let s = ServerUrl::parse("ws://gw:hunter2@broker.example:8080/mqtt?sig=S3CRET").unwrap();
        let e = endpoint(&s, no_tls).unwrap();
        assert_eq!(
            e.host,
            "ws://gw:hunter2@broker.example:8080/mqtt?sig=S3CRET"
        );
        assert_eq!(e.port, 8080);
        assert_eq!(s.to_string(), "ws://broker.example:8080/mqtt?***");
        let s = ServerUrl::parse("mqtt://broker.example").unwrap();
        let e = endpoint(&s, no_tls).unwrap();
        assert_eq!((e.host.as_str(), e.port), ("broker.example", 1883));
        let err = ServerUrl::parse("bogus://u:pw@x/?k=SECRET").err().unwrap();
        assert!(!err.contains("SECRET") && !err.contains("pw@"), "{err}");
    }
}
