//! Downlinks over the webhook stream, which needs no inbound port: downlink requests in
//! response bodies (of any POST) and in `poll_url` answers, routed to the scheduler one device
//! at a time; and this stream's downlink events POSTed back to `url`.

use super::exchange::{Outcome, Purpose, STOP_GRACE};
use super::{HttpStream, KIND_HEADER};
use crate::config::PollConfig;
use crate::downlink::json as downlink_json;
use crate::model::{redact_url, DownlinkEvent, DownlinkOp, DownlinkRequest, RequestError};
use crate::streams::connect::Retry;
use reqwest::header::CONTENT_TYPE;
use serde::Deserialize;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Downlink events held in memory while the server is unreachable.
pub const MAX_EVENTS: usize = 1000;

/// Why a response body with downlinks is refused as a whole.
#[derive(Debug, thiserror::Error)]
pub(super) enum BodyError {
    #[error("not JSON: {0}")]
    Json(serde_json::Error),
    #[error("expected a JSON object with a \"downlinks\" member")]
    Shape,
    #[error("\"downlinks\" must be an object keyed by device id, e.g. {{\"downlinks\": {{\"soil-1\": {{\"push\": [{{\"f_port\": 1, \"frm_payload\": \"AQ==\"}}]}}}}}}")]
    ByDevice,
}

impl HttpStream {
    // ---- downlink events ----

