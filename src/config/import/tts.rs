//! The Things Stack (v3) end-device exports.
//!
//! JSON as `ttn-lw-cli end-devices get` / `list` prints it (one `EndDevice` object, an array,
//! or a stream of objects as the console's JSON import takes them): `ids.device_id`,
//! `ids.dev_eui`, `ids.join_eui` (`app_eui` in old exports), `ids.application_ids`,
//! `supports_join`, `root_keys.app_key.key`, `session.dev_addr`,
//! `session.keys.f_nwk_s_int_key.key` (the LoRaWAN 1.0.x NwkSKey), `session.keys.app_s_key.key`,
//! `lorawan_version` (`MAC_V1_0_3`), `supports_class_c`, `mac_settings.resets_f_cnt`. Keys
//! wrapped by a KEK (`encrypted_key` + `kek_label`) cannot be read and are reported.
//!
//! CSV: the console's template (docs "CSV File Reference", ttscsv.go): columns `id`,
//! `dev_eui`, `join_eui`/`app_eui`, `app_key`, `nwk_key`, `dev_addr`, `app_s_key`,
//! `f_nwk_s_int_key`, `lorawan_version`, `supports_class_c`, ...; unknown columns ignored; a
//! device without `id` is `eui-<deveui>`, as TTS names it.

use super::{csv, eui_id, hex_field, json_records, usable_id, Candidate};
use crate::config::LorawanVersion;
use serde_json::Value;

