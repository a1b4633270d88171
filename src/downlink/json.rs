//! Downlink JSON: requests in (contract layout), events out (TTS layout where it has one).
//!
//! In: `{"downlinks":[{"f_port":1,"frm_payload":"<base64>","confirmed":false,"priority":"NORMAL"}]}`,
//! optionally with TTS's `"end_device_ids"` naming the device (checked by the scheduler against
//! the device the topic names). An item needs `frm_payload` (`""` for an empty frame) or, for a
//! device with a payload codec, `decoded_payload` (an object its `encodeDownlink` turns into
//! bytes; `frm_payload` wins when both are given).
//! Out: `{"end_device_ids":{…},"correlation_ids":[…],"received_at":…,"downlink_queued":{…}}` and
//! likewise `downlink_sent`, `downlink_ack`, `downlink_nack`, `downlink_failed` (with `error`).

pub use crate::model::RequestError;
use crate::model::{
    correlation_id, new_id, now_us, DownlinkEvent, DownlinkEventKind, DownlinkItem, EndDeviceIds,
    MAX_PAYLOAD,
};
use base64::Engine;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Req {
    downlinks: Vec<Item>,
    /// TTS addresses a request to a device in the body too; it must be the topic's device.
    #[serde(default)]
    end_device_ids: Option<Ids>,
}

#[derive(Deserialize)]
struct Ids {
    #[serde(default)]
    device_id: Option<String>,
    #[serde(default)]
    application_ids: Option<AppIds>,
    #[serde(default)]
    dev_eui: Option<String>,
}

#[derive(Deserialize)]
struct AppIds {
    #[serde(default)]
    application_id: Option<String>,
}

#[derive(Deserialize)]
struct Item {
    f_port: Option<u32>,
    #[serde(default)]
    frm_payload: Option<String>,
    /// TTS: an object the device's codec encodes (`encodeDownlink`).
    #[serde(default)]
    decoded_payload: Option<serde_json::Value>,
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

/// A parsed request body: its downlinks and the device it names, if it names one.
#[derive(Debug)]
pub struct Body {
    pub items: Vec<DownlinkItem>,
    pub names: Option<EndDeviceIds>,
}

/// Parse a downlink request body (the contract layout; TTS's `end_device_ids` allowed).
pub fn parse_body(body: &[u8], stream: &str) -> Result<Body, RequestError> {
    let req: Req = serde_json::from_slice(body).map_err(|e| RequestError::Json(e.to_string()))?;
    let names = req.end_device_ids.map(names).transpose()?;
    if req.downlinks.is_empty() {
        return Err(RequestError::Empty);
    }
    let items = req
        .downlinks
        .into_iter()
        .enumerate()
        .map(|(index, it)| item(index, it, stream))
        .collect::<Result<_, _>>()?;
    Ok(Body { items, names })
}

/// Parse a downlink request body whose device the transport gives (the names, if any, are
/// dropped: use [`parse_body`] where the body may name another device).
pub fn parse_request(body: &[u8], stream: &str) -> Result<Vec<DownlinkItem>, RequestError> {
    parse_body(body, stream).map(|b| b.items)
}

fn names(ids: Ids) -> Result<EndDeviceIds, RequestError> {
    let dev_eui = match ids.dev_eui {
        Some(s) => Some(s.parse().map_err(|_| RequestError::DevEui(s))?),
        None => None,
    };
    Ok(EndDeviceIds {
        device_id: ids.device_id,
        application_id: ids.application_ids.and_then(|a| a.application_id),
        dev_eui,
    })
}

fn item(index: usize, it: Item, stream: &str) -> Result<DownlinkItem, RequestError> {
    let f_port = match it.f_port {
        Some(p @ 1..=223) => p as u8,
        Some(port) => return Err(RequestError::Port { index, port }),
        None => return Err(RequestError::NoPort { index }),
    };
    let (payload, decoded_payload) = match (it.frm_payload, it.decoded_payload) {
        (Some(s), _) => (
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| RequestError::Base64 {
                    index,
                    reason: e.to_string(),
                })?,
            None,
        ),
        // Encoded by the device's codec on the way to the scheduler (`crate::codec`).
        (None, Some(serde_json::Value::Object(o))) => (Vec::new(), Some(o)),
        (None, Some(_)) => return Err(RequestError::NotObject { index }),
        (None, None) => return Err(RequestError::NoPayload { index }),
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
        decoded_payload,
    })
}

fn rfc3339_now() -> String {
    crate::streams::format::tts::rfc3339(now_us())
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
            br#"{"downlinks":[{"f_port":1,"frm_payload":"AQID","confirmed":true,"priority":"high"},{"f_port":2,"frm_payload":""}]}"#,
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
        assert!(
            e(br#"{"downlinks":[{"f_port":1,"frm_payload":"","priority":"URGENT"}]}"#)
                .contains("priority")
        );
        assert!(e(br#"{"downlinks":[{"f_port":1}]}"#).contains("neither frm_payload"));
        assert!(e(br#"{"downlinks":[{"f_port":1,"decoded_payload":[1]}]}"#)
            .contains("decoded_payload is not a JSON object"));
        assert!(e(
            br#"{"end_device_ids":{"dev_eui":"xyz"},"downlinks":[{"f_port":1,"frm_payload":""}]}"#
        )
        .contains("16 hex digits"));
    }

    #[test]
    fn decoded_payloads_wait_for_the_codec() {
        let v = parse_request(
            br#"{"downlinks":[{"f_port":2,"decoded_payload":{"value_1":1.5}},{"f_port":3,"frm_payload":"AQ==","decoded_payload":{"x":1}}]}"#,
            "s",
        )
        .unwrap();
        assert!(v[0].payload.is_empty());
        assert_eq!(
            v[0].decoded_payload.as_ref().unwrap()["value_1"],
            serde_json::json!(1.5)
        );
        // frm_payload wins over decoded_payload.
        assert_eq!(
            (v[1].payload.as_slice(), &v[1].decoded_payload),
            (&[1u8][..], &None)
        );
    }

    #[test]
    fn tts_end_device_ids_are_read() {
        let b = parse_body(
            br#"{"end_device_ids":{"device_id":"d1","application_ids":{"application_id":"farm"},"dev_eui":"70B3D57ED0000001","join_eui":"0000000000000000"},"downlinks":[{"f_port":1,"frm_payload":"AQ==","session_key_id":"x"}]}"#,
            "s",
        )
        .unwrap();
        let n = b.names.unwrap();
        assert_eq!(n.device_id.as_deref(), Some("d1"));
        assert_eq!(n.application_id.as_deref(), Some("farm"));
        assert_eq!(n.dev_eui, Some(Eui64::from_u64(0x70B3_D57E_D000_0001)));
        assert_eq!(b.items[0].payload, vec![1]);
        let b = parse_body(br#"{"downlinks":[{"f_port":1,"frm_payload":""}]}"#, "s").unwrap();
        assert!(b.names.is_none());
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