    pub(super) async fn events_loop(&self, rx: Option<mpsc::Receiver<DownlinkEvent>>) {
        let Some(mut rx) = rx else { return };
        let mut buf: VecDeque<Vec<u8>> = VecDeque::new();
        let mut retry = Retry::new(Duration::from_millis(500), Duration::from_secs(60));
        let mut retry_at: Option<Instant> = None;
        let mut open = true;
        loop {
            // With nothing held, or a retry pending, wait for an event, the retry time or the
            // stop. (Events that arrived while the last batch was in flight go out at once.)
            let stopping = if buf.is_empty() || retry_at.is_some() {
                tokio::select! {
                    _ = self.ctx.cancel.cancelled() => true,
                    e = rx.recv(), if open => {
                        match e {
                            Some(e) => self.hold_event(&mut buf, e),
                            None => open = false,
                        }
                        false
                    }
                    _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                        retry_at = None;
                        false
                    }
                }
            } else {
                self.ctx.cancel.is_cancelled()
            };
            while let Ok(e) = rx.try_recv() {
                self.hold_event(&mut buf, e);
            }
            if stopping {
                // One last try for what is held, within the stop grace.
                if !buf.is_empty() {
                    let n = buf.len().min(self.batch_max);
                    let batch: Vec<Vec<u8>> = buf.drain(..n).collect();
                    let req = self.events_request(&batch);
                    let out =
                        tokio::time::timeout(STOP_GRACE, self.exchange(Purpose::Events, req)).await;
                    if !matches!(out, Ok(Outcome::Delivered(_))) || !buf.is_empty() {
                        tracing::info!(stream = %self.ctx.name, events = n + buf.len(), "downlink events not delivered before stop");
                    }
                }
                return;
            }
            if buf.is_empty() || retry_at.is_some() {
                continue;
            }
            // The batch leaves `buf` while in flight, so that events arriving meanwhile (taken
            // at once, so the scheduler's channel never fills) cannot be confused with it.
            let n = buf.len().min(self.batch_max);
            let batch: Vec<Vec<u8>> = buf.drain(..n).collect();
            let fut = self.exchange_or_stop(Purpose::Events, self.events_request(&batch));
            tokio::pin!(fut);
            let outcome = loop {
                tokio::select! {
                    o = &mut fut => break o,
                    e = rx.recv(), if open => match e {
                        Some(e) => self.hold_event(&mut buf, e),
                        None => open = false,
                    },
                }
            };
            let Some(outcome) = outcome else { return };
            match outcome {
                Outcome::Delivered(body) => {
                    retry.reset();
                    self.ctx.metrics.stream_connected(&self.ctx.name, true);
                    self.route_downlinks(&body, Purpose::Events).await;
                }
                Outcome::TooLarge(detail) | Outcome::Refused { detail, .. } => {
                    // Events are not stored: a refusal drops them rather than blocking those
                    // that follow.
                    for _ in 0..n {
                        self.ctx
                            .metrics
                            .stream_error(&self.ctx.name, "events_refused");
                    }
                    tracing::warn!(stream = %self.ctx.name, events = n, server_said = %detail, "HTTP server refused downlink events; dropped");
                }
                Outcome::Retry { why, after } => {
                    for e in batch.into_iter().rev() {
                        buf.push_front(e);
                    }
                    while buf.len() > MAX_EVENTS {
                        buf.pop_front();
                        self.ctx.metrics.downlink_event("event_dropped");
                        self.ctx
                            .metrics
                            .stream_error(&self.ctx.name, "events_dropped");
                    }
                    let f = retry.failed(after);
                    retry_at = Some(Instant::now() + f.delay);
                    if f.log {
                        tracing::warn!(stream = %self.ctx.name, error = %why, events = buf.len(), retry_in_ms = f.delay.as_millis() as u64, failures = f.count, "HTTP POST of downlink events failed; held in memory");
                    }
                }
            }
        }
    }

    fn hold_event(&self, buf: &mut VecDeque<Vec<u8>>, e: DownlinkEvent) {
        tracing::debug!(stream = %self.ctx.name, device = %e.device, event = e.kind.as_str(), "downlink event");
        if buf.len() >= MAX_EVENTS {
            buf.pop_front();
            self.ctx.metrics.downlink_event("event_dropped");
            self.ctx
                .metrics
                .stream_error(&self.ctx.name, "events_dropped");
        }
        if let Some(body) = self.ctx.format.event_body(&e) {
            buf.push_back(body);
        }
    }

    fn events_request(&self, batch: &[Vec<u8>]) -> reqwest::RequestBuilder {
        self.client
            .post(self.url.clone())
            .header(CONTENT_TYPE, self.ctx.format.events_content_type())
            .header(KIND_HEADER, "downlink_events")
            .body(self.ctx.format.batch_events(batch.to_vec()))
    }

    // ---- poll_url ----

    pub(super) async fn poll_loop(&self) {
        let Some(PollConfig { url, interval }) = &self.poll else {
            return;
        };
        let mut retry = Retry::new(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            let req = self
                .client
                .get(url.clone())
                .header("accept", "application/json");
            let Some(outcome) = self.exchange_or_stop(Purpose::Poll, req).await else {
                return;
            };
            // Polls keep their period while failing (the period is the poll's own backoff);
            // only the log lines follow the failure rule.
            let mut wait = *interval;
            match outcome {
                Outcome::Delivered(body) => {
                    retry.reset();
                    self.route_downlinks(&body, Purpose::Poll).await;
                }
                Outcome::Retry { why, after } => {
                    let f = retry.failed(None);
                    wait = wait.max(after.unwrap_or_default());
                    if f.log {
                        tracing::warn!(stream = %self.ctx.name, poll_url = %redact_url(url), error = %why, failures = f.count, "downlink poll failed");
                    }
                }
                Outcome::TooLarge(detail) | Outcome::Refused { detail, .. } => {
                    let f = retry.failed(None);
                    if f.log {
                        tracing::warn!(stream = %self.ctx.name, poll_url = %redact_url(url), server_said = %detail, failures = f.count, "downlink poll refused");
                    }
                }
            }
            if !self.sleep(wait).await {
                return;
            }
        }
    }

    // ---- downlinks from response bodies ----

    /// Route the downlinks a 2xx body carries. POST answers often carry other things ("OK",
    /// `{"status":"ok"}`): only JSON with a `downlinks` member is taken. A `poll_url` answer
    /// must be JSON (or empty).
    pub(super) async fn route_downlinks(&self, body: &[u8], from: Purpose) {
        let text = body.trim_ascii();
        if text.is_empty() {
            return;
        }
        let strict = from == Purpose::Poll;
        let requests = match parse_downlinks(text, &self.ctx.name) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) if !strict && !text.starts_with(b"{") => {
                tracing::debug!(stream = %self.ctx.name, error = %e, "response body is not JSON; no downlinks in it");
                return;
            }
            Err(e) => {
                self.ctx
                    .metrics
                    .stream_error(&self.ctx.name, "bad_downlink_body");
                tracing::warn!(stream = %self.ctx.name, from = from.as_str(), error = %e, "HTTP body with downlinks refused; see docs/formats.md \"HTTP webhook\"");
                return;
            }
        };
        let Some(handle) = &self.ctx.downlinks else {
            self.ctx
                .metrics
                .stream_error(&self.ctx.name, "downlinks_disabled");
            tracing::warn!(stream = %self.ctx.name, devices = requests.len(), "HTTP body carries downlinks but this stream has downlinks = false; ignored");
            return;
        };
        for req in requests {
            if req.items.is_err() {
                self.ctx
                    .metrics
                    .stream_error(&self.ctx.name, "bad_downlink");
            }
            // Stored (or refused with a `failed` event) before the next request goes out.
            if handle.submit(req).await.is_err() {
                return;
            }
        }
    }
}

/// One device's entry: `{"push": [items], "replace": [items]}` (at least one of them).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceOps {
    #[serde(default)]
    replace: Option<Box<serde_json::value::RawValue>>,
    #[serde(default)]
    push: Option<Box<serde_json::value::RawValue>>,
}

