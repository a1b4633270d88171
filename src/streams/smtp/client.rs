//! One SMTP exchange with lettre's client: TCP, TLS (implicit for `smtps://`, or STARTTLS,
//! required for `smtp://` unless `tls = "none"`, RFC 3207), EHLO, AUTH (PLAIN or LOGIN, only
//! over TLS), one e-mail, QUIT. One connection per e-mail: a stream sends at most
//! `max_per_hour` of them, and a connection kept open would only be closed by the server's
//! idle timeout.
//!
//! What can go wrong is sorted by what the stream does next ([`Failure`]): the server cannot
//! be reached, secured or logged in to (the e-mail is kept and sent again after the backoff),
//! the server answers 4xx for the e-mail (kept, sent again), or 5xx (never accepted: a dead
//! letter). Every step has the stream's `timeout_s`.
//!
//! Secrets: the password goes only into the AUTH exchange; lettre's own logging (its `tracing`
//! feature, which would show the AUTH line) is not enabled, and no error text carries it.

use super::super::error::{SessionError, SetupError};
use super::super::tls;
use crate::config::{SmtpConfig, SmtpTls};
use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, Certificate, CertificateStore, TlsParameters,
};
use lettre::transport::smtp::extension::ClientId;
use std::future::Future;
use std::time::Duration;

/// Why an e-mail was not accepted.
#[derive(Debug)]
pub enum Failure {
    /// The server could not be reached, secured or logged in to (or it broke off): the
    /// records stay queued; the next session tries again after the backoff.
    Connection(SessionError),
    /// A 4xx for the e-mail (RFC 5321 §4.2.1, "transient negative"): sent again later.
    Deferred { code: u16, text: String },
    /// A 5xx for the e-mail ("permanent negative"): this e-mail will never be accepted.
    Refused { code: u16, text: String },
}

pub(crate) struct Client {
    host: String,
    port: u16,
    tls: SmtpTls,
    /// TLS parameters for `smtps://` and STARTTLS (None with `tls = "none"`).
    params: Option<TlsParameters>,
    hello: ClientId,
    credentials: Option<Credentials>,
    timeout: Duration,
}

/// The name this gateway gives in EHLO (RFC 5321 §4.1.4): its host name when it is one,
/// else an address literal.
fn hello_name() -> ClientId {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    if !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        ClientId::Domain(host.to_string())
    } else {
        ClientId::default()
    }
}

impl Client {
    pub fn new(cfg: &SmtpConfig) -> Result<Client, SetupError> {
        let params = match cfg.tls {
            SmtpTls::None => None,
            SmtpTls::Starttls | SmtpTls::Implicit => {
                // The same trust as every other stream (system roots plus ca_file), checked now
                // so that a missing bundle or a bad ca_file stops the start with a clear error.
                tls::client_config(cfg.ca_file.as_deref(), None, true, &[])?;
                let mut b = TlsParameters::builder(cfg.host.clone())
                    .certificate_store(CertificateStore::Default);
                if let Some(p) = &cfg.ca_file {
                    let pem = std::fs::read(p).map_err(|e| {
                        SetupError::Tls(tls::TlsError::Read {
                            path: p.clone(),
                            reason: e.to_string(),
                        })
                    })?;
                    let cert = Certificate::from_pem(&pem).map_err(|e| SetupError::Key {
                        what: "ca_file",
                        reason: format!("{}: {e}", p.display()),
                    })?;
                    b = b.add_root_certificate(cert);
                }
                Some(b.build_rustls().map_err(|e| SetupError::Key {
                    what: "tls",
                    reason: e.to_string(),
                })?)
            }
        };
        Ok(Client {
            host: cfg.host.clone(),
            port: cfg.port,
            tls: cfg.tls,
            params,
            hello: hello_name(),
            credentials: cfg
                .credentials
                .as_ref()
                .map(|(u, p)| Credentials::new(u.clone(), p.expose().to_string())),
            timeout: cfg.timeout,
        })
    }

