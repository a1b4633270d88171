//! A stand-in for IoT Hub's streaming endpoint (device streams): a `wss://` server (TLS with a
//! certificate from `pki.rs`) with one "bridge" per stream request. A bridge is a path
//! `/bridges/{n}` and a bearer token; the device's WebSocket must come to that path with
//! `Authorization: Bearer {token}`, anything else is refused with HTTP 401/404 and logged. An
//! accepted device WebSocket is handed to the test, which plays the service side of the
//! stream (the real endpoint joins it with the service's WebSocket; here the test holds the
//! other end itself).
#![allow(dead_code)]

use async_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// The device's WebSocket, as the service side sees it.
pub type DeviceWs = async_tungstenite::WebSocketStream<
    async_tungstenite::tokio::TokioAdapter<TlsStream<TcpStream>>,
>;

#[derive(Debug, Default, Clone)]
pub struct EndpointLog {
    /// Accepted device WebSockets, by bridge.
    pub accepted: Vec<String>,
    /// Refused handshakes: (path, HTTP status).
    pub refused: Vec<(String, u16)>,
    /// Connections whose TLS handshake failed.
    pub tls_failures: usize,
}

struct Bridge {
    token: String,
    tx: mpsc::UnboundedSender<DeviceWs>,
}

struct State {
    bridges: Mutex<HashMap<String, Bridge>>,
    log: Mutex<EndpointLog>,
    next: AtomicU64,
}

pub struct StreamingEndpoint {
    port: u16,
    state: Arc<State>,
    stop: CancellationToken,
}

/// One stream request's bridge: what IoT Hub puts in the request (`$url`, `$auth`), and the
/// device's WebSocket once it came.
pub struct BridgeHandle {
    pub url: String,
    pub token: String,
    pub id: String,
    rx: mpsc::UnboundedReceiver<DeviceWs>,
}

impl BridgeHandle {
    /// The device's WebSocket, or None if it did not come within `timeout`.
    pub async fn device(&mut self, timeout: Duration) -> Option<DeviceWs> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }
}

impl StreamingEndpoint {
    pub async fn start(server: &super::pki::Issued) -> StreamingEndpoint {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&server.cert)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&server.key).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let state = Arc::new(State {
            bridges: Mutex::default(),
            log: Mutex::default(),
            next: AtomicU64::new(1),
        });
        let stop = CancellationToken::new();
        let (st, sp) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let sock = tokio::select! {
                    _ = sp.cancelled() => return,
                    r = l.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                };
                let (st, acceptor) = (st.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let tls =
                        match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(sock))
                            .await
                        {
                            Ok(Ok(t)) => t,
                            _ => {
                                st.log.lock().unwrap().tls_failures += 1;
                                return;
                            }
                        };
                    let chosen: Arc<Mutex<Option<String>>> = Arc::default();
                    let (st2, ch2) = (st.clone(), chosen.clone());
                    #[allow(clippy::result_large_err)]
                    let check =
                        move |req: &Request, resp: Response| handshake(&st2, &ch2, req, resp);
                    let Ok(ws) = async_tungstenite::tokio::accept_hdr_async(tls, check).await
                    else {
                        return;
                    };
                    let Some(id) = chosen.lock().unwrap().take() else {
                        return;
                    };
                    st.log.lock().unwrap().accepted.push(id.clone());
                    let tx = st.bridges.lock().unwrap().get(&id).map(|b| b.tx.clone());
                    if let Some(tx) = tx {
                        let _ = tx.send(ws);
                    }
                });
            }
        });
        StreamingEndpoint { port, state, stop }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A new bridge (as IoT Hub makes one per stream request) at `wss://localhost:{port}`.
    pub fn bridge(&self) -> BridgeHandle {
        let n = self.state.next.fetch_add(1, Ordering::SeqCst);
        let id = format!("b{n}");
        let token = format!("eyJ0eXAiOiJKV1Qi.tok{n}-{}", n * 7919);
        let (tx, rx) = mpsc::unbounded_channel();
        self.state.bridges.lock().unwrap().insert(
            id.clone(),
            Bridge {
                token: token.clone(),
                tx,
            },
        );
        BridgeHandle {
            url: format!("wss://localhost:{}/bridges/{id}", self.port),
            token,
            id,
            rx,
        }
    }

    pub fn log(&self) -> EndpointLog {
        self.state.log.lock().unwrap().clone()
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for StreamingEndpoint {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[allow(clippy::result_large_err)]
fn handshake(
    state: &State,
    chosen: &Mutex<Option<String>>,
    req: &Request,
    resp: Response,
) -> Result<Response, ErrorResponse> {
    let path = req.uri().path().to_string();
    let refuse = |code: u16| {
        state.log.lock().unwrap().refused.push((path.clone(), code));
        let mut r = ErrorResponse::new(None);
        *r.status_mut() = async_tungstenite::tungstenite::http::StatusCode::from_u16(code).unwrap();
        r
    };
    let Some(id) = path.strip_prefix("/bridges/") else {
        return Err(refuse(404));
    };
    let want = match state.bridges.lock().unwrap().get(id) {
        Some(b) => format!("Bearer {}", b.token),
        None => return Err(refuse(404)),
    };
    let got = req
        .headers()
        .get("Authorization")
        .and_then(|v| v.to_str().ok());
    if got != Some(want.as_str()) {
        return Err(refuse(401));
    }
    *chosen.lock().unwrap() = Some(id.to_string());
    Ok(resp)
}