/// Parse a body for downlinks: `Ok(None)` when it is JSON without a `downlinks` member (or
/// `null`), `Err` when it is not JSON or `downlinks` has the wrong shape. Per-device problems
/// (unknown keys, bad items) become requests whose items are the error, so the scheduler sends
/// the device's `downlink_failed` event with the reason, as for MQTT.
fn parse_downlinks(body: &[u8], stream: &str) -> Result<Option<Vec<DownlinkRequest>>, BodyError> {
    let doc: serde_json::Value = serde_json::from_slice(body).map_err(BodyError::Json)?;
    let downlinks = match &doc {
        serde_json::Value::Object(m) => match m.get("downlinks") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(d) => d,
        },
        _ => return Err(BodyError::Shape),
    };
    let serde_json::Value::Object(devices) = downlinks else {
        return Err(BodyError::ByDevice);
    };
    // Parse each device on its own: one bad entry does not spoil the others.
    let devices: BTreeMap<&String, &serde_json::Value> = devices.iter().collect();
    let mut out = Vec::new();
    for (device, v) in devices {
        let request = |op, items| DownlinkRequest {
            stream: stream.to_string(),
            // Device ids are unique: the scheduler takes the device's own application.
            application: String::new(),
            device: device.clone(),
            op,
            items,
            names: None,
        };
        let ops: DeviceOps = match serde_json::from_value::<DeviceOps>(v.clone()) {
            Ok(o) if o.push.is_some() || o.replace.is_some() => o,
            Ok(_) => {
                out.push(request(
                    DownlinkOp::Push,
                    Err(RequestError::Transport(format!(
                        "downlinks.{device}: expected \"push\" or \"replace\" with a list of downlinks"
                    ))),
                ));
                continue;
            }
            Err(e) => {
                out.push(request(
                    DownlinkOp::Push,
                    Err(RequestError::Transport(format!("downlinks.{device}: {e}"))),
                ));
                continue;
            }
        };
        // "replace" first, so that both together mean "this queue, then these".
        for (op, raw) in [
            (DownlinkOp::Replace, ops.replace),
            (DownlinkOp::Push, ops.push),
        ] {
            let Some(raw) = raw else { continue };
            let contract = format!("{{\"downlinks\":{}}}", raw.get());
            out.push(request(
                op,
                downlink_json::parse_request(contract.as_bytes(), stream),
            ));
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downlink_bodies() {
        let ok = parse_downlinks(
            br#"{"status":"ok","downlinks":{"b":{"push":[{"f_port":2,"frm_payload":"AQI="}]},"a":{"replace":[{"f_port":1,"frm_payload":""}],"push":[{"f_port":3,"frm_payload":""}]}}}"#,
            "hook",
        )
        .unwrap()
        .unwrap();
        let summary: Vec<(&str, DownlinkOp, usize)> = ok
            .iter()
            .map(|r| (r.device.as_str(), r.op, r.items.as_ref().unwrap().len()))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("a", DownlinkOp::Replace, 1),
                ("a", DownlinkOp::Push, 1),
                ("b", DownlinkOp::Push, 1)
            ]
        );
        assert_eq!(ok[2].items.as_ref().unwrap()[0].payload, vec![1, 2]);
        assert_eq!(ok[2].items.as_ref().unwrap()[0].stream, "hook");
        assert!(ok.iter().all(|r| r.application.is_empty()));

        // No downlinks: nothing to do, not an error.
        assert!(parse_downlinks(b"{}", "s").unwrap().is_none());
        assert!(parse_downlinks(br#"{"downlinks":null}"#, "s")
            .unwrap()
            .is_none());
        // Wrong shapes are errors of the whole body.
        assert!(parse_downlinks(b"OK", "s")
            .unwrap_err()
            .to_string()
            .contains("not JSON"));
        assert!(parse_downlinks(b"[1]", "s").is_err());
        assert!(parse_downlinks(br#"{"downlinks":[{"f_port":1}]}"#, "s")
            .unwrap_err()
            .to_string()
            .contains("keyed by device id"));
        // Per-device problems travel to the scheduler as failed requests (→ downlink_failed).
        let bad = parse_downlinks(
            br#"{"downlinks":{"x":{"pus":[]},"y":{},"z":{"push":[{"f_port":0}]},"w":{"push":[{"f_port":1,"frm_payload":"%%"}]}}}"#,
            "s",
        )
        .unwrap()
        .unwrap();
        let errs: Vec<String> = bad
            .iter()
            .map(|r| r.items.clone().unwrap_err().to_string())
            .collect();
        assert!(errs[0].contains("not base64"), "{errs:?}"); // w
        assert!(errs[1].contains("unknown field `pus`"), "{errs:?}"); // x
        assert!(errs[2].contains("\"push\" or \"replace\""), "{errs:?}"); // y
        assert!(errs[3].contains("f_port 0"), "{errs:?}"); // z
    }
}
