//! Typed errors of the streams: [`SetupError`] when a stream cannot be built from its
//! configuration (TLS files, keys, HTTP client), [`SessionError`] when a session (one
//! connection, or one run of HTTP deliveries) ends badly. A session error carries a hint for
//! the operator where the cause is usually the same (credentials, a plain port, the clock).

use super::tls::TlsError;
use crate::store::StoreError;
use std::time::Duration;

/// A stream that cannot be started: the daemon refuses to start with its name and this.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{what}: {reason}")]
    Key { what: &'static str, reason: String },
    #[error("headers: {0:?} is not a valid HTTP header")]
    Header(String),
    #[error("HTTP client: {0}")]
    HttpClient(String),
}

/// How a session ended badly.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{}", mqtt_text(.0))]
    Mqtt(#[from] rumqttc::ConnectionError),
    #[error("the server refused the connection ({})", refused_text(*.0))]
    Refused(rumqttc::ConnectReturnCode),
    #[error("no CONNACK within {} s", .0.as_secs_f32())]
    ConnectTimeout(Duration),
    #[error("the broker answered nothing for {0:?} (hung or unreachable)")]
    NoResponse(Duration),
    #[error("the MQTT client's request queue closed")]
    ClientClosed,
    /// An HTTP exchange that failed: status and server text, or the transport's error chain.
    #[error("{0}")]
    Http(String),
    /// The server refused a batch and `on_client_error = "retry"` keeps it.
    #[error("refused with {status}: {detail}")]
    HttpRefused { status: u16, detail: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the queue cannot be read: {0}")]
    Store(#[from] StoreError),
    /// A WebSocket connection that failed or ended (handshake, protocol, a dead peer).
    #[error("{0}")]
    WebSocket(String),
    #[error("TLS: {0}")]
    WebSocketTls(String),
    #[error("the server answered the WebSocket handshake with HTTP {status}")]
    WebSocketRefused { status: u16 },
    /// An SMTP connection that failed (TCP, a broken or silent server).
    #[error("{0}")]
    Smtp(String),
    #[error("TLS: {0}")]
    SmtpTls(String),
    #[error("the SMTP server does not offer STARTTLS, which smtp:// requires")]
    SmtpNoStarttls,
    /// The login was refused (535, or 530 "authentication required").
    #[error("the SMTP server refused the login ({code}): {text}")]
    SmtpAuth { code: u16, text: String },
    /// A negative answer outside an e-mail's transaction (the greeting, EHLO, STARTTLS, 421).
    #[error("the SMTP server answered {code}: {text}")]
    SmtpAnswer { code: u16, text: String },
    /// A 4xx for an e-mail: it is sent again after the backoff.
    #[error("the SMTP server deferred the e-mail ({code}): {text}")]
    SmtpDeferred { code: u16, text: String },
}

/// rumqttc's text, without the `Debug` of an I/O error it embeds (`Io error: Custom { kind:
/// ConnectionAborted, .. }` in 0.25): log lines show what the OS said.
fn mqtt_text(e: &rumqttc::ConnectionError) -> String {
    match e {
        rumqttc::ConnectionError::MqttState(rumqttc::StateError::Io(io)) => {
            format!("connection lost: {io}")
        }
        e => e.to_string(),
    }
}

/// The CONNACK return code in words (MQTT 3.1.1 §3.2.2.3).
fn refused_text(code: rumqttc::ConnectReturnCode) -> &'static str {
    use rumqttc::ConnectReturnCode as C;
    match code {
        C::Success => "accepted",
        C::RefusedProtocolVersion => "unacceptable protocol version",
        C::BadClientId => "client identifier rejected",
        C::ServiceUnavailable => "server unavailable",
        C::BadUserNamePassword => "bad user name or password",
        C::NotAuthorized => "not authorized",
    }
}

impl SessionError {
    /// From rumqttc: a refused CONNACK becomes [`SessionError::Refused`].
    pub fn from_mqtt(e: rumqttc::ConnectionError) -> SessionError {
        match e {
            rumqttc::ConnectionError::ConnectionRefused(code) => SessionError::Refused(code),
            e => SessionError::Mqtt(e),
        }
    }

    /// The size of an incoming MQTT packet above the client's limit, when that ended the
    /// connection (rumqttc reads packets whole and gives up on one above its limit).
    pub fn oversized_incoming(&self) -> Option<usize> {
        match self {
            SessionError::Mqtt(rumqttc::ConnectionError::MqttState(
                rumqttc::StateError::Deserialization(
                    rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(n),
                ),
            )) => Some(*n),
            _ => None,
        }
    }

    /// The server closed (or reset) the connection: what a broker does to the older of two
    /// clients with one client id.
    pub fn closed_by_peer(&self) -> bool {
        use std::io::ErrorKind as K;
        let io = match self {
            SessionError::Mqtt(rumqttc::ConnectionError::MqttState(
                rumqttc::StateError::ConnectionAborted,
            )) => return true,
            SessionError::Mqtt(rumqttc::ConnectionError::MqttState(rumqttc::StateError::Io(
                io,
            )))
            | SessionError::Mqtt(rumqttc::ConnectionError::Io(io)) => io,
            SessionError::Io(io) => io,
            _ => return false,
        };
        matches!(
            io.kind(),
            K::ConnectionAborted | K::ConnectionReset | K::UnexpectedEof | K::BrokenPipe
        )
    }

    /// What to check, where the cause is usually the same.
    pub fn hint(&self) -> Option<&'static str> {
        use rumqttc::ConnectReturnCode as C;
        match self {
            SessionError::Refused(C::BadUserNamePassword | C::NotAuthorized) => {
                Some("check username/password (or the client certificate) and the broker's ACL")
            }
            SessionError::Refused(C::BadClientId) => {
                Some("the broker refuses the client id; set client_id")
            }
            SessionError::Mqtt(rumqttc::ConnectionError::Tls(_)) => Some(
                "TLS failed: is this a TLS port, is the server's certificate trusted (ca_file), is the clock right?",
            ),
            SessionError::Mqtt(_) if self.oversized_incoming().is_some() => Some(
                "a message above the client's packet limit arrived on a downlink topic; the next connection starts a clean session so the broker cannot send it again (limit the broker's message size, e.g. mosquitto's message_size_limit)",
            ),
            SessionError::Mqtt(rumqttc::ConnectionError::MqttState(
                rumqttc::StateError::Deserialization(_),
            )) => Some("the server does not speak MQTT here: is this a TLS port (use mqtts://)?"),
            SessionError::HttpRefused { status: 401 | 403, .. } => {
                Some("the server refuses the credentials: check headers (API key, token)")
            }
            SessionError::SmtpAuth { .. } => Some(
                "check username and password (and that the account may submit mail over SMTP)",
            ),
            SessionError::SmtpNoStarttls => Some(
                "use smtps:// (implicit TLS, usually port 465), or tls = \"none\" for a relay on a trusted network only",
            ),
            SessionError::SmtpTls(_) => Some(
                "TLS failed: is the port right for smtp:// (STARTTLS, 587) or smtps:// (465), is the server's certificate trusted (ca_file), is the clock right?",
            ),
            SessionError::HttpRefused { .. } => Some(
                "fix the server or its credentials, or set on_client_error = \"drop\"",
            ),
            _ => None,
        }
    }
}
