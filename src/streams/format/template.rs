//! Jinja-style templates over the TTS JSON (`format = "template"`, `template_file = "..."`).
//!
//! Role: render each record into a message body of the user's shape (flat JSON for ThingsBoard,
//! CSV lines, anything textual), with minijinja. The context is the record's TTS JSON, so
//! `{{ end_device_ids.device_id }}`, `{{ uplink_message.f_cnt }}` and
//! `{{ uplink_message.decoded_payload.temperature }}` mean what they mean in the `tts` format.
//!
//! Decisions (documented for users in docs/formats.md):
//! - **Checked at load** ([`Template::compile`], for `lorastream check` and reload): syntax
//!   errors with the template's line; top-level names other than the TTS JSON's own
//!   ([`CONTEXT_ROOTS`]) — a typo like `uplnk_message` fails at check, not at the first uplink;
//!   unknown filters/tests/functions met while rendering a sample uplink. A misspelled filter in
//!   a branch the sample does not take is only found at render time (a [`TemplateError::Render`]).
//! - **Undefined values**: minijinja's `SemiStrict`. Printing, iterating or looking into a
//!   missing value is an error (a silently empty `"temperature": ,` would be worse: invalid JSON
//!   delivered as if fine); testing it is allowed, so optional fields are written
//!   `{% if uplink_message.decoded_payload %}...{% endif %}`, or
//!   `(uplink_message.decoded_payload or {}).temperature | default(0)` (a codec error leaves
//!   `decoded_payload` out). A render error is returned to the stream, which logs and counts it.
//! - **No auto-escaping**: output is whatever the template says; use `| tojson` to write a JSON
//!   string or value, `| csv` for a CSV field.
//! - **No file access**: built without `include`/`extends`/`import` (minijinja's
//!   `multi_template` feature is off).
//! - **Bounded**: each render gets a fuel budget ([`Limits::fuel`], minijinja charges
//!   instructions and allocated values), the recursion limit, and an output cap
//!   ([`Limits::max_output`]) enforced while writing; a template cannot loop or grow forever.
//!
//! Extra filters: `timestamp_ms` / `timestamp_s` (RFC 3339 → Unix ms / s, for ThingsBoard's
//! `ts`), `b64_hex` (base64 → lower-case hex, for `frm_payload`), `csv` (RFC 4180 field quoting).
//!
//! Guarantees: rendering never panics; every failure is a [`TemplateError`] naming the template
//! (and the line when minijinja knows it).

use base64::Engine;
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Serde, Value};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior};
use std::io;
use std::time::UNIX_EPOCH;

/// The top-level keys of the TTS JSON layouts a template may use (uplinks, joins, gateway
/// frames; `lorastream` appears on messages delivered from the backlog).
pub const CONTEXT_ROOTS: &[&str] = &[
    "end_device_ids",
    "correlation_ids",
    "received_at",
    "uplink_message",
    "join_accept",
    "gateway_ids",
    "lorastream",
];

/// Bounds of one render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// minijinja fuel: roughly instructions, plus about 1 per 64 bytes of values made.
    pub fuel: u64,
    /// Largest body, in bytes.
    pub max_output: usize,
}

impl Default for Limits {
    /// 100 000 fuel (a ThingsBoard template uses well under 1 000; ~6 MB of values at most)
    /// and 256 KiB of output (more than any MQTT/HTTP body of one uplink should be).
    fn default() -> Self {
        Limits {
            fuel: 100_000,
            max_output: 256 * 1024,
        }
    }
}

