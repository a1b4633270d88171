//! Azure IoT Hub's MQTT details that need no I/O: SAS tokens, the username, topics, property
//! bags, and the downlink request a cloud-to-device message carries. Pure functions, tested against vectors published by Microsoft.
//!
//! Sources: Azure IoT Hub docs, "Control access to IoT Hub with shared access signatures"
//! (token format, string to sign, `skn` for policy keys) and "Communicate with an IoT hub using
//! the MQTT protocol" (ClientId, username, topics, property bags, 256 KB messages).

use crate::downlink::json as downlink_json;
use crate::model::{
    new_id, DownlinkItem, DownlinkOp, DownlinkRequest, RequestError, Secret, MAX_PAYLOAD,
};
use base64::Engine;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// The api-version lorastream speaks (the MQTT username carries it).
pub const API_VERSION: &str = "2021-04-12";

/// IoT Hub's limit on a device-to-cloud message (body and properties).
pub const MAX_MESSAGE: usize = 256 * 1024;

/// Everything but RFC 3986's unreserved characters (`A-Z a-z 0-9 - . _ ~`) is escaped, as the
/// Azure SDKs do for `sr`, `sig` and property values (`/` → `%2F`, `+` → `%2B`, `=` → `%3D`).
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// URL-encode one component.
pub fn url_encode(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

/// A symmetric key that signs SAS tokens: a device's own key, or a hub shared-access policy key
/// (with `DeviceConnect`), which signs for any device and is named in the token (`skn`).
#[derive(Clone)]
pub struct SasKey {
    key: Vec<u8>,
    policy: Option<String>,
}

impl std::fmt::Debug for SasKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SasKey(***, policy {:?})", self.policy)
    }
}

/// Why a configured key cannot sign. Never contains the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the key is not base64 ({0}); copy it from the Azure portal")]
    NotBase64(String),
    #[error("the key is empty")]
    Empty,
}

impl SasKey {
    /// `key` is the base64 text the Azure portal shows. The error never contains the key.
    pub fn new(key: &Secret, policy: Option<&str>) -> Result<SasKey, KeyError> {
        let key = base64::engine::general_purpose::STANDARD
            .decode(key.expose().trim())
            .map_err(|e| KeyError::NotBase64(e.to_string()))?;
        if key.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(SasKey {
            key,
            policy: policy.map(String::from),
        })
    }
}

/// The resource a device token grants: `{hostname}/devices/{deviceId}`.
pub fn resource(hostname: &str, device_id: &str) -> String {
    format!("{hostname}/devices/{device_id}")
}

/// Base64 HMAC-SHA256 of `string_to_sign` with the raw key bytes.
pub fn sign(key: &[u8], string_to_sign: &str) -> String {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&k, string_to_sign.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
}

/// `SharedAccessSignature sr={enc resource}&sig={enc sig}&se={expiry}[&skn={policy}]`, where
/// the signature is over `{enc resource}\n{expiry}`. `expiry` is in Unix seconds.
pub fn token(resource: &str, key: &SasKey, expiry: u64) -> Secret {
    let sr = url_encode(resource);
    let sig = sign(&key.key, &format!("{sr}\n{expiry}"));
    let mut t = format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expiry}",
        url_encode(&sig)
    );
    if let Some(p) = &key.policy {
        t.push_str("&skn=");
        t.push_str(&url_encode(p));
    }
    Secret::new(t)
}

/// The MQTT username: `{hostname}/{deviceId}/?api-version=...`.
pub fn username(hostname: &str, device_id: &str) -> String {
    format!("{hostname}/{device_id}/?api-version={API_VERSION}")
}

/// Encode a property bag: `k=v&k=v`, keys and values URL-encoded, except that system
/// properties keep their literal `$.` prefix (`$.ct=application%2Fjson`), as in the docs.
pub fn encode_properties(props: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in props.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        match k.strip_prefix("$.") {
            Some(rest) => {
                out.push_str("$.");
                out.push_str(&url_encode(rest));
            }
            None => out.push_str(&url_encode(k)),
        }
        out.push('=');
        out.push_str(&url_encode(v));
    }
    out
}