/// `MAC_V1_0_2` (or `1.0.2`) → 1.0.2; LoRaWAN 1.1 and unknown versions are problems.
fn version(v: &str, problems: &mut Vec<String>) -> Option<LorawanVersion> {
    let n = v.trim().trim_start_matches("MAC_V").replace('_', ".");
    let n = n.split('.').take(3).collect::<Vec<_>>().join(".");
    match n.as_str() {
        "" => None,
        "1.0" | "1.0.0" => Some(LorawanVersion::V1_0_0),
        "1.0.1" => Some(LorawanVersion::V1_0_1),
        "1.0.2" => Some(LorawanVersion::V1_0_2),
        "1.0.3" => Some(LorawanVersion::V1_0_3),
        "1.0.4" => Some(LorawanVersion::V1_0_4),
        _ if n.starts_with("1.1") => {
            problems.push("LoRaWAN 1.1 device; lorastream implements LoRaWAN 1.0.x".into());
            None
        }
        _ => {
            problems.push("lorawan_version is not one lorastream knows (1.0.0 .. 1.0.4)".into());
            None
        }
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// A boolean, also as protobuf's `BoolValue` wrapper (`{"value": true}`).
fn bool_at(v: &Value, path: &[&str]) -> Option<bool> {
    let x = path.iter().try_fold(v, |v, k| v.get(k))?;
    x.as_bool()
        .or_else(|| x.get("value").and_then(Value::as_bool))
}

/// A `KeyEnvelope` (`{"key": "..."}`); one wrapped with a KEK is a problem, not a key.
fn key_at(
    v: &Value,
    path: &[&str],
    field: &str,
    problems: &mut Vec<String>,
) -> Option<crate::model::AesKey> {
    let env = path.iter().try_fold(v, |v, k| v.get(k))?;
    if env.get("key").is_none() && env.get("encrypted_key").is_some() {
        let label = env.get("kek_label").and_then(Value::as_str).unwrap_or("");
        problems.push(format!(
            "{field} is encrypted (kek_label {label:?}); export it in the clear (ttn-lw-cli with the key fields selected, by a user allowed to read keys)"
        ));
        return None;
    }
    hex_field(env.get("key").and_then(Value::as_str), field, problems)
}

/// One `EndDevice` object.
pub fn from_value(v: &Value, record: usize) -> Candidate {
    let mut c = Candidate {
        record: format!("record {record}"),
        ..Candidate::default()
    };
    let p = &mut c.problems;
    c.dev_eui = hex_field(str_at(v, &["ids", "dev_eui"]), "dev_eui", p);
    c.join_eui = hex_field(
        str_at(v, &["ids", "join_eui"]).or_else(|| str_at(v, &["ids", "app_eui"])),
        "join_eui",
        p,
    );
    c.app_key = key_at(v, &["root_keys", "app_key"], "app_key", p);
    c.dev_addr = hex_field(str_at(v, &["session", "dev_addr"]), "dev_addr", p);
    c.nwk_s_key = key_at(v, &["session", "keys", "f_nwk_s_int_key"], "nwk_s_key", p)
        .or_else(|| key_at(v, &["session", "keys", "nwk_s_key"], "nwk_s_key", p));
    c.app_s_key = key_at(v, &["session", "keys", "app_s_key"], "app_s_key", p);
    if let Some(ver) = str_at(v, &["lorawan_version"]) {
        c.lorawan_version = version(ver, p);
    }
    c.otaa = bool_at(v, &["supports_join"]);
    c.class_c = bool_at(v, &["supports_class_c"]).unwrap_or(false);
    c.resets_f_cnt = bool_at(v, &["mac_settings", "resets_f_cnt"]).unwrap_or(false);
    c.application = str_at(v, &["ids", "application_ids", "application_id"])
        .filter(|a| usable_id(a))
        .map(str::to_string);
    let id = str_at(v, &["ids", "device_id"]).unwrap_or("");
    if usable_id(id) {
        c.id = Some(id.to_string());
    } else if let Some(eui) = c.dev_eui {
        c.id = Some(eui_id(eui));
        if !id.is_empty() {
            c.notes
                .push("its device_id cannot be used as is; named by its DevEUI".into());
        }
    }
    c
}

pub fn from_json(text: &str) -> Result<Vec<Candidate>, String> {
    let records = json_records(text)?;
    if records.is_empty() {
        return Err("no end device in the file".into());
    }
    Ok(records
        .iter()
        .enumerate()
        .map(|(i, v)| from_value(v, i + 1))
        .collect())
}

pub fn from_csv(text: &str) -> Result<Vec<Candidate>, String> {
    let rows = csv::parse(text)?;
    let Some(((_, header), rows)) = rows.split_first() else {
        return Err("empty CSV file (a header row is required)".into());
    };
    let col = |names: &[&str]| {
        header
            .iter()
            .position(|h| names.iter().any(|n| h.trim().eq_ignore_ascii_case(n)))
    };
    let dev_eui = col(&["dev_eui"]).ok_or("the header has no dev_eui column")?;
    let (id, join_eui, app_key, nwk_key) = (
        col(&["id"]),
        col(&["join_eui", "app_eui"]),
        col(&["app_key"]),
        col(&["nwk_key"]),
    );
    let (dev_addr, app_s_key, nwk_s_key) = (
        col(&["dev_addr"]),
        col(&["app_s_key"]),
        col(&["f_nwk_s_int_key", "nwk_s_key"]),
    );
    let (version_col, class_c) = (col(&["lorawan_version"]), col(&["supports_class_c"]));
    let mut out = Vec::with_capacity(rows.len());
    for (line, row) in rows {
        let get = |i: Option<usize>| {
            i.and_then(|i| row.get(i))
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
        };
        let mut c = Candidate {
            record: format!("line {line}"),
            ..Candidate::default()
        };
        let p = &mut c.problems;
        c.dev_eui = hex_field(get(Some(dev_eui)), "dev_eui", p);
        c.join_eui = hex_field(get(join_eui), "join_eui", p);
        c.app_key = hex_field(get(app_key), "app_key", p);
        c.dev_addr = hex_field(get(dev_addr), "dev_addr", p);
        c.nwk_s_key = hex_field(get(nwk_s_key), "nwk_s_key (f_nwk_s_int_key)", p);
        c.app_s_key = hex_field(get(app_s_key), "app_s_key", p);
        if let Some(v) = get(version_col) {
            c.lorawan_version = version(v, p);
        }
        // ttscsv.go: an app_key or nwk_key column makes the device OTAA (supports_join).
        if get(app_key).is_some() || get(nwk_key).is_some() {
            c.otaa = Some(true);
        } else if get(dev_addr).is_some() {
            c.otaa = Some(false);
        }
        if c.app_key.is_none() && get(nwk_key).is_some() {
            c.problems.push(
                "only nwk_key is given: that is the LoRaWAN 1.1 root key; lorastream needs the 1.0.x app_key".into(),
            );
        }
        c.class_c = get(class_c).is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        match get(id) {
            Some(i) if usable_id(i) => c.id = Some(i.to_string()),
            other => {
                c.id = c.dev_eui.map(eui_id);
                if other.is_some() {
                    c.notes
                        .push("its id cannot be used as is; named by its DevEUI".into());
                }
            }
        }
        out.push(c);
    }
    if out.is_empty() {
        return Err("no device rows below the header".into());
    }
    Ok(out)
}