/// A template problem, at load or at render.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    /// The text does not parse.
    #[error("{name}:{line}: template syntax error: {message}")]
    Syntax {
        name: String,
        line: usize,
        message: String,
    },
    /// A top-level name that the TTS JSON does not have.
    #[error("{name}:{line}: unknown variable {variable:?} (the context has: {roots})", roots = CONTEXT_ROOTS.join(", "))]
    UnknownVariable {
        name: String,
        /// First line the name appears on (0 if not found textually).
        line: usize,
        variable: String,
    },
    /// An unknown filter, test or function.
    #[error("{name}:{line}: {message}")]
    Unknown {
        name: String,
        line: usize,
        message: String,
    },
    /// Rendering failed (undefined value, bad operation, ...).
    #[error("{name}:{line}: cannot render: {message}", line = line.map_or_else(|| "?".to_string(), |l| l.to_string()))]
    Render {
        name: String,
        line: Option<usize>,
        message: String,
    },
    /// The render used up its fuel (an endless or too costly loop).
    #[error("{name}: rendering stopped: fuel ({fuel}) used up")]
    OutOfFuel { name: String, fuel: u64 },
    /// The body would be larger than the cap.
    #[error("{name}: rendering stopped: output larger than {limit} bytes")]
    OutputTooLarge { name: String, limit: usize },
    /// The context is not valid JSON.
    #[error("{name}: the record's JSON is invalid: {message}")]
    Context { name: String, message: String },
}

/// A compiled template, ready to render records.
#[derive(Debug)]
pub struct Template {
    env: Environment<'static>,
    name: String,
    source: String,
    limits: Limits,
}

/// Which kind of message the load-time check renders: a stream scoped to gateways publishes
/// raw frames, every other stream device uplinks and joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sample {
    #[default]
    Uplink,
    GatewayFrame,
}

/// A sample raw gateway frame, for gateway-scoped streams.
const SAMPLE_FRAME: &str = r#"{
  "gateway_ids": {"gateway_id": "eui-aa555a0000000000", "eui": "AA555A0000000000"},
  "correlation_ids": ["lorastream:frame:01JD0000000000000000000000"],
  "received_at": "2026-11-22T10:00:00.123456Z",
  "uplink_message": {"raw_payload": "QAEAACaAAQABqgECAwQ=", "m_type": "UNCONFIRMED_UP",
    "dev_addr": "26000001",
    "settings": {"data_rate": {"lora": {"bandwidth": 125000, "spreading_factor": 7, "coding_rate": "4/5"}},
      "frequency": "868100000", "timestamp": 2000123},
    "rx_metadata": [{"gateway_ids": {"gateway_id": "eui-aa555a0000000000", "eui": "AA555A0000000000"},
      "timestamp": 2000123, "rssi": -57, "channel_rssi": -57, "snr": 9.5, "channel_index": 2,
      "rf_chain": 0, "received_at": "2026-11-22T10:00:00.123456Z"}],
    "crc_status": true, "received_at": "2026-11-22T10:00:00.123456Z"}
}"#;

/// A sample uplink (the contract's example with a decoded payload) for the load-time check.
const SAMPLE: &str = r#"{
  "end_device_ids": {"device_id": "soil-1", "application_ids": {"application_id": "farm"},
    "dev_eui": "70B3D57ED0000001", "join_eui": "0000000000000000", "dev_addr": "26000001"},
  "correlation_ids": ["lorastream:uplink:01JD0000000000000000000000"],
  "received_at": "2026-11-22T10:00:00.123456Z",
  "uplink_message": {"f_port": 1, "f_cnt": 42, "frm_payload": "AQIDBA==",
    "decoded_payload": {"temperature": 21.5, "humidity": 40},
    "rx_metadata": [{"gateway_ids": {"gateway_id": "eui-aa555a0000000000", "eui": "AA555A0000000000"},
      "timestamp": 2000123, "rssi": -57, "channel_rssi": -57, "snr": 9.5, "channel_index": 2,
      "rf_chain": 0, "received_at": "2026-11-22T10:00:00.123456Z"}],
    "settings": {"data_rate": {"lora": {"bandwidth": 125000, "spreading_factor": 7, "coding_rate": "4/5"}},
      "frequency": "868100000", "timestamp": 2000123},
    "confirmed": false, "received_at": "2026-11-22T10:00:00.123456Z"}
}"#;

