//! What a WebSocket server sends lorastream, parsed (pure; see the module docs of the stream):
//! - `{"ack": "<correlation id>"}` or `{"ack": ["<id>", ...]}`: messages delivered;
//! - the contract's downlink JSON naming its device,
//!   `{"end_device_ids": {"device_id": "soil-1", "application_ids": {"application_id": "farm"}},
//!   "downlinks": [...]}`, with an optional `"op": "push" | "replace"` (default `push`, as on
//!   MQTT `down/push`);
//! - anything else is refused with a reason.

use crate::downlink::json as downlink_json;
use crate::model::{DownlinkOp, DownlinkRequest};
use serde_json::Value;

/// One message from the server.
#[derive(Debug)]
pub enum Incoming {
    Acks(Vec<String>),
    Downlink(Downlink),
    Bad(String),
}

/// A downlink message: where it goes, and its body for the downlink JSON parser.
#[derive(Debug)]
pub struct Downlink {
    pub device: String,
    pub application: String,
    pub op: DownlinkOp,
    /// The message without `op` (the contract's downlink JSON).
    body: Vec<u8>,
}

impl Downlink {
    /// The request for the scheduler (items parsed; a parse error becomes a `down/failed`
    /// event for the device there).
    pub fn into_request(self, stream: &str) -> DownlinkRequest {
        let (items, names) = match downlink_json::parse_body(&self.body, stream) {
            Ok(b) => (Ok(b.items), b.names),
            Err(e) => (Err(e), None),
        };
        DownlinkRequest {
            stream: stream.to_string(),
            application: self.application,
            device: self.device,
            op: self.op,
            items,
            names,
        }
    }
}

pub fn parse(bytes: &[u8]) -> Incoming {
    let mut v: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return Incoming::Bad(format!("not JSON: {e}")),
    };
    let Some(obj) = v.as_object_mut() else {
        return Incoming::Bad("not a JSON object".into());
    };
    if let Some(a) = obj.get("ack") {
        return match a {
            Value::String(s) => Incoming::Acks(vec![s.clone()]),
            Value::Array(ids) => {
                let ids: Option<Vec<String>> =
                    ids.iter().map(|i| i.as_str().map(str::to_string)).collect();
                match ids {
                    Some(ids) => Incoming::Acks(ids),
                    None => Incoming::Bad("\"ack\" must be a string or an array of strings".into()),
                }
            }
            _ => Incoming::Bad("\"ack\" must be a string or an array of strings".into()),
        };
    }
    if !obj.contains_key("downlinks") {
        return Incoming::Bad("neither \"ack\" nor \"downlinks\"".into());
    }
    let op = match obj.remove("op") {
        None => DownlinkOp::Push,
        Some(Value::String(s)) if s == "push" => DownlinkOp::Push,
        Some(Value::String(s)) if s == "replace" => DownlinkOp::Replace,
        Some(other) => {
            return Incoming::Bad(format!(
                "\"op\" must be \"push\" or \"replace\", not {other}"
            ))
        }
    };
    let ids = obj.get("end_device_ids");
    let device = ids
        .and_then(|i| i.get("device_id"))
        .and_then(Value::as_str)
        .filter(|d| !d.is_empty());
    let Some(device) = device.map(str::to_string) else {
        return Incoming::Bad(
            "a downlink must name its device: \"end_device_ids\": {\"device_id\": ...}".into(),
        );
    };
    let application = ids
        .and_then(|i| i.get("application_ids"))
        .and_then(|a| a.get("application_id"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let body = serde_json::to_vec(&v).unwrap_or_default();
    Incoming::Downlink(Downlink {
        device,
        application,
        op,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_downlinks_and_refusals() {
        assert!(
            matches!(parse(br#"{"ack":"lorastream:uplink:1"}"#), Incoming::Acks(v) if v == ["lorastream:uplink:1"])
        );
        assert!(matches!(parse(br#"{"ack":["a","b"]}"#), Incoming::Acks(v) if v == ["a", "b"]));
        assert!(matches!(parse(br#"{"ack":[1]}"#), Incoming::Bad(_)));
        assert!(matches!(parse(b"nope"), Incoming::Bad(_)));
        assert!(matches!(parse(b"[1]"), Incoming::Bad(_)));
        assert!(matches!(parse(br#"{"hello":1}"#), Incoming::Bad(_)));
        // A downlink must name its device.
        assert!(
            matches!(parse(br#"{"downlinks":[]}"#), Incoming::Bad(r) if r.contains("device_id"))
        );
        let m = br#"{"op":"replace","end_device_ids":{"device_id":"soil-1","application_ids":{"application_id":"farm"}},
                    "downlinks":[{"f_port":2,"frm_payload":"AQI="}]}"#;
        let Incoming::Downlink(d) = parse(m) else {
            panic!("not a downlink")
        };
        assert_eq!(
            (d.device.as_str(), d.application.as_str()),
            ("soil-1", "farm")
        );
        assert_eq!(d.op, DownlinkOp::Replace);
        let req = d.into_request("ws");
        let items = req.items.expect("items");
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].payload, vec![1, 2]);
        assert_eq!(
            req.names.and_then(|n| n.device_id).as_deref(),
            Some("soil-1")
        );
        // A bad item is the scheduler's to report (down/failed to the device).
        let Incoming::Downlink(d) = parse(
            br#"{"end_device_ids":{"device_id":"x"},"downlinks":[{"f_port":0,"frm_payload":""}]}"#,
        ) else {
            panic!("not a downlink")
        };
        assert!(d.into_request("ws").items.is_err());
        assert!(matches!(
            parse(br#"{"op":"drop","end_device_ids":{"device_id":"x"},"downlinks":[]}"#),
            Incoming::Bad(_)
        ));
    }
}
