//! CayenneLPP (myDevices' Low Power Payload): `channel, type, value` triples, big-endian.
//!
//! Uplinks are decoded into the object The Things Stack's CayenneLPP payload formatter makes
//! (`pkg/messageprocessors/cayennelpp`): one key per value, `<name>_<channel>`, with TTS's names
//! for the types of the original IPSO list (`digital_in_1`, `analog_out_2`, `luminosity_3`,
//! `presence_4`, `temperature_5`, `relative_humidity_6`, `accelerometer_7: {x, y, z}`,
//! `barometric_pressure_8`, `gyrometer_9: {x, y, z}`, `gps_10: {latitude, longitude,
//! altitude}`). Values are the wire integers times their resolution as exact decimals (`272` in
//! 0.1 °C is `27.2`, not TTS's float32 `27.200000762939453`); whole-unit types give integers.
//!
//! The extended types of the ElectronicCats Arduino library (used by RAK, Seeed, Heltec and
//! most Arduino sketches) are decoded too, named the same way: `generic_sensor`, `voltage` (V),
//! `current` (A), `frequency` (Hz), `percentage`, `altitude` (m), `concentration` (ppm),
//! `power` (W), `distance` (m), `energy` (kWh), `direction` (°), `unix_time` (s), `colour`
//! (`{r, g, b}`), `switch`.
//!
//! A payload cut inside a value, or a type this table does not know, is an error for the whole
//! payload (as in TTS: a decoder cannot find the next value after an unknown one). Decoding is a
//! pure function of the bytes and never panics (a test feeds it random bytes).
//!
//! Downlinks (`encodeDownlink`): as TTS, `{"value_<channel>": <number>}` becomes `channel`
//! followed by the value in hundredths as a signed 16-bit integer (TTS's `AddPort`), channels in
//! ascending order. Unlike TTS, which skips them silently, other keys and values that do not fit
//! are refused with the reason.

use serde_json::{Map, Number, Value};

/// Why a payload could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LppError {
    #[error("CayenneLPP: payload ends inside the value of channel {channel} type {kind} (needs {needed} bytes, {left} left at byte {at})")]
    Truncated {
        channel: u8,
        kind: u8,
        needed: usize,
        left: usize,
        at: usize,
    },
    #[error("CayenneLPP: payload ends after channel {channel}, with no type byte (byte {at})")]
    NoType { channel: u8, at: usize },
    #[error("CayenneLPP: unknown data type {kind} on channel {channel} (byte {at})")]
    UnknownType { channel: u8, kind: u8, at: usize },
    #[error("CayenneLPP downlink: key {0:?} is not value_<channel> (channel 0..255)")]
    Key(String),
    #[error("CayenneLPP downlink: {key} = {value} is not a number within -327.68..327.67")]
    Value { key: String, value: String },
}

/// How a value is laid out on the wire.
#[derive(Clone, Copy)]
enum Shape {
    /// One unsigned/signed integer of `len` bytes, divided by `div` (1 = an integer result).
    Scalar { len: usize, signed: bool, div: u32 },
    /// x, y, z: signed 16-bit each.
    Xyz { div: u32 },
    /// latitude, longitude (0.0001 °), altitude (0.01 m): signed 24-bit each.
    Gps,
    /// r, g, b: one byte each.
    Rgb,
}

impl Shape {
    fn len(self) -> usize {
        match self {
            Shape::Scalar { len, .. } => len,
            Shape::Xyz { .. } => 6,
            Shape::Gps => 9,
            Shape::Rgb => 3,
        }
    }
}

const fn unsigned(len: usize, div: u32) -> Shape {
    Shape::Scalar {
        len,
        signed: false,
        div,
    }
}

const fn signed(len: usize, div: u32) -> Shape {
    Shape::Scalar {
        len,
        signed: true,
        div,
    }
}

/// The type byte's name and layout: IPSO object id − 3200 (LwM2M registry), as CayenneLPP
/// numbers them.
fn kind(t: u8) -> Option<(&'static str, Shape)> {
    Some(match t {
        0 => ("digital_in", unsigned(1, 1)),
        1 => ("digital_out", unsigned(1, 1)),
        2 => ("analog_in", signed(2, 100)),
        3 => ("analog_out", signed(2, 100)),
        100 => ("generic_sensor", unsigned(4, 1)),
        101 => ("luminosity", unsigned(2, 1)),
        102 => ("presence", unsigned(1, 1)),
        103 => ("temperature", signed(2, 10)),
        104 => ("relative_humidity", unsigned(1, 2)),
        113 => ("accelerometer", Shape::Xyz { div: 1000 }),
        115 => ("barometric_pressure", unsigned(2, 10)),
        116 => ("voltage", unsigned(2, 100)),
        117 => ("current", unsigned(2, 1000)),
        118 => ("frequency", unsigned(4, 1)),
        120 => ("percentage", unsigned(1, 1)),
        121 => ("altitude", signed(2, 1)),
        125 => ("concentration", unsigned(2, 1)),
        128 => ("power", unsigned(2, 1)),
        130 => ("distance", unsigned(4, 1000)),
        131 => ("energy", unsigned(4, 1000)),
        132 => ("direction", unsigned(2, 1)),
        133 => ("unix_time", unsigned(4, 1)),
        134 => ("gyrometer", Shape::Xyz { div: 100 }),
        135 => ("colour", Shape::Rgb),
        136 => ("gps", Shape::Gps),
        142 => ("switch", unsigned(1, 1)),
        _ => return None,
    })
}