/// Writer that refuses to grow past the cap (rendering stops at the first refused write).
struct Capped {
    buf: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if self.buf.len() + b.len() > self.limit {
            self.overflowed = true;
            return Err(io::Error::other("template output cap reached"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// RFC 3339 (`2026-11-22T10:00:00.123456Z`, as `received_at`) → Unix milliseconds.
fn timestamp_ms(s: &str) -> Result<i64, Error> {
    let t = humantime::parse_rfc3339(s.trim()).map_err(|e| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("timestamp_ms: {s:?} is not RFC 3339: {e}"),
        )
    })?;
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Ok(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// RFC 3339 → Unix seconds (whole).
fn timestamp_s(s: &str) -> Result<i64, Error> {
    timestamp_ms(s).map(|ms| ms / 1000)
}

/// base64 (as `frm_payload`) → lower-case hex.
fn b64_hex(s: &str) -> Result<String, Error> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map(hex::encode)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("b64_hex: {e}")))
}

/// One CSV field (RFC 4180): quoted, quotes doubled, when it holds `,`, `"`, CR or LF (or
/// starts/ends with a space, which some readers trim).
fn csv(v: Value) -> String {
    let s = match v.as_str() {
        Some(s) => s.to_string(),
        None if v.is_none() || v.is_undefined() => String::new(),
        None => v.to_string(),
    };
    if s.contains([',', '"', '\r', '\n']) || s.starts_with(' ') || s.ends_with(' ') {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// minijinja's message without its own ` (in name:line)` suffix (the error names those).
fn message(e: &Error) -> String {
    match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    }
}

/// First line on which `word` appears in `source` as a whole identifier (0 if none).
fn line_of(source: &str, word: &str) -> usize {
    for (i, line) in source.lines().enumerate() {
        let mut rest = line;
        while let Some(pos) = rest.find(word) {
            let before = rest[..pos].chars().next_back();
            let after = rest[pos + word.len()..].chars().next();
            let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
            if !ident(before) && !ident(after) {
                return i + 1;
            }
            rest = &rest[pos + word.len()..];
        }
    }
    0
}

impl Template {
    /// Compiles `source` (`name` = the template file, for messages) with default [`Limits`],
    /// checked on a sample uplink.
    pub fn compile(name: &str, source: &str) -> Result<Template, TemplateError> {
        Template::compile_with_limits(name, source, Limits::default(), Sample::Uplink)
    }

    /// [`Template::compile`], checked on a sample of the messages the stream sends.
    pub fn compile_for(
        name: &str,
        source: &str,
        sample: Sample,
    ) -> Result<Template, TemplateError> {
        Template::compile_with_limits(name, source, Limits::default(), sample)
    }

    /// Compiles `source` and checks it (see the module docs: syntax, top-level names, unknown
    /// filters/tests/functions on a sample message).
    pub fn compile_with_limits(
        name: &str,
        source: &str,
        limits: Limits,
        sample: Sample,
    ) -> Result<Template, TemplateError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_fuel(Some(limits.fuel));
        // Keep template text as written (Jinja's default drops one trailing newline, which
        // would merge CSV lines).
        if let Ok(syntax) = SyntaxConfig::builder().keep_trailing_newline(true).build() {
            env.set_syntax(syntax);
        }
        env.add_filter("timestamp_ms", timestamp_ms);
        env.add_filter("timestamp_s", timestamp_s);
        env.add_filter("b64_hex", b64_hex);
        env.add_filter("csv", csv);
        env.add_template_owned(name.to_string(), source.to_string())
            .map_err(|e| TemplateError::Syntax {
                name: name.to_string(),
                line: e.line().unwrap_or(0),
                message: e.detail().unwrap_or("invalid template").to_string(),
            })?;
        let t = Template {
            env,
            name: name.to_string(),
            source: source.to_string(),
            limits,
        };
        t.check(sample)?;
        Ok(t)
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The load-time checks after parsing.
    fn check(&self, sample: Sample) -> Result<(), TemplateError> {
        let source = self.source.as_str();
        let tmpl = self
            .env
            .get_template(&self.name)
            .map_err(|e| self.render_error(e))?;
        let globals: Vec<String> = self.env.globals().map(|(k, _)| k.to_string()).collect();
        let mut unknown: Vec<String> = tmpl
            .undeclared_variables(false)
            .into_iter()
            .filter(|v| !CONTEXT_ROOTS.contains(&v.as_str()) && !globals.contains(v))
            .collect();
        unknown.sort();
        if let Some(variable) = unknown.into_iter().next() {
            return Err(TemplateError::UnknownVariable {
                name: self.name.clone(),
                line: line_of(source, &variable),
                variable,
            });
        }
        // A sample render with lenient lookups: only unknown filters/tests/functions count
        // (a missing field of the sample is not the template's fault).
        let mut probe = self.env.clone();
        probe.set_undefined_behavior(UndefinedBehavior::Chainable);
        let sample: serde_json::Value = serde_json::from_str(match sample {
            Sample::Uplink => SAMPLE,
            Sample::GatewayFrame => SAMPLE_FRAME,
        })
        .unwrap_or_default();
        if let Ok(t) = probe.get_template(&self.name) {
            if let Err(e) = t.render(Value::from(Serde(&sample))) {
                if matches!(
                    e.kind(),
                    ErrorKind::UnknownFilter | ErrorKind::UnknownTest | ErrorKind::UnknownFunction
                ) {
                    return Err(TemplateError::Unknown {
                        name: self.name.clone(),
                        line: e.line().unwrap_or(0),
                        message: message(&e),
                    });
                }
            }
        }
        Ok(())
    }

    fn render_error(&self, e: Error) -> TemplateError {
        let name = self.name.clone();
        match e.kind() {
            ErrorKind::OutOfFuel => TemplateError::OutOfFuel {
                name,
                fuel: self.limits.fuel,
            },
            _ => TemplateError::Render {
                name,
                line: e.line(),
                message: message(&e),
            },
        }
    }

    /// The template's name (the file it came from).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Renders a record whose TTS JSON is `tts`.
    pub fn render(&self, tts: &serde_json::Value) -> Result<String, TemplateError> {
        let tmpl = self
            .env
            .get_template(&self.name)
            .map_err(|e| self.render_error(e))?;
        let mut out = Capped {
            buf: Vec::new(),
            limit: self.limits.max_output,
            overflowed: false,
        };
        let res = tmpl.render_captured_to(Value::from(Serde(tts)), &mut out);
        if out.overflowed {
            return Err(TemplateError::OutputTooLarge {
                name: self.name.clone(),
                limit: self.limits.max_output,
            });
        }
        res.map_err(|e| self.render_error(e))?;
        // minijinja writes UTF-8 text only.
        String::from_utf8(out.buf).map_err(|e| TemplateError::Render {
            name: self.name.clone(),
            line: None,
            message: e.to_string(),
        })
    }

    /// Renders a record from its TTS JSON text (`record_json(r, d)`).
    pub fn render_json(&self, tts_json: &[u8]) -> Result<String, TemplateError> {
        let v: serde_json::Value =
            serde_json::from_slice(tts_json).map_err(|e| TemplateError::Context {
                name: self.name.clone(),
                message: e.to_string(),
            })?;
        self.render(&v)
    }
}

/// ThingsBoard's device telemetry shape (`{"ts": <ms>, "values": {...}}`) from a decoded
/// payload: the example shipped in docs/formats.md.
pub const THINGSBOARD_EXAMPLE: &str = r#"{"ts": {{ received_at | timestamp_ms }}, "values": {"temperature": {{ uplink_message.decoded_payload.temperature }}, "rssi": {{ uplink_message.rx_metadata[0].rssi }}, "device": {{ end_device_ids.device_id | tojson }}}}"#;

/// One CSV line per uplink (`received_at,device,f_cnt,f_port,payload hex,rssi,snr`).
pub const CSV_EXAMPLE: &str = "{{ received_at | csv }},{{ end_device_ids.device_id | csv }},{{ uplink_message.f_cnt }},{{ uplink_message.f_port | default('') }},{{ uplink_message.frm_payload | default('') | b64_hex }},{{ uplink_message.rx_metadata[0].rssi }},{{ uplink_message.rx_metadata[0].snr }}\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> serde_json::Value {
        serde_json::from_str(SAMPLE).unwrap()
    }

