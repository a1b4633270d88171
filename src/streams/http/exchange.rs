//! HTTP plumbing of the webhook stream: one request, its answer classified ([`Outcome`]),
//! counted (`lorastream_http_requests_total`) and made safe to log (header values blanked,
//! URLs without their query).

use super::HttpStream;
use crate::model::redact_url_str;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use std::time::{Duration, SystemTime};

/// A `Retry-After` longer than this is shortened to it: an hour-long "come back later" should
/// not leave a gateway's queue unattended that long.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(300);
/// A request in flight when the daemon stops gets this long to finish (the daemon's whole stop
/// is bounded by `daemon::STOP_DEADLINE`).
pub const STOP_GRACE: Duration = Duration::from_secs(2);
/// Response bodies are read up to this size; a larger one is a bad body.
const MAX_BODY: usize = 1 << 20;

/// What a request is for (the `purpose` label of `lorastream_http_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
    Uplinks,
    Events,
    Poll,
    Probe,
}

impl Purpose {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Purpose::Uplinks => "uplinks",
            Purpose::Events => "events",
            Purpose::Poll => "poll",
            Purpose::Probe => "probe",
        }
    }
}

/// How an exchange ended.
#[derive(Debug)]
pub(super) enum Outcome {
    /// 2xx, with the body (possibly carrying downlinks).
    Delivered(Vec<u8>),
    /// 413: the batch is too large for the server.
    TooLarge(String),
    /// A 4xx other than 408, 413 and 429: the server refuses this content.
    Refused { status: u16, detail: String },
    /// Worth retrying: 5xx, 408, 429, 3xx, no answer, timeout.
    Retry {
        why: String,
        after: Option<Duration>,
    },
}

impl HttpStream {
    /// [`Self::exchange`], giving up (None) when the stream is stopped and the request is not
    /// done within [`STOP_GRACE`].
    pub(super) async fn exchange_or_stop(
        &self,
        purpose: Purpose,
        req: reqwest::RequestBuilder,
    ) -> Option<Outcome> {
        let fut = self.exchange(purpose, req);
        tokio::pin!(fut);
        tokio::select! {
            o = &mut fut => Some(o),
            _ = self.ctx.cancel.cancelled() => tokio::time::timeout(STOP_GRACE, fut).await.ok(),
        }
    }

    /// Send a request, read the answer, classify it, count it.
    pub(super) async fn exchange(&self, purpose: Purpose, req: reqwest::RequestBuilder) -> Outcome {
        let metrics = &self.ctx.metrics;
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let class = if e.is_timeout() { "timeout" } else { "error" };
                metrics.http_request(&self.ctx.name, purpose.as_str(), class);
                return Outcome::Retry {
                    why: error_chain(&e.without_url()),
                    after: None,
                };
            }
        };
        let status = resp.status();
        let class = match status.as_u16() {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "other",
        };
        metrics.http_request(&self.ctx.name, purpose.as_str(), class);
        let after = retry_after(resp.headers(), SystemTime::now());
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(redact_url_str);
        let (body, complete) =
            read_body(resp, if status.is_success() { MAX_BODY } else { 2048 }).await;
        if status.is_success() {
            if !complete {
                // Delivered all the same: the server said 2xx.
                self.ctx
                    .metrics
                    .stream_error(&self.ctx.name, "bad_downlink_body");
                tracing::warn!(stream = %self.ctx.name, max_bytes = MAX_BODY, "response body too large or cut short; downlinks in it ignored");
                return Outcome::Delivered(Vec::new());
            }
            return Outcome::Delivered(body);
        }
        let detail = format!("{status}: {}", self.snippet(&body));
        match status.as_u16() {
            413 => Outcome::TooLarge(detail),
            408 | 429 => Outcome::Retry { why: detail, after },
            400..=499 => Outcome::Refused {
                status: status.as_u16(),
                detail,
            },
            300..=399 => Outcome::Retry {
                why: format!(
                    "{status}: redirected to {}; set url to the final address",
                    location.as_deref().unwrap_or("?")
                ),
                after,
            },
            _ => Outcome::Retry { why: detail, after },
        }
    }

    /// Up to 200 characters of a server's text for a log line, with header values blanked.
    pub(super) fn snippet(&self, body: &[u8]) -> String {
        let mut s: String = String::from_utf8_lossy(body)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(200)
            .collect();
        for secret in &self.secrets {
            s = s.replace(secret.expose(), "***");
        }
        s.trim().to_string()
    }

    /// Sleep unless stopped first. False when stopped.
    pub(super) async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.ctx.cancel.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

/// Read a body up to `max` bytes; false when it was longer or broke off.
async fn read_body(mut resp: reqwest::Response, max: usize) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if body.len() + c.len() > max {
                    let take = max.saturating_sub(body.len());
                    body.extend_from_slice(&c[..take]);
                    return (body, false);
                }
                body.extend_from_slice(&c);
            }
            Ok(None) => return (body, true),
            Err(_) => return (body, false),
        }
    }
}

/// `Retry-After` as a delay from `now`: delay-seconds or an HTTP-date (RFC 9110 §10.2.3),
/// capped at [`RETRY_AFTER_CAP`]. A date in the past means "now".
fn retry_after(h: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let v = h.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let d = match v.parse::<u64>() {
        Ok(s) => Duration::from_secs(s),
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(now)
            .unwrap_or_default(),
    };
    Some(d.min(RETRY_AFTER_CAP))
}

/// An error with its causes ("error sending request: client error (Connect): tcp connect
/// error: Connection refused (os error 111)").
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_seconds_and_http_date_capped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
            retry_after(&m, now)
        };
        assert_eq!(h("3"), Some(Duration::from_secs(3)));
        assert_eq!(h(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(h("86400"), Some(RETRY_AFTER_CAP));
        assert_eq!(
            h("Sun, 06 Nov 1994 08:49:47 GMT"),
            Some(Duration::from_secs(10))
        );
        assert_eq!(h("Sun, 06 Nov 1994 08:49:00 GMT"), Some(Duration::ZERO));
        assert_eq!(h("soon"), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }
}