/// Device-to-cloud topic: `devices/{id}/messages/events/{property bag}`.
pub fn events_topic(device_id: &str, props: &[(&str, &str)]) -> String {
    format!(
        "devices/{device_id}/messages/events/{}",
        encode_properties(props)
    )
}

/// The cloud-to-device subscription of a device.
pub fn devicebound_filter(device_id: &str) -> String {
    format!("devices/{device_id}/messages/devicebound/#")
}

/// Decode a property bag. Keys and values are percent-decoded, so `%24.to` and `$.to` are the
/// same key (IoT Hub escapes `$` in the bags it sends; the docs show it unescaped). `+` is kept
/// as is (it is not a space in a URL path). A pair without `=` has an empty value.
pub fn parse_properties(bag: &str) -> Vec<(String, String)> {
    let bag = bag.strip_prefix('?').unwrap_or(bag);
    bag.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// Properties of a cloud-to-device message for `device_id`, or None when `topic` is not its
/// devicebound topic.
pub fn parse_devicebound(topic: &str, device_id: &str) -> Option<Vec<(String, String)>> {
    let rest = topic
        .strip_prefix("devices/")?
        .strip_prefix(device_id)?
        .strip_prefix("/messages/devicebound")?;
    match rest {
        "" => Some(Vec::new()),
        r => r.strip_prefix('/').map(parse_properties),
    }
}

/// Twin reported-properties update topic.
pub fn twin_patch_topic(rid: u64) -> String {
    format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}")
}

/// Twin responses: `$iothub/twin/res/{status}/?$rid={rid}...` → status.
pub fn twin_response_status(topic: &str) -> Option<u16> {
    topic
        .strip_prefix("$iothub/twin/res/")?
        .split('/')
        .next()?
        .parse()
        .ok()
}

/// Property lookup (first match).
pub fn prop<'a>(props: &'a [(String, String)], key: &str) -> Option<&'a str> {
    props
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Build the downlink request of a cloud-to-device message (see docs/formats.md).
///
/// - The LoRaWAN device (application, device id): `device`, the connection's with
///   identity = "device"; otherwise the `application`
///   and `device` properties, or `end_device_ids` in a JSON body.
/// - `op` property: `push` (default) or `replace`.
/// - JSON body (default): the contract's `{"downlinks":[…]}`. Raw body (`downlink_format =
///   "raw"`): the payload bytes, with `fPort` (1..223) and optional `confirmed` (`true`/`false`)
///   and `priority` properties.
/// - IoT Hub's message id (`$.mid`) is added to each downlink's correlation ids.
pub fn downlink_request(
    stream: &str,
    raw: bool,
    device: Option<(&str, &str)>,
    props: &[(String, String)],
    body: &[u8],
) -> Option<DownlinkRequest> {
    let mut target = device.map(|(a, d)| (a.to_string(), d.to_string()));
    if target.is_none() {
        if let (Some(a), Some(d)) = (prop(props, "application"), prop(props, "device")) {
            target = Some((a.to_string(), d.to_string()));
        }
    }
    let parsed = (!raw).then(|| downlink_json::parse_body(body, stream));
    let names = parsed
        .as_ref()
        .and_then(|p| p.as_ref().ok())
        .and_then(|b| b.names.clone());
    if target.is_none() {
        // TTS-style addressing in the body.
        if let Some(n) = &names {
            if let (Some(a), Some(d)) = (&n.application_id, &n.device_id) {
                target = Some((a.clone(), d.clone()));
            }
        }
    }
    let (application, device) = target?;
    let op = match prop(props, "op") {
        None | Some("push") => Ok(DownlinkOp::Push),
        Some("replace") => Ok(DownlinkOp::Replace),
        Some(o) => Err(RequestError::Transport(format!(
            "property op={o:?} is not push or replace"
        ))),
    };
    let mid = prop(props, "$.mid").map(|m| format!("azure-iot-hub:message-id:{m}"));
    let items = op
        .as_ref()
        .map_err(|e| e.clone())
        .and_then(|_| match parsed {
            Some(p) => p.map(|b| b.items),
            None => raw_item(stream, props, body.to_vec()).map(|it| vec![it]),
        });
    let items = items.map(|mut v| {
        if let Some(m) = &mid {
            for it in &mut v {
                it.correlation_ids.push(m.clone());
            }
        }
        v
    });
    Some(DownlinkRequest {
        stream: stream.to_string(),
        application,
        device,
        op: op.unwrap_or(DownlinkOp::Push),
        items,
        names,
    })
}