    #[test]
    fn renders_the_examples() {
        let t = Template::compile("tb.j2", THINGSBOARD_EXAMPLE).unwrap();
        let out = t.render(&sample()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["ts"], 1_795_341_600_123i64);
        assert_eq!(v["values"]["temperature"], 21.5);
        assert_eq!(v["values"]["rssi"], -57);
        assert_eq!(v["values"]["device"], "soil-1");

        let t = Template::compile("csv.j2", CSV_EXAMPLE).unwrap();
        assert_eq!(
            t.render(&sample()).unwrap(),
            "2026-11-22T10:00:00.123456Z,soil-1,42,1,01020304,-57,9.5\n"
        );
    }

    #[test]
    fn load_time_errors_name_the_line() {
        let e = Template::compile("t.j2", "line one\n{{ uplink_message.f_cnt ").unwrap_err();
        assert!(matches!(e, TemplateError::Syntax { line: 2, .. }), "{e:?}");
        let e = Template::compile("t.j2", "a\n\n{{ uplnk_message.f_cnt }}").unwrap_err();
        assert_eq!(
            e,
            TemplateError::UnknownVariable {
                name: "t.j2".into(),
                line: 3,
                variable: "uplnk_message".into()
            }
        );
        let e = Template::compile("t.j2", "x\n{{ received_at | no_such_filter }}").unwrap_err();
        assert!(matches!(e, TemplateError::Unknown { line: 2, .. }), "{e:?}");
        // Names set by the template and minijinja's globals are fine.
        Template::compile(
            "t.j2",
            "{% set x = 1 %}{% for i in range(3) %}{{ x + i }}{% endfor %}{{ namespace() is defined }}",
        )
        .unwrap();
    }