    /// `f` within the stream's timeout.
    async fn step<T>(
        &self,
        what: &str,
        f: impl Future<Output = Result<T, lettre::transport::smtp::Error>>,
    ) -> Result<T, Failure> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(classify(what, &e)),
            Err(_) => Err(Failure::Connection(SessionError::Smtp(format!(
                "{what}: no answer within {:?}",
                self.timeout
            )))),
        }
    }

    /// Connected, secured and logged in.
    async fn open(&self) -> Result<AsyncSmtpConnection, SessionError> {
        let implicit = match self.tls {
            SmtpTls::Implicit => self.params.clone(),
            _ => None,
        };
        let connect = AsyncSmtpConnection::connect_tokio1(
            (self.host.as_str(), self.port),
            Some(self.timeout),
            &self.hello,
            implicit,
            None,
        );
        let during = |f: Failure| match f {
            Failure::Connection(e) => e,
            Failure::Deferred { code, text } | Failure::Refused { code, text } => {
                SessionError::SmtpAnswer { code, text }
            }
        };
        let mut c = self.step("connect", connect).await.map_err(during)?;
        if self.tls == SmtpTls::Starttls {
            if !c.can_starttls() {
                c.abort().await;
                return Err(SessionError::SmtpNoStarttls);
            }
            if let Some(p) = &self.params {
                self.step("STARTTLS", c.starttls(p.clone(), &self.hello))
                    .await
                    .map_err(during)?;
            }
        }
        if let Some(cred) = &self.credentials {
            match self
                .step("AUTH", c.auth(&[Mechanism::Plain, Mechanism::Login], cred))
                .await
            {
                Ok(_) => {}
                Err(Failure::Deferred { code, text } | Failure::Refused { code, text }) => {
                    c.abort().await;
                    return Err(SessionError::SmtpAuth { code, text });
                }
                Err(Failure::Connection(e)) => return Err(e),
            }
        }
        Ok(c)
    }

    /// Connect, log in and quit: shows the server is there and takes the credentials.
    pub async fn probe(&self) -> Result<(), SessionError> {
        let mut c = self.open().await?;
        let _ = tokio::time::timeout(self.timeout, c.quit()).await;
        Ok(())
    }

    /// Send one e-mail (its envelope and RFC 5322 bytes).
    pub async fn send(&self, envelope: &Envelope, mail: &[u8]) -> Result<(), Failure> {
        let mut c = self.open().await.map_err(Failure::Connection)?;
        let r = self
            .step("sending the e-mail", c.send(envelope, mail))
            .await;
        match &r {
            Ok(_) => {
                let _ = tokio::time::timeout(self.timeout, c.quit()).await;
            }
            Err(_) => c.abort().await,
        }
        r.map(|_| ())
    }
}

/// A lettre error as what the stream does next.
fn classify(what: &str, e: &lettre::transport::smtp::Error) -> Failure {
    // The server's text for an answer; otherwise the root cause (lettre nests "Connection
    // error: Connection error: <cause>").
    let mut root: &dyn std::error::Error = e;
    let mut tls = e.is_tls();
    while let Some(s) = root.source() {
        root = s;
        tls |= root.downcast_ref::<rustls::Error>().is_some()
            || root
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
    }
    let text = root.to_string();
    match e.status().map(u16::from) {
        // 421: the server is closing the channel (RFC 5321 §3.8): not about this e-mail.
        Some(421) => Failure::Connection(SessionError::SmtpAnswer { code: 421, text }),
        // 530: authentication required (RFC 4954 §6): configuration, not this e-mail.
        Some(530) => Failure::Connection(SessionError::SmtpAuth { code: 530, text }),
        Some(code) if e.is_transient() => Failure::Deferred { code, text },
        Some(code) if e.is_permanent() => Failure::Refused { code, text },
        _ if tls || text.contains("certificate") => {
            Failure::Connection(SessionError::SmtpTls(format!("{what}: {text}")))
        }
        _ => Failure::Connection(SessionError::Smtp(format!("{what}: {text}"))),
    }
}
