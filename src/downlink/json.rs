//! Downlink JSON: requests in (contract layout), events out (TTS layout where it has one).
//!
//! In: `{"downlinks":[{"f_port":1,"frm_payload":"<base64>","confirmed":false,"priority":"NORMAL"}]}`.
//! Out: `{"end_device_ids":{…},"correlation_ids":[…],"received_at":…,"downlink_queued":{…}}` and
//! likewise `downlink_sent`, `downlink_ack`, `downlink_nack`, `downlink_failed` (with `error`).

pub use crate::model::RequestError;
use crate::model::{
    correlation_id, new_id, now_us, DownlinkEvent, DownlinkEventKind, DownlinkItem, MAX_PAYLOAD,
};
use base64::Engine;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Req {
    downlinks: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    f_port: Option<u32>,
    #[serde(default)]
    frm_payload: Option<String>,
    #[serde(default)]
    confirmed: bool,
    #[serde(default)]
    priority: Option<String>,
    #[serde(default)]
    correlation_ids: Vec<String>,
}

const PRIORITIES: [&str; 7] = [
    "LOWEST",
    "LOW",
    "BELOW_NORMAL",
    "NORMAL",
    "ABOVE_NORMAL",
    "HIGH",
    "HIGHEST",
];

/// Parse a downlink request body (the contract layout).
pub fn parse_request(body: &[u8], stream: &str) -> Result<Vec<DownlinkItem>, RequestError> {
    let req: Req = serde_json::from_slice(body).map_err(|e| RequestError::Json(e.to_string()))?;
    if req.downlinks.is_empty() {
        return Err(RequestError::Empty);
    }
    req.downlinks
        .into_iter()
        .enumerate()
        .map(|(index, it)| {
            let f_port = match it.f_port {
                Some(p @ 1..=223) => p as u8,
                Some(port) => return Err(RequestError::Port { index, port }),
                None => return Err(RequestError::NoPort { index }),
            };
            let payload = match &it.frm_payload {
                Some(s) => base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|e| RequestError::Base64 {
                        index,
                        reason: e.to_string(),
                    })?,
                None => Vec::new(),
            };
            if payload.len() > MAX_PAYLOAD {
                return Err(RequestError::TooLong {
                    index,
                    len: payload.len(),
                });
            }
            let priority = it
                .priority
                .unwrap_or_else(|| "NORMAL".into())
                .to_uppercase();
            if !PRIORITIES.contains(&priority.as_str()) {
                return Err(RequestError::Priority {
                    index,
                    value: priority,
                });
            }
            Ok(DownlinkItem {
                id: new_id(),
                f_port,
                payload,
                confirmed: it.confirmed,
                priority,
                correlation_ids: it.correlation_ids,
                stream: stream.to_string(),
            })
        })
        .collect()
}

fn rfc3339_now() -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(now_us().max(0) as u64);
    humantime::format_rfc3339_micros(t).to_string()
}

/// The JSON of a downlink event.
pub fn event_json(e: &DownlinkEvent) -> Vec<u8> {
    let mut cids: Vec<String> = Vec::new();
    let mut body = serde_json::Map::new();
    if let Some(it) = &e.item {
        cids.push(correlation_id("downlink", it.id));
        cids.extend(it.correlation_ids.iter().cloned());
        body.insert("f_port".into(), it.f_port.into());
        if !it.payload.is_empty() {
            body.insert(
                "frm_payload".into(),
                base64::engine::general_purpose::STANDARD
                    .encode(&it.payload)
                    .into(),
            );
        }
        body.insert("confirmed".into(), it.confirmed.into());
        body.insert("priority".into(), it.priority.clone().into());
        body.insert("correlation_ids".into(), cids.clone().into());
    }
    if let serde_json::Value::Object(extra) = &e.detail {
        for (k, v) in extra {
            body.insert(k.clone(), v.clone());
        }
    }
    let key = format!("downlink_{}", e.kind.as_str());
    let inner = if e.kind == DownlinkEventKind::Failed {
        let msg = body.remove("error").unwrap_or_else(|| "failed".into());
        serde_json::json!({ "downlink": body, "error": { "message": msg } })
    } else {
        serde_json::Value::Object(body)
    };
    let doc = serde_json::json!({
        "end_device_ids": {
            "device_id": e.device,
            "application_ids": { "application_id": e.application },
            "dev_eui": e.dev_eui.to_string(),
        },
        "correlation_ids": cids,
        "received_at": rfc3339_now(),
        key: inner,
    });
    serde_json::to_vec(&doc).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Eui64;

    #[test]
    fn parses_the_contract_layout() {
        let v = parse_request(
            br#"{"downlinks":[{"f_port":1,"frm_payload":"AQID","confirmed":true,"priority":"high"},{"f_port":2}]}"#,
            "cloud",
        )
        .unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].payload, vec![1, 2, 3]);
        assert!(v[0].confirmed);
        assert_eq!(v[0].priority, "HIGH");
        assert_eq!(v[1].priority, "NORMAL");
        assert!(v[1].payload.is_empty());
        assert_eq!(v[0].stream, "cloud");
    }

    #[test]
    fn refuses_with_reasons() {
        let e = |b: &[u8]| parse_request(b, "s").unwrap_err().to_string();
        assert!(e(b"{nope").contains("invalid downlink JSON"));
        assert!(e(br#"{"downlinks":[]}"#).contains("empty"));
        assert!(e(br#"{"downlinks":[{"f_port":0}]}"#).contains("f_port 0"));
        assert!(e(br#"{"downlinks":[{"f_port":224}]}"#).contains("f_port 224"));
        assert!(e(br#"{"downlinks":[{"frm_payload":"AA=="}]}"#).contains("f_port is missing"));
        assert!(e(br#"{"downlinks":[{"f_port":1,"frm_payload":"%%%"}]}"#).contains("not base64"));
        let big = base64::engine::general_purpose::STANDARD.encode([0u8; 243]);
        assert!(
            e(format!(r#"{{"downlinks":[{{"f_port":1,"frm_payload":"{big}"}}]}}"#).as_bytes())
                .contains("243 bytes")
        );
        assert!(e(br#"{"downlinks":[{"f_port":1,"priority":"URGENT"}]}"#).contains("priority"));
    }

    #[test]
    fn events_in_tts_layout() {
        let item = parse_request(br#"{"downlinks":[{"f_port":3,"frm_payload":"AQ=="}]}"#, "s")
            .unwrap()
            .remove(0);
        let ev = DownlinkEvent {
            stream: "s".into(),
            application: "farm".into(),
            device: "d1".into(),
            dev_eui: Eui64::from_u64(1),
            kind: DownlinkEventKind::Failed,
            item: Some(item),
            detail: serde_json::json!({"error": "payload too large for SF12"}),
        };
        let v: serde_json::Value = serde_json::from_slice(&event_json(&ev)).unwrap();
        assert_eq!(v["end_device_ids"]["device_id"], "d1");
        assert_eq!(v["downlink_failed"]["downlink"]["f_port"], 3);
        assert_eq!(
            v["downlink_failed"]["error"]["message"],
            "payload too large for SF12"
        );
        assert!(v["correlation_ids"][0]
            .as_str()
            .unwrap()
            .starts_with("lorastream:downlink:"));
    }
}