    #[test]
    fn render_errors_are_typed() {
        let t = Template::compile("t.j2", "{{ uplink_message.decoded_payload.pressure }}").unwrap();
        let e = t.render(&sample()).unwrap_err();
        assert!(
            matches!(e, TemplateError::Render { line: Some(1), .. }),
            "{e:?}"
        );
        // Optional fields: test them, or default on a present parent.
        let t = Template::compile(
            "t.j2",
            "{% if uplink_message.decoded_payload.pressure is defined %}p{% else %}-{% endif %}{{ uplink_message.decoded_payload.pressure | default(0) }}",
        )
        .unwrap();
        assert_eq!(t.render(&sample()).unwrap(), "-0");
        assert!(matches!(
            t.render_json(b"{"),
            Err(TemplateError::Context { .. })
        ));
    }

    #[test]
    fn bounded() {
        let t = Template::compile(
            "loop.j2",
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        )
        .unwrap();
        assert!(matches!(
            t.render(&sample()),
            Err(TemplateError::OutOfFuel { .. })
        ));
        let t = Template::compile_with_limits(
            "big.j2",
            "{% for i in range(1000) %}0123456789{% endfor %}",
            Limits {
                fuel: 1_000_000,
                max_output: 5000,
            },
            Sample::Uplink,
        )
        .unwrap();
        assert!(matches!(
            t.render(&sample()),
            Err(TemplateError::OutputTooLarge { limit: 5000, .. })
        ));
        let t = Template::compile(
            "rec.j2",
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        )
        .unwrap();
        assert!(t.render(&sample()).is_err());
        let t = Template::compile("mul.j2", "{{ 'x' * 100000000 }}").unwrap();
        assert!(t.render(&sample()).is_err());
    }

    #[test]
    fn filters() {
        assert_eq!(timestamp_ms("1970-01-01T00:00:01.5Z").unwrap(), 1500);
        assert!(timestamp_ms("yesterday").is_err());
        assert_eq!(b64_hex("AQIDBA==").unwrap(), "01020304");
        assert_eq!(csv(Value::from("a,\"b\"")), "\"a,\"\"b\"\"\"");
        assert_eq!(csv(Value::from(3)), "3");
        assert_eq!(line_of("xa\n a b", "a"), 2);
    }
}
