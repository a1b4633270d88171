//! Azure IoT Hub's MQTT details that need no I/O: SAS tokens, the username, topics and
//! property bags. Pure functions, tested against vectors published by Microsoft.
//!
//! Sources: Azure IoT Hub docs, "Control access to IoT Hub with shared access signatures"
//! (token format, string to sign, `skn` for policy keys) and "Communicate with an IoT hub using
//! the MQTT protocol" (ClientId, username, topics, property bags, 256 KB messages).

use crate::model::Secret;
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

impl SasKey {
    /// `key` is the base64 text the Azure portal shows. The error never contains the key.
    pub fn new(key: &Secret, policy: Option<&str>) -> Result<SasKey, String> {
        let key = base64::engine::general_purpose::STANDARD
            .decode(key.expose().trim())
            .map_err(|e| format!("the key is not base64 ({e}); copy it from the Azure portal"))?;
        if key.is_empty() {
            return Err("the key is empty".into());
        }
        Ok(SasKey {
            key,
            policy: policy.map(String::from),
        })
    }

    pub fn policy(&self) -> Option<&str> {
        self.policy.as_deref()
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
        let e = SasKey::new(&Secret::new("not*base64"), None).unwrap_err();
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
}