fn raw_item(
    stream: &str,
    props: &[(String, String)],
    body: Vec<u8>,
) -> Result<DownlinkItem, RequestError> {
    let bad = |m: String| RequestError::Transport(m);
    let port = prop(props, "fPort")
        .or_else(|| prop(props, "f_port"))
        .ok_or_else(|| bad("raw downlink without the fPort property".into()))?;
    let f_port = match port.parse::<u8>() {
        Ok(p @ 1..=223) => p,
        _ => {
            return Err(bad(format!(
                "fPort {port:?} is not an application port (1..223)"
            )))
        }
    };
    let confirmed = match prop(props, "confirmed") {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(c) => return Err(bad(format!("confirmed={c:?} is not true or false"))),
    };
    if body.len() > MAX_PAYLOAD {
        return Err(bad(format!(
            "payload is {} bytes; LoRaWAN carries at most {MAX_PAYLOAD}",
            body.len(),
        )));
    }
    let priority = prop(props, "priority").unwrap_or("NORMAL").to_uppercase();
    Ok(DownlinkItem {
        id: new_id(),
        f_port,
        payload: body,
        confirmed,
        priority,
        correlation_ids: Vec::new(),
        stream: stream.to_string(),
        decoded_payload: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b64: &str, policy: Option<&str>) -> SasKey {
        SasKey::new(&Secret::new(b64), policy).unwrap()
    }

    /// Vectors from Microsoft's own tests (learned, not copied):
    /// - Azure/azure-iot-cli-extension, hub unit tests, `TestSasTokenAuth.test_generate_sas_token`:
    ///   resource `iot-hub-for-test.azure-devices.net/devices/iot-device-for-test`, key
    ///   `+XLy+MVZ+aTeOnVzN2kLeB16O+kSxmz6g3rS6fAf6rw=`, expiry 1471940363 → signature
    ///   `SIumZ1ACqqPJZ2okHDlW9MSYKykEpqsQY3z6FMOICd4=` with or without `skn=iothubowner`; the
    ///   hub-level resource `iot-hub-for-test.azure-devices.net` → `770sPjjY…TXw=`.
    #[test]
    fn sas_token_matches_the_azure_cli_vectors() {
        let k = "+XLy+MVZ+aTeOnVzN2kLeB16O+kSxmz6g3rS6fAf6rw=";
        let res = "iot-hub-for-test.azure-devices.net/devices/iot-device-for-test";
        let t = token(res, &key(k, None), 1471940363);
        assert_eq!(
            t.expose(),
            "SharedAccessSignature sr=iot-hub-for-test.azure-devices.net%2Fdevices%2Fiot-device-for-test\
             &sig=SIumZ1ACqqPJZ2okHDlW9MSYKykEpqsQY3z6FMOICd4%3D&se=1471940363"
        );
        let t = token(res, &key(k, Some("iothubowner")), 1471940363);
        assert!(t
            .expose()
            .contains("&sig=SIumZ1ACqqPJZ2okHDlW9MSYKykEpqsQY3z6FMOICd4%3D&"));
        assert!(t.expose().ends_with("&se=1471940363&skn=iothubowner"));
        let t = token(
            "iot-hub-for-test.azure-devices.net",
            &key(k, Some("iothubowner")),
            1471940363,
        );
        assert!(t
            .expose()
            .contains("sig=770sPjjYxRYpNz8%2FhEN7XR5XU5KDGYGTinSP8YyeTXw%3D"));
        assert_eq!(
            format!("{t:?} {:?}", key(k, None)),
            "*** SasKey(***, policy None)"
        );
    }

    /// Azure/azure-iot-sdk-java, `SignatureIT.signatureIsCorrect`: the HMAC over
    /// `sdktesthub.private.azure-devices-int.net/devices/test8\n1462333672` with key
    /// `q+DKVojmMz014RjAwpNGZbAkdOocSVWMKPOccLfUmLE=` is `ZrTYgp6uRmbDl4lzzewxFD9FoaNKIK7G2bdivDbtc9A=`.
    #[test]
    fn hmac_matches_the_java_sdk_vector() {
        let k = base64::engine::general_purpose::STANDARD
            .decode("q+DKVojmMz014RjAwpNGZbAkdOocSVWMKPOccLfUmLE=")
            .unwrap();
        assert_eq!(
            sign(
                &k,
                "sdktesthub.private.azure-devices-int.net/devices/test8\n1462333672"
            ),
            "ZrTYgp6uRmbDl4lzzewxFD9FoaNKIK7G2bdivDbtc9A="
        );
    }

    #[test]
    fn bad_keys_are_refused_without_echoing_them() {
        let e = SasKey::new(&Secret::new("not*base64"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not base64") && !e.contains("not*base64"), "{e}");
        assert!(SasKey::new(&Secret::new(""), None).is_err());
    }

    #[test]
    fn username_and_topics() {
        assert_eq!(
            username("hub.azure-devices.net", "soil-1"),
            "hub.azure-devices.net/soil-1/?api-version=2021-04-12"
        );
        assert_eq!(
            events_topic(
                "soil-1",
                &[
                    ("$.ct", "application/json"),
                    ("$.ce", "utf-8"),
                    ("device", "a b&c=d/é")
                ]
            ),
            "devices/soil-1/messages/events/$.ct=application%2Fjson&$.ce=utf-8&device=a%20b%26c%3Dd%2F%C3%A9"
        );
        assert_eq!(
            devicebound_filter("d1"),
            "devices/d1/messages/devicebound/#"
        );
        assert_eq!(
            twin_patch_topic(7),
            "$iothub/twin/PATCH/properties/reported/?$rid=7"
        );
        assert_eq!(
            twin_response_status("$iothub/twin/res/204/?$rid=7&$version=3"),
            Some(204)
        );
        assert_eq!(twin_response_status("devices/x"), None);
    }

    #[test]
    fn property_bags_parse_with_or_without_escaped_dollar() {
        let a = parse_devicebound(
            "devices/d1/messages/devicebound/%24.mid=42&%24.to=%2Fdevices%2Fd1%2Fmessages%2FdeviceBound&fPort=5&confirmed=true",
            "d1",
        )
        .unwrap();
        let b = parse_devicebound(
            "devices/d1/messages/devicebound/$.mid=42&$.to=/devices/d1/messages/deviceBound&fPort=5&confirmed=true",
            "d1",
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(prop(&a, "$.to"), Some("/devices/d1/messages/deviceBound"));
        assert_eq!(prop(&a, "fPort"), Some("5"));
        assert_eq!(
            parse_devicebound("devices/d1/messages/devicebound", "d1"),
            Some(vec![])
        );
        assert_eq!(
            parse_devicebound("devices/d10/messages/devicebound/x=1", "d1"),
            None
        );
        assert_eq!(
            parse_devicebound("devices/d1/messages/events/x=1", "d1"),
            None
        );
        // Odd input never panics.
        assert_eq!(
            parse_properties("&&=&k&%zz=%"),
            vec![
                ("".to_string(), "".to_string()),
                ("k".to_string(), "".to_string()),
                ("%zz".to_string(), "%".to_string())
            ]
        );
    }
    #[test]
    fn json_downlinks_in_device_identity() {
        let d = ("farm", "soil-1");
        let r = downlink_request(
            "az",
            false,
            Some(d),
            &parse_properties("%24.mid=m1&op=replace"),
            br#"{"downlinks":[{"f_port":2,"frm_payload":"AQ=="}]}"#,
        )
        .unwrap();
        assert_eq!(
            (r.application.as_str(), r.device.as_str()),
            ("farm", "soil-1")
        );
        assert_eq!(r.op, DownlinkOp::Replace);
        let items = r.items.unwrap();
        assert_eq!(items[0].payload, vec![1]);
        assert_eq!(
            items[0].correlation_ids,
            vec!["azure-iot-hub:message-id:m1"]
        );
    }

    #[test]
    fn gateway_identity_finds_the_device_in_properties_or_body() {
        let r = downlink_request(
            "az",
            false,
            None,
            &parse_properties("application=farm&device=d%201"),
            br#"{"downlinks":[{"f_port":2,"frm_payload":""}]}"#,
        )
        .unwrap();
        assert_eq!((r.application.as_str(), r.device.as_str()), ("farm", "d 1"));
        let r = downlink_request("az", false, None, &[],
            br#"{"end_device_ids":{"device_id":"d2","application_ids":{"application_id":"farm"}},"downlinks":[{"f_port":3,"frm_payload":""}]}"#).unwrap();
        assert_eq!((r.application.as_str(), r.device.as_str()), ("farm", "d2"));
        assert_eq!(r.items.unwrap()[0].f_port, 3);
        // A device connection whose message names another device: the names travel to the
        // scheduler, which refuses the request.
        let r = downlink_request(
            "az",
            false,
            Some(("farm", "d1")),
            &[],
            br#"{"end_device_ids":{"device_id":"d2"},"downlinks":[{"f_port":3,"frm_payload":""}]}"#,
        )
        .unwrap();
        assert_eq!(r.device, "d1");
        assert_eq!(r.names.unwrap().device_id.as_deref(), Some("d2"));
        assert!(
            downlink_request("az", false, None, &parse_properties("device=x"), b"{}").is_none()
        );
        // Known device, bad body: a request whose error becomes a `failed` event.
        let r = downlink_request(
            "az",
            false,
            None,
            &parse_properties("application=a&device=x&op=pop"),
            b"{}",
        )
        .unwrap();
        assert!(r.items.unwrap_err().to_string().contains("op=\"pop\""));
    }

    #[test]
    fn raw_downlinks_take_port_and_confirmed_from_properties() {
        let d = ("farm", "soil-1");
        let ok = |p: &str, body: &[u8]| {
            downlink_request("az", true, Some(d), &parse_properties(p), body)
                .unwrap()
                .items
                .map_err(|e| e.to_string())
        };
        let it = ok("fPort=5&confirmed=true", b"\x01\x02").unwrap().remove(0);
        assert_eq!((it.f_port, it.confirmed, it.payload), (5, true, vec![1, 2]));
        assert!(!ok("fPort=5", b"x").unwrap()[0].confirmed);
        assert!(ok("", b"x").unwrap_err().contains("fPort"));
        assert!(ok("fPort=0", b"x").unwrap_err().contains("1..223"));
        assert!(ok("fPort=5&confirmed=maybe", b"x")
            .unwrap_err()
            .contains("confirmed"));
        assert!(ok("fPort=5", &[0u8; 243])
            .unwrap_err()
            .contains("243 bytes"));
    }
}
