//! ChirpStack v4 device exports, as JSON in the field names of its API (protobuf JSON,
//! api/proto/api/device.proto): a device (`Device` or a list item: `devEui`, `name`,
//! `deviceProfileId`, `joinEui`, `skipFcntCheck`, `isDisabled`), with its OTAA keys
//! (`deviceKeys`: `nwkKey`, which holds the LoRaWAN 1.0.x AppKey, and `appKey`, 1.1 only) and/or
//! its ABP session (`deviceActivation`: `devAddr`, `appSKey`, `nwkSEncKey`, `sNwkSIntKey`,
//! `fNwkSIntKey`, the three network keys equal to the 1.0.x NwkSKey). Accepted shapes: the
//! device fields at the top or under `device` (a `GetDeviceResponse`, whose `classEnabled`
//! gives the class), keys under `deviceKeys`/`keys`, the session under
//! `deviceActivation`/`activation`; a list as an array, JSON lines or `{"result": [...]}`.
//! snake_case names (`dev_eui`, `nwk_key`, ...) are read too.
//!
//! ChirpStack's application ids are UUIDs, so the application comes from `--application` (or
//! the configuration's only one); the device id is the name when it can be one, else
//! `eui-<deveui>`.

use super::{eui_id, hex_field, json_records, usable_id, Candidate};
use crate::config::LorawanVersion;
use serde_json::Value;

/// A field under its camelCase or snake_case name.
fn field<'a>(v: &'a Value, camel: &str, snake: &str) -> Option<&'a Value> {
    v.get(camel).or_else(|| v.get(snake))
}

fn text<'a>(v: &'a Value, camel: &str, snake: &str) -> Option<&'a str> {
    field(v, camel, snake)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// The object holding the device fields: `device` when present, else the record itself.
fn device_of(v: &Value) -> &Value {
    v.get("device").filter(|d| d.is_object()).unwrap_or(v)
}

pub(super) fn looks_like(v: &Value) -> bool {
    text(device_of(v), "devEui", "dev_eui").is_some()
}

pub fn from_value(v: &Value, record: usize) -> Candidate {
    let d = device_of(v);
    let mut c = Candidate {
        record: format!("record {record}"),
        ..Candidate::default()
    };
    let p = &mut c.problems;
    c.dev_eui = hex_field(text(d, "devEui", "dev_eui"), "devEui", p);
    // ChirpStack sets joinEui itself once a device joined; "0000000000000000" means unset.
    c.join_eui = hex_field(
        text(d, "joinEui", "join_eui").filter(|j| !j.trim_start_matches('0').is_empty()),
        "joinEui",
        p,
    );
    let keys = field(v, "deviceKeys", "device_keys")
        .or_else(|| v.get("keys"))
        .filter(|k| k.is_object());
    let act = field(v, "deviceActivation", "device_activation")
        .or_else(|| v.get("activation"))
        .filter(|a| a.is_object());
    if let Some(k) = keys {
        c.otaa = Some(true);
        c.app_key = hex_field(text(k, "nwkKey", "nwk_key"), "nwkKey", p);
        if c.app_key.is_none() && text(k, "appKey", "app_key").is_some() {
            p.push("deviceKeys has only appKey, the LoRaWAN 1.1 application root key; the 1.0.x AppKey is in nwkKey".into());
        }
    } else if let Some(a) = act {
        c.otaa = Some(false);
        c.dev_addr = hex_field(text(a, "devAddr", "dev_addr"), "devAddr", p);
        c.app_s_key = hex_field(text(a, "appSKey", "app_s_key"), "appSKey", p);
        let nwk: Vec<(&str, Option<crate::model::AesKey>)> = [
            ("fNwkSIntKey", "f_nwk_s_int_key"),
            ("sNwkSIntKey", "s_nwk_s_int_key"),
            ("nwkSEncKey", "nwk_s_enc_key"),
        ]
        .iter()
        .filter_map(|(camel, snake)| {
            text(a, camel, snake).map(|t| (*camel, hex_field(Some(t), camel, p)))
        })
        .collect();
        let keys: Vec<_> = nwk.iter().filter_map(|(_, k)| *k).collect();
        if keys.windows(2).any(|w| w[0] != w[1]) {
            p.push("its network session keys differ (a LoRaWAN 1.1 session); lorastream implements 1.0.x, where they are one NwkSKey".into());
        } else {
            c.nwk_s_key = keys.first().copied();
        }
    }
    if field(d, "isDisabled", "is_disabled").and_then(Value::as_bool) == Some(true) {
        p.push("it is disabled in ChirpStack".into());
    }
    c.class_c = matches!(text(v, "classEnabled", "class_enabled"), Some("CLASS_C"))
        || field(v, "supportsClassC", "supports_class_c").and_then(Value::as_bool) == Some(true);
    c.resets_f_cnt =
        field(d, "skipFcntCheck", "skip_fcnt_check").and_then(Value::as_bool) == Some(true);
    if let Some(m) = text(v, "macVersion", "mac_version") {
        c.lorawan_version = match m {
            "LORAWAN_1_0_0" => Some(LorawanVersion::V1_0_0),
            "LORAWAN_1_0_1" => Some(LorawanVersion::V1_0_1),
            "LORAWAN_1_0_2" => Some(LorawanVersion::V1_0_2),
            "LORAWAN_1_0_3" => Some(LorawanVersion::V1_0_3),
            "LORAWAN_1_0_4" => Some(LorawanVersion::V1_0_4),
            _ => {
                p.push(format!(
                    "macVersion {m:?}: lorastream implements LoRaWAN 1.0.x"
                ));
                None
            }
        };
    }
    let name = text(d, "name", "name").unwrap_or("");
    if usable_id(name) {
        c.id = Some(name.to_string());
    } else if let Some(eui) = c.dev_eui {
        c.id = Some(eui_id(eui));
        if !name.is_empty() {
            c.notes.push(format!(
                "named {} (its name {name:?} has characters an id cannot have)",
                eui_id(eui)
            ));
        }
    }
    c
}

pub fn from_json(text: &str) -> Result<Vec<Candidate>, String> {
    let records = json_records(text)?;
    if records.is_empty() {
        return Err("no device in the file".into());
    }
    Ok(records
        .iter()
        .enumerate()
        .map(|(i, v)| from_value(v, i + 1))
        .collect())
}
