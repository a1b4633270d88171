//! A small MQTT 3.1.1 broker for the tests, on the packet codec of `rumqttc::mqttbytes`.
//!
//! Real TCP, real MQTT: CONNECT/CONNACK, PUBLISH with PUBACK for QoS 1, SUBSCRIBE with `+`/`#`
//! filters, retained messages, PINGREQ, last will on abrupt disconnect. Deliveries to
//! subscribers are granted QoS 0 (the SUBACK says so, as MQTT 3.1.1 §3.9.3 allows).
//! Unlike an external broker it can be stopped and restarted on the same port, and it can hold
//! back PUBACKs, which the fault tests need. CI runs the same tests against Debian's mosquitto.
#![allow(dead_code)]

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode,
};
use rumqttc::mqttbytes::QoS;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const MAX: usize = 1024 * 1024;

#[derive(Default)]
struct State {
    subs: Mutex<Vec<(u64, String, mpsc::UnboundedSender<Packet>)>>,
    retained: Mutex<HashMap<String, Publish>>,
    hold_acks: AtomicBool,
    next_conn: AtomicU64,
    /// Every PUBLISH received, in order (topic, payload).
    received: Mutex<Vec<(String, Vec<u8>)>>,
}

pub struct TestBroker {
    port: u16,
    state: Arc<State>,
    stop: CancellationToken,
}

pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        Self::start_on(0).await
    }

    pub async fn start_on(port: u16) -> TestBroker {
        let state = Arc::new(State::default());
        let mut b = TestBroker {
            port,
            state,
            stop: CancellationToken::new(),
        };
        b.listen().await;
        b
    }

    async fn listen(&mut self) {
        // A restarted broker may have to wait for the old socket to go.
        let mut tries = 0;
        let l = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("test broker cannot bind port {}: {e}", self.port),
            }
        };
        self.port = l.local_addr().unwrap().port();
        self.stop = CancellationToken::new();
        let (state, stop) = (self.state.clone(), self.stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = l.accept() => if let Ok((s, _)) = r {
                        tokio::spawn(connection(s, state.clone(), stop.clone()));
                    }
                }
            }
        });
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Close the listener and every connection (like a crashed broker: wills are published
    /// to nobody, retained messages are kept).
    pub async fn stop(&mut self) {
        self.stop.cancel();
        self.state.subs.lock().unwrap().clear();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    pub async fn restart(&mut self) {
        self.listen().await;
    }

    /// Stop answering QoS 1 publishes with PUBACK (a broker that hangs).
    /// Connections accepted since start (a client that reconnects counts again).
    pub fn connections(&self) -> u64 {
        self.state.next_conn.load(Ordering::SeqCst)
    }

    pub fn hold_acks(&self, hold: bool) {
        self.state.hold_acks.store(hold, Ordering::SeqCst);
    }

    pub fn received(&self) -> Vec<(String, Vec<u8>)> {
        self.state.received.lock().unwrap().clone()
    }

    pub fn retained(&self, topic: &str) -> Option<Vec<u8>> {
        self.state
            .retained
            .lock()
            .unwrap()
            .get(topic)
            .map(|p| p.payload.to_vec())
    }
}

fn route(state: &State, p: &Publish) {
    let mut out = Publish::new(p.topic.clone(), QoS::AtMostOnce, p.payload.to_vec());
    out.retain = false;
    for (_, f, tx) in state.subs.lock().unwrap().iter() {
        if topic_matches(f, &p.topic) {
            let _ = tx.send(Packet::Publish(out.clone()));
        }
    }
}

async fn connection(mut sock: TcpStream, state: Arc<State>, stop: CancellationToken) {
    let id = state.next_conn.fetch_add(1, Ordering::SeqCst);
    let (tx, mut rx) = mpsc::unbounded_channel::<Packet>();
    let mut inb = BytesMut::with_capacity(8192);
    let mut will: Option<Publish> = None;
    let mut graceful = false;
    let mut chunk = vec![0u8; 65536];
    'conn: loop {
        tokio::select! {
            _ = stop.cancelled() => break 'conn,
            Some(p) = rx.recv() => {
                let mut out = BytesMut::new();
                if p.write(&mut out, MAX).is_err() || sock.write_all(&out).await.is_err() {
                    break 'conn;
                }
            }
            r = sock.read(&mut chunk) => {
                let n = match r { Ok(0) | Err(_) => break 'conn, Ok(n) => n };
                inb.extend_from_slice(&chunk[..n]);
                loop {
                    let p = match Packet::read(&mut inb, MAX) {
                        Ok(p) => p,
                        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                        Err(_) => break 'conn,
                    };
                    let reply = match p {
                        Packet::Connect(c) => {
                            will = c.last_will.map(|w| {
                                let mut p = Publish::new(w.topic, QoS::AtMostOnce, w.message.to_vec());
                                p.retain = w.retain;
                                p
                            });
                            Some(Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)))
                        }
                        Packet::Publish(p) => {
                            state.received.lock().unwrap().push((p.topic.clone(), p.payload.to_vec()));
                            if p.retain {
                                let mut r = state.retained.lock().unwrap();
                                if p.payload.is_empty() { r.remove(&p.topic); } else { r.insert(p.topic.clone(), p.clone()); }
                            }
                            route(&state, &p);
                            (p.qos == QoS::AtLeastOnce && !state.hold_acks.load(Ordering::SeqCst))
                                .then(|| Packet::PubAck(PubAck::new(p.pkid)))
                        }
                        Packet::Subscribe(s) => {
                            let codes = s.filters.iter().map(|_| SubscribeReasonCode::Success(QoS::AtMostOnce)).collect();
                            for f in &s.filters {
                                state.subs.lock().unwrap().push((id, f.path.clone(), tx.clone()));
                                for (t, p) in state.retained.lock().unwrap().iter() {
                                    if topic_matches(&f.path, t) {
                                        let mut r = Publish::new(t.clone(), QoS::AtMostOnce, p.payload.to_vec());
                                        r.retain = true;
                                        let _ = tx.send(Packet::Publish(r));
                                    }
                                }
                            }
                            Some(Packet::SubAck(SubAck::new(s.pkid, codes)))
                        }
                        Packet::PingReq => Some(Packet::PingResp),
                        Packet::Disconnect => { graceful = true; break 'conn; }
                        _ => None,
                    };
                    if let Some(r) = reply {
                        let mut out = BytesMut::new();
                        if r.write(&mut out, MAX).is_err() || sock.write_all(&out).await.is_err() {
                            break 'conn;
                        }
                    }
                }
            }
        }
    }
    state.subs.lock().unwrap().retain(|(c, _, _)| *c != id);
    if !graceful && !stop.is_cancelled() {
        if let Some(w) = will {
            if w.retain {
                state
                    .retained
                    .lock()
                    .unwrap()
                    .insert(w.topic.clone(), w.clone());
            }
            route(&state, &w);
        }
    }
}