/// Big-endian integer of `b` (1..=4 bytes), sign-extended when `signed`.
fn int(b: &[u8], signed: bool) -> i64 {
    let mut v: i64 = 0;
    for &x in b {
        v = (v << 8) | i64::from(x);
    }
    let bits = 8 * b.len() as u32;
    if signed && bits > 0 && v & (1 << (bits - 1)) != 0 {
        v -= 1 << bits;
    }
    v
}

/// `v / div` as JSON: an integer when `div` is 1, else the nearest double to the decimal
/// (`272 / 10` → `27.2`).
fn scaled(v: i64, div: u32) -> Value {
    if div == 1 {
        return Value::Number(v.into());
    }
    Number::from_f64(v as f64 / f64::from(div)).map_or(Value::Null, Value::Number)
}

fn value(shape: Shape, b: &[u8]) -> Value {
    let obj = |pairs: [(&str, Value); 3]| {
        Value::Object(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    };
    match shape {
        Shape::Scalar { signed, div, .. } => scaled(int(b, signed), div),
        Shape::Xyz { div } => obj([
            ("x", scaled(int(&b[0..2], true), div)),
            ("y", scaled(int(&b[2..4], true), div)),
            ("z", scaled(int(&b[4..6], true), div)),
        ]),
        Shape::Gps => obj([
            ("latitude", scaled(int(&b[0..3], true), 10_000)),
            ("longitude", scaled(int(&b[3..6], true), 10_000)),
            ("altitude", scaled(int(&b[6..9], true), 100)),
        ]),
        Shape::Rgb => obj([("r", b[0].into()), ("g", b[1].into()), ("b", b[2].into())]),
    }
}

/// Decode an uplink payload. An empty payload is an empty object.
pub fn decode_uplink(bytes: &[u8]) -> Result<Map<String, Value>, LppError> {
    let mut out = Map::new();
    let mut at = 0;
    while at < bytes.len() {
        let channel = bytes[at];
        let Some(&t) = bytes.get(at + 1) else {
            return Err(LppError::NoType { channel, at });
        };
        let Some((name, shape)) = kind(t) else {
            return Err(LppError::UnknownType {
                channel,
                kind: t,
                at: at + 1,
            });
        };
        let start = at + 2;
        let Some(b) = bytes.get(start..start + shape.len()) else {
            return Err(LppError::Truncated {
                channel,
                kind: t,
                needed: shape.len(),
                left: bytes.len() - start,
                at: start,
            });
        };
        // A repeated channel and type: the last value wins, as in TTS (a Go map).
        out.insert(format!("{name}_{channel}"), value(shape, b));
        at = start + shape.len();
    }
    Ok(out)
}

/// Encode a downlink object (`{"value_3": 12.5}`) as TTS does: channel, value × 100 as i16.
pub fn encode_downlink(obj: &Map<String, Value>) -> Result<Vec<u8>, LppError> {
    let mut ports = Vec::with_capacity(obj.len());
    for (key, v) in obj {
        let channel = key
            .strip_prefix("value_")
            .and_then(|c| c.parse::<u8>().ok())
            .ok_or_else(|| LppError::Key(key.clone()))?;
        let hundredths = v
            .as_f64()
            .map(|f| (f * 100.0).round())
            .filter(|h| (f64::from(i16::MIN)..=f64::from(i16::MAX)).contains(h))
            .ok_or_else(|| LppError::Value {
                key: key.clone(),
                value: v.to_string(),
            })?;
        ports.push((channel, hundredths as i16));
    }
    ports.sort_by_key(|(c, _)| *c);
    let mut out = Vec::with_capacity(ports.len() * 3);
    for (channel, v) in ports {
        out.push(channel);
        out.extend_from_slice(&v.to_be_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decode(hex: &str) -> Value {
        Value::Object(decode_uplink(&hex::decode(hex.replace(' ', "")).unwrap()).unwrap())
    }

    /// The examples of the CayenneLPP specification (myDevices, "Cayenne Low Power Payload").
    #[test]
    fn specification_examples() {
        // Device with 2 temperature sensors.
        assert_eq!(
            decode("03 67 01 10 05 67 00 FF"),
            json!({"temperature_3": 27.2, "temperature_5": 25.5})
        );
        // Device with temperature and acceleration sensors (two frames).
        assert_eq!(decode("01 67 FF D7"), json!({"temperature_1": -4.1}));
        assert_eq!(
            decode("06 71 04 D2 FB 2E 00 00"),
            json!({"accelerometer_6": {"x": 1.234, "y": -1.234, "z": 0.0}})
        );
        // Device with GPS.
        assert_eq!(
            decode("01 88 06 76 5f f2 96 0a 00 03 e8"),
            json!({"gps_1": {"latitude": 42.3519, "longitude": -87.9094, "altitude": 10.0}})
        );
    }

    /// The payload of TTS's own test (pkg/messageprocessors/cayennelpp), every IPSO type of the
    /// original list, with the values TTS expects.
    #[test]
    fn the_things_stack_test_payload() {
        let v = decode(
            "01 00 FF  02 01 64  03 02 15 4A  04 03 EA B6  05 65 01 F4  06 66 32  07 67 FF 64  \
             08 68 63  09 71 FE 58 00 0F 06 82  0A 73 29 EF  0B 86 01 63 02 31 FE 66  \
             0C 88 07 FD 87 00 BE F5 00 08 6A",
        );
        assert_eq!(
            v,
            json!({
                "digital_in_1": 255,
                "digital_out_2": 100,
                "analog_in_3": 54.5,
                "analog_out_4": -54.5,
                "luminosity_5": 500,
                "presence_6": 50,
                "temperature_7": -15.6,
                "relative_humidity_8": 49.5,
                "accelerometer_9": {"x": -0.424, "y": 0.015, "z": 1.666},
                "barometric_pressure_10": 1073.5,
                "gyrometer_11": {"x": 3.55, "y": 5.61, "z": -4.1},
                "gps_12": {"latitude": 52.3655, "longitude": 4.8885, "altitude": 21.54},
            })
        );
    }

    /// The extended types, as the ElectronicCats library writes them.
    #[test]
    fn extended_types() {
        let v = decode(
            "01 64 00 01 E2 40  02 74 01 F4  03 75 03 E8  04 76 00 0F 42 40  05 78 55  \
             06 79 FF 9C  07 7D 01 90  08 80 04 B0  09 82 00 00 30 39  0A 83 00 01 E2 40  \
             0B 84 01 0E  0C 85 65 5F 00 00  0D 87 FF 80 00  0E 8E 01",
        );
        assert_eq!(
            v,
            json!({
                "generic_sensor_1": 123456,
                "voltage_2": 5.0,
                "current_3": 1.0,
                "frequency_4": 1000000,
                "percentage_5": 85,
                "altitude_6": -100,
                "concentration_7": 400,
                "power_8": 1200,
                "distance_9": 12.345,
                "energy_10": 123.456,
                "direction_11": 270,
                "unix_time_12": 1700724736,
                "colour_13": {"r": 255, "g": 128, "b": 0},
                "switch_14": 1,
            })
        );
        assert_eq!(decode(""), json!({}));
    }

    #[test]
    fn bad_payloads_are_errors_with_the_place() {
        let e = |hex: &str| decode_uplink(&hex::decode(hex).unwrap()).unwrap_err();
        assert_eq!(
            e("036701"),
            LppError::Truncated {
                channel: 3,
                kind: 103,
                needed: 2,
                left: 1,
                at: 2
            }
        );
        assert_eq!(e("0367011005"), LppError::NoType { channel: 5, at: 4 });
        assert_eq!(
            e("01FF00"),
            LppError::UnknownType {
                channel: 1,
                kind: 255,
                at: 1
            }
        );
        assert!(e("01FF00").to_string().contains("unknown data type 255"));
    }

    /// Random payloads never panic: each is decoded or refused.
    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let (mut ok, mut refused) = (0, 0);
        for _ in 0..50_000 {
            let len = rng.random_range(0..64);
            let b: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            match decode_uplink(&b) {
                Ok(_) => ok += 1,
                Err(_) => refused += 1,
            }
        }
        assert!(ok > 0 && refused > 0, "{ok} decoded, {refused} refused");
        // Every known type at every length up to its own, and one byte past it.
        for t in 0..=255u8 {
            for len in 0..12 {
                let mut b = vec![1, t];
                b.extend(std::iter::repeat_n(0xFF, len));
                let _ = decode_uplink(&b);
            }
        }
    }

    #[test]
    fn downlinks_encode_as_tts_does() {
        let obj = |v: Value| v.as_object().unwrap().clone();
        // TTS's test: value_2 = -50.51 → 02 EC 45.
        assert_eq!(
            encode_downlink(&obj(json!({"value_2": -50.51}))).unwrap(),
            vec![2, 0xEC, 0x45]
        );
        assert_eq!(
            encode_downlink(&obj(json!({"value_9": 1, "value_1": 0.5}))).unwrap(),
            vec![1, 0, 50, 9, 0, 100]
        );
        assert_eq!(encode_downlink(&Map::new()).unwrap(), Vec::<u8>::new());
        for bad in [
            json!({"custom": 8}),
            json!({"value_256": 1}),
            json!({"value_1": "on"}),
            json!({"value_1": 400}),
        ] {
            assert!(encode_downlink(&obj(bad.clone())).is_err(), "{bad}");
        }
    }
}
