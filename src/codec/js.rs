//! JavaScript payload codecs (LoRa Alliance TS013, as The Things Stack and ChirpStack run them)
//! on QuickJS (`rquickjs`).
//!
//! A script is loaded once per configuration (not per uplink) into its own QuickJS runtime, on
//! its own thread: a script never runs on a tokio worker, and a slow one delays only the calls
//! waiting for it. The script defines `decodeUplink(input)` (`input.bytes`, an array of
//! numbers; `input.fPort`; `input.recvTime`, a `Date`) returning `{data, warnings, errors}`,
//! and may define `encodeDownlink(input)` (`input.data`, `input.fPort`) returning `{bytes,
//! fPort, warnings, errors}`. The Things Network v2 functions `Decoder(bytes, port)` and
//! `Encoder(object, port)` are used when the TS013 ones are absent, as TTS does.
//!
//! Every call is bounded, and a bad call costs that call only:
//! - time: `[gateway] codec_timeout_ms` through QuickJS's interrupt handler (an endless loop
//!   is stopped by an uncatchable exception);
//! - memory: [`MEMORY_LIMIT`] per script (a huge allocation fails inside the script);
//! - stack: [`STACK_LIMIT`] (deep recursion is a `RangeError`, not a crash of the thread);
//! - output: [`MAX_OUTPUT`] bytes of JSON (what is stored with the uplink).
//!
//! After a timeout or an exhausted memory limit the runtime is thrown away and the script
//! loaded again, so whatever state the stopped call left behind cannot affect the next one. A
//! throw, a wrong return shape or `errors` are reported as the call's error
//! ([`CodecError`]); the uplink is delivered without `decoded_payload`.

use super::{CodecError, Decoded, Encoded, UplinkInput};
use rquickjs::{Array, CaughtError, Context, Ctx, Function, Persistent, Runtime, Value};
use serde_json::{Map, Value as Json};
use std::cell::Cell;
use std::path::Path;
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Memory one script's runtime may hold (QuickJS `JS_SetMemoryLimit`). TTN device-repository
/// codecs use a few hundred KiB.
pub const MEMORY_LIMIT: usize = 16 * 1024 * 1024;
/// JavaScript stack (QuickJS `JS_SetMaxStackSize`); the script's thread has 4 MiB.
pub const STACK_LIMIT: usize = 512 * 1024;
const THREAD_STACK: usize = 4 * 1024 * 1024;
/// Largest script file read.
pub const MAX_SCRIPT: u64 = 1024 * 1024;
/// Largest result of one call, as JSON text: it is stored with every uplink.
pub const MAX_OUTPUT: usize = 64 * 1024;
/// Longest the script's own top-level code may run when it is loaded.
const LOAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Calls waiting for one script at most (more are refused at once: `busy`).
const QUEUE: usize = 64;
/// Calls between two runs of QuickJS's cycle collector (QuickJS also runs it by itself when
/// its heap grows past a threshold).
const GC_EVERY: u32 = 64;
/// Longest error text kept from a script.
const MAX_MESSAGE: usize = 300;

/// Captured before the user's script runs, so that a script redefining `JSON` or `Date` cannot
/// break how its results are read.
const GLUE: &str = r#"(function () {
  var stringify = JSON.stringify, parse = JSON.parse, D = Date;
  return function (f) {
    return {
      up: function (bytes, fPort, t) {
        if (f[0]) return stringify(f[0]({ bytes: bytes, fPort: fPort, recvTime: new D(t) }));
        if (f[1]) return stringify({ data: f[1](bytes, fPort) });
        return stringify({ errors: ["the script defines no decodeUplink(input) function"] });
      },
      down: function (data, fPort) {
        if (f[2]) return stringify(f[2]({ data: parse(data), fPort: fPort }));
        if (f[3]) return stringify({ bytes: f[3](parse(data), fPort) });
        return stringify({ errors: ["the script defines no encodeDownlink(input) function"] });
      }
    };
  };
})()"#;

/// Looked up after the script ran: `let`/`const` functions are not properties of `globalThis`.
const FUNCTIONS: &str = r#"[
  typeof decodeUplink === "function" ? decodeUplink : null,
  typeof Decoder === "function" ? Decoder : null,
  typeof encodeDownlink === "function" ? encodeDownlink : null,
  typeof Encoder === "function" ? Encoder : null
]"#;

/// Read a script file (size-capped).
fn read(path: &Path) -> Result<String, String> {
    let size = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .len();
    if size > MAX_SCRIPT {
        return Err(format!(
            "{} is {size} bytes; a codec script may have at most {MAX_SCRIPT}",
            path.display()
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Load the script as the daemon would (syntax, top-level code, a `decodeUplink` or `Decoder`
/// function): `lorastream check` and the start refuse a script that cannot work.
pub fn check_file(path: &Path) -> Result<(), String> {
    let source = read(path)?;
    let engine = Engine::load(&source, &path.display().to_string())?;
    if !engine.decodes {
        return Err(format!(
            "{} defines no decodeUplink(input) function (nor The Things Network v2 Decoder(bytes, port))",
            path.display()
        ));
    }
    Ok(())
}

/// One loaded script: a runtime, a context, and the two entry points.
struct Engine {
    // Field order = drop order: the functions before the context before the runtime.
    up: Persistent<Function<'static>>,
    down: Persistent<Function<'static>>,
    ctx: Context,
    rt: Runtime,
    /// When the running call must stop (read by the interrupt handler).
    deadline: Rc<Cell<Option<Instant>>>,
    decodes: bool,
}

/// What went wrong in a call, before it is told to the caller.
enum Fault {
    Timeout,
    Memory,
    Other(String),
}

impl Engine {
    fn load(source: &str, name: &str) -> Result<Engine, String> {
        let rt = Runtime::new().map_err(|e| format!("cannot start the JavaScript engine: {e}"))?;
        rt.set_memory_limit(MEMORY_LIMIT);
        rt.set_max_stack_size(STACK_LIMIT);
        let deadline: Rc<Cell<Option<Instant>>> = Rc::new(Cell::new(None));
        let d = deadline.clone();
        rt.set_interrupt_handler(Some(Box::new(move || {
            d.get().is_some_and(|t| Instant::now() >= t)
        })));
        let ctx =
            Context::full(&rt).map_err(|e| format!("cannot start the JavaScript engine: {e}"))?;
        deadline.set(Some(Instant::now() + LOAD_TIMEOUT));
        let loaded = ctx.with(|ctx| -> Result<_, String> {
            let glue: Function = eval(&ctx, GLUE, "glue").map_err(|e| message(&ctx, e))?;
            eval::<()>(&ctx, source, name).map_err(|e| format!("{name}: {}", message(&ctx, e)))?;
            let fns: Array = eval(&ctx, FUNCTIONS, "lookup").map_err(|e| message(&ctx, e))?;
            let decodes = (0..2).any(|i| fns.get::<Value>(i).is_ok_and(|v| v.is_function()));
            let entry: rquickjs::Object = glue.call((fns,)).map_err(|e| message(&ctx, e))?;
            let up: Function = entry.get("up").map_err(|e| message(&ctx, e))?;
            let down: Function = entry.get("down").map_err(|e| message(&ctx, e))?;
            Ok((
                Persistent::save(&ctx, up),
                Persistent::save(&ctx, down),
                decodes,
            ))
        });
        deadline.set(None);
        let (up, down, decodes) = loaded.map_err(|e| {
            if e.contains("interrupted") {
                format!("{name}: its top-level code ran longer than {LOAD_TIMEOUT:?}")
            } else {
                e
            }
        })?;
        Ok(Engine {
            up,
            down,
            ctx,
            rt,
            deadline,
            decodes,
        })
    }

    /// Call `up` or `down` with `args`, within `timeout`; the JSON text it returned.
    fn call<A>(&self, down: bool, timeout: Duration, args: A) -> Result<Json, Fault>
    where
        A: for<'js> FnOnce(&Ctx<'js>) -> rquickjs::Result<Vec<Value<'js>>>,
    {
        let started = Instant::now();
        self.deadline.set(Some(started + timeout));
        let r = self.ctx.with(|ctx| -> Result<Option<String>, String> {
            let f = if down { &self.down } else { &self.up };
            let f = f.clone().restore(&ctx).map_err(|e| e.to_string())?;
            let args = args(&ctx).map_err(|e| message(&ctx, e))?;
            let mut a = rquickjs::function::Args::new(ctx.clone(), args.len());
            for v in args {
                a.push_arg(v).map_err(|e| e.to_string())?;
            }
            let out: Value = f.call_arg(a).map_err(|e| message(&ctx, e))?;
            Ok(out.as_string().and_then(|s| s.to_string().ok()))
        });
        self.deadline.set(None);
        match r {
            Ok(Some(text)) if text.len() > MAX_OUTPUT => Err(Fault::Other(format!(
                "the result is {} bytes of JSON; at most {MAX_OUTPUT} are kept",
                text.len()
            ))),
            Ok(Some(text)) => serde_json::from_str(&text).map_err(|e| Fault::Other(e.to_string())),
            Ok(None) => Ok(Json::Null),
            Err(_) if started.elapsed() >= timeout => Err(Fault::Timeout),
            Err(e) if e.contains("out of memory") => Err(Fault::Memory),
            Err(e) => Err(Fault::Other(e)),
        }
    }
}

/// Evaluate global code in sloppy mode, as TTS and browsers run these scripts (ES5 codecs
/// assign undeclared variables; rquickjs would force strict mode).
fn eval<'js, V: rquickjs::FromJs<'js>>(
    ctx: &Ctx<'js>,
    src: &str,
    name: &str,
) -> rquickjs::Result<V> {
    let mut opts = rquickjs::context::EvalOptions::default();
    opts.strict = false;
    opts.filename = Some(name.to_string());
    ctx.eval_with_options(src, opts)
}

/// The text of a failed evaluation: the exception's message (and name), or the thrown value.
fn message(ctx: &Ctx<'_>, e: rquickjs::Error) -> String {
    let text = match CaughtError::from_error(ctx, e) {
        CaughtError::Exception(ex) => {
            let m = ex.message().unwrap_or_default();
            let name: Option<String> = ex.get("name").ok();
            match name {
                Some(n) if !n.is_empty() => format!("{n}: {m}"),
                _ => m,
            }
        }
        CaughtError::Value(v) => match v.as_string().and_then(|s| s.to_string().ok()) {
            Some(s) => format!("threw {s:?}"),
            None => format!("threw a {}", v.type_name()),
        },
        CaughtError::Error(e) => e.to_string(),
    };
    truncate(text)
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

enum Job {
    Decode {
        bytes: Vec<u8>,
        f_port: u8,
        recv_ms: f64,
        reply: oneshot::Sender<Result<Decoded, CodecError>>,
    },
    Encode {
        data: String,
        f_port: u8,
        reply: oneshot::Sender<Result<Encoded, CodecError>>,
    },
}

/// A loaded script, running on its own thread. Dropping the last handle ends the thread once
/// its current call is done.
#[derive(Debug)]
pub struct Script {
    jobs: mpsc::SyncSender<Job>,
    name: String,
    timeout: Duration,
}

impl Script {
    /// Read and load the script on a new thread; fails when it cannot be loaded.
    pub fn start(path: &Path, timeout: Duration) -> Result<Script, CodecError> {
        let name = path.display().to_string();
        let source = read(path).map_err(CodecError::Load)?;
        let (jobs, rx) = mpsc::sync_channel(QUEUE);
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_name = format!(
            "codec {}",
            path.file_name().map_or(String::new(), |n| n
                .to_string_lossy()
                .chars()
                .take(9)
                .collect())
        );
        let worker_name = name.clone();
        std::thread::Builder::new()
            .name(thread_name)
            .stack_size(THREAD_STACK)
            .spawn(move || worker(source, worker_name, timeout, rx, ready_tx))
            .map_err(|e| CodecError::Load(format!("cannot start a thread for {name}: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Script {
                jobs,
                name,
                timeout,
            }),
            Ok(Err(e)) => Err(CodecError::Load(e)),
            Err(_) => Err(CodecError::Load(format!("{name}: the codec thread ended"))),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// How long the caller waits for a reply: the call's own bound, plus what the thread may
    /// need to reload the script after a stopped call (a queue of waiting calls is answered
    /// `busy` rather than late).
    fn patience(&self) -> Duration {
        self.timeout * 2 + LOAD_TIMEOUT
    }

    async fn ask<T>(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<T, CodecError>>) -> Job,
    ) -> Result<T, CodecError> {
        let (reply, answer) = oneshot::channel();
        match self.jobs.try_send(job(reply)) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(_)) => return Err(CodecError::Busy),
            Err(mpsc::TrySendError::Disconnected(_)) => return Err(CodecError::Stopped),
        }
        match tokio::time::timeout(self.patience(), answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(CodecError::Stopped),
            Err(_) => Err(CodecError::Timeout(self.timeout)),
        }
    }

    pub async fn decode_uplink(&self, input: UplinkInput<'_>) -> Result<Decoded, CodecError> {
        let bytes = input.bytes.to_vec();
        let (f_port, recv_ms) = (input.f_port, input.recv_time_us as f64 / 1000.0);
        self.ask(|reply| Job::Decode {
            bytes,
            f_port,
            recv_ms,
            reply,
        })
        .await
    }

    pub async fn encode_downlink(
        &self,
        f_port: u8,
        data: &Map<String, Json>,
    ) -> Result<Encoded, CodecError> {
        let data = serde_json::to_string(data).map_err(|e| CodecError::Output(e.to_string()))?;
        self.ask(|reply| Job::Encode {
            data,
            f_port,
            reply,
        })
        .await
    }
}

fn worker(
    source: String,
    name: String,
    timeout: Duration,
    jobs: mpsc::Receiver<Job>,
    ready: mpsc::Sender<Result<(), String>>,
) {
    let mut engine = match Engine::load(&source, &name) {
        Ok(e) if e.decodes => {
            let _ = ready.send(Ok(()));
            e
        }
        Ok(_) => {
            let _ = ready.send(Err(format!(
                "{name} defines no decodeUplink(input) function"
            )));
            return;
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut calls: u32 = 0;
    while let Ok(job) = jobs.recv() {
        let reload = match job {
            Job::Decode {
                bytes,
                f_port,
                recv_ms,
                reply,
            } => {
                let r = engine.call(false, timeout, |ctx| {
                    let arr = Array::new(ctx.clone())?;
                    for (i, b) in bytes.iter().enumerate() {
                        arr.set(i, *b)?;
                    }
                    Ok(vec![
                        arr.into_value(),
                        Value::new_int(ctx.clone(), i32::from(f_port)),
                        Value::new_float(ctx.clone(), recv_ms),
                    ])
                });
                let (r, reload) = outcome(r, timeout, decoded);
                let _ = reply.send(r);
                reload
            }
            Job::Encode {
                data,
                f_port,
                reply,
            } => {
                let r = engine.call(true, timeout, |ctx| {
                    Ok(vec![
                        rquickjs::String::from_str(ctx.clone(), &data)?.into_value(),
                        Value::new_int(ctx.clone(), i32::from(f_port)),
                    ])
                });
                let (r, reload) = outcome(r, timeout, encoded);
                let _ = reply.send(r);
                reload
            }
        };
        if reload {
            // A fresh runtime: the stopped call's leftovers (half-built globals, a heap at
            // its limit) must not fail the next call. The script loaded before; should it not
            // load now (a top-level that depends on time), the thread ends and calls fail.
            drop(engine);
            match Engine::load(&source, &name) {
                Ok(e) => engine = e,
                Err(e) => {
                    tracing::error!(script = %name, error = %e, "cannot reload the codec script; its devices' payloads are no longer decoded");
                    return;
                }
            }
        } else {
            // Reference counting frees most of a call's garbage at once; the cycle collector
            // is for what is left, and it costs about as much as a call: not after each one.
            calls = calls.wrapping_add(1);
            if calls % GC_EVERY == 0 {
                engine.rt.run_gc();
            }
        }
    }
}

/// A call's result as the caller's, and whether the engine must be reloaded.
fn outcome<T>(
    r: Result<Json, Fault>,
    timeout: Duration,
    read: impl FnOnce(Json) -> Result<T, CodecError>,
) -> (Result<T, CodecError>, bool) {
    match r {
        Ok(v) => (read(v), false),
        Err(Fault::Timeout) => (Err(CodecError::Timeout(timeout)), true),
        Err(Fault::Memory) => (Err(CodecError::Memory(MEMORY_LIMIT)), true),
        Err(Fault::Other(e)) => (Err(CodecError::Script(e)), false),
    }
}

/// `errors`, when the result has any.
fn errors(o: &Map<String, Json>, what: &str) -> Result<(), CodecError> {
    match o.get("errors") {
        None | Some(Json::Null) => Ok(()),
        Some(Json::Array(a)) if a.is_empty() => Ok(()),
        Some(Json::Array(a)) => Err(CodecError::Script(truncate(
            a.iter()
                .map(|e| match e {
                    Json::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join("; "),
        ))),
        Some(other) => Err(CodecError::Output(format!(
            "{what} returned errors = {}, not an array of strings",
            kind(other)
        ))),
    }
}

fn warnings(o: &Map<String, Json>) -> Vec<String> {
    match o.get("warnings") {
        Some(Json::Array(a)) => a
            .iter()
            .map(|w| match w {
                Json::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// `decodeUplink`'s result: `{data: {...}, warnings?, errors?}`.
fn decoded(v: Json) -> Result<Decoded, CodecError> {
    let Json::Object(mut o) = v else {
        return Err(CodecError::Output(format!(
            "decodeUplink returned {}, not {{data, warnings, errors}}",
            if v.is_null() {
                "nothing (undefined or a function)"
            } else {
                kind(&v)
            }
        )));
    };
    errors(&o, "decodeUplink")?;
    let warnings = warnings(&o);
    match o.remove("data") {
        Some(Json::Object(data)) => Ok(Decoded { data, warnings }),
        None | Some(Json::Null) => Err(CodecError::Output(
            "decodeUplink returned no data (and no errors)".into(),
        )),
        Some(other) => Err(CodecError::Output(format!(
            "decodeUplink returned data = {}, not an object",
            kind(&other)
        ))),
    }
}

/// `encodeDownlink`'s result: `{bytes: [0..255, ...], fPort?, warnings?, errors?}`.
fn encoded(v: Json) -> Result<Encoded, CodecError> {
    let Json::Object(o) = v else {
        return Err(CodecError::Output(format!(
            "encodeDownlink returned {}, not {{bytes, fPort, warnings, errors}}",
            kind(&v)
        )));
    };
    errors(&o, "encodeDownlink")?;
    let bytes = match o.get("bytes") {
        Some(Json::Array(a)) => a
            .iter()
            .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| {
                CodecError::Output("encodeDownlink returned bytes that are not all 0..255".into())
            })?,
        other => {
            return Err(CodecError::Output(format!(
                "encodeDownlink returned bytes = {}, not an array of numbers",
                other.map_or("nothing", kind)
            )))
        }
    };
    let f_port = match o.get("fPort") {
        None | Some(Json::Null) => None,
        Some(p) => match p.as_u64() {
            Some(p @ 1..=223) => Some(p as u8),
            _ => {
                return Err(CodecError::Output(format!(
                    "encodeDownlink returned fPort = {p}, not 1..223"
                )))
            }
        },
    };
    Ok(Encoded { bytes, f_port })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TH_SENSOR: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/codecs/th-sensor.js"
    );
    const T: Duration = Duration::from_millis(100);

    fn script(dir: &tempfile::TempDir, name: &str, src: &str) -> std::path::PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, src).unwrap();
        p
    }

    fn input(bytes: &[u8], f_port: u8) -> UplinkInput<'_> {
        UplinkInput {
            bytes,
            f_port,
            // 2026-11-22T10:00:00Z
            recv_time_us: 1_795_341_600_000_000,
        }
    }

    /// A codec in the style of the TTN device repository: helpers, Math, DataView over a
    /// Uint8Array, warnings, errors, encodeDownlink with its own fPort.
    #[tokio::test]
    async fn a_device_repository_style_codec_works_unchanged() {
        let s = Script::start(Path::new(TH_SENSOR), T).unwrap();
        let bytes = hex::decode("CBF809C4025801 0A28 002A".replace(' ', "")).unwrap();
        let d = s.decode_uplink(input(&bytes, 2)).await.unwrap();
        assert_eq!(
            Json::Object(d.data),
            json!({
                "battery_v": 3.064, "battery_status": "good", "temperature": 25,
                "humidity": 60, "ext_sensor": "temperature", "ext_temperature": 26,
                "sequence": 42, "received_hour": 10
            })
        );
        assert!(d.warnings.is_empty());
        // A disconnected probe and a low battery: warnings.
        let bytes = hex::decode("07D0FF9C03E88100000001").unwrap();
        let d = s.decode_uplink(input(&bytes, 2)).await.unwrap();
        assert_eq!(d.data["temperature"], json!(-1));
        assert_eq!(
            d.warnings,
            [
                "external probe disconnected".to_string(),
                "battery low".into()
            ]
        );
        // errors → the call's error.
        let e = s.decode_uplink(input(&[1, 2], 2)).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "JavaScript: payload too short: 2 bytes, 11 expected"
        );
        let e = s.decode_uplink(input(&bytes, 9)).await.unwrap_err();
        assert!(e.to_string().contains("unknown FPort 9"), "{e}");
        // encodeDownlink, with the fPort the codec chose.
        let data = json!({"interval_s": 600});
        let enc = s
            .encode_downlink(1, data.as_object().unwrap())
            .await
            .unwrap();
        assert_eq!(
            enc,
            Encoded {
                bytes: vec![1, 0, 2, 0x58],
                f_port: Some(3)
            }
        );
        let bad = json!({"interval_s": "often"});
        let e = s
            .encode_downlink(1, bad.as_object().unwrap())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("interval_s must be"), "{e}");
    }

    /// TTN v2 `Decoder`/`Encoder`, `const` arrow functions, sloppy-mode ES5.
    #[tokio::test]
    async fn legacy_and_modern_function_styles() {
        let dir = tempfile::tempdir().unwrap();
        let v2 = script(
            &dir,
            "v2.js",
            "function Decoder(bytes, port) { total = bytes.length; return { port: port, n: total }; }\n\
             function Encoder(obj, port) { return [obj.on ? 1 : 0]; }",
        );
        let s = Script::start(&v2, T).unwrap();
        let d = s.decode_uplink(input(&[1, 2, 3], 7)).await.unwrap();
        assert_eq!(Json::Object(d.data), json!({"port": 7, "n": 3}));
        let on = json!({"on": true});
        let enc = s.encode_downlink(4, on.as_object().unwrap()).await.unwrap();
        assert_eq!((enc.bytes, enc.f_port), (vec![1], None));

        let es6 = script(
            &dir,
            "es6.js",
            "const decodeUplink = ({ bytes }) => ({ data: { sum: bytes.reduce((a, b) => a + b, 0) } });",
        );
        let s = Script::start(&es6, T).unwrap();
        let d = s.decode_uplink(input(&[1, 2, 3], 1)).await.unwrap();
        assert_eq!(Json::Object(d.data), json!({"sum": 6}));
        let e = s
            .encode_downlink(1, &Map::new())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("no encodeDownlink"), "{e}");
    }

    /// Hostile scripts: each bad call fails alone, and the next call works.
    #[tokio::test]
    async fn endless_loops_throws_garbage_and_huge_allocations_cost_one_call() {
        let dir = tempfile::tempdir().unwrap();
        let p = script(
            &dir,
            "hostile.js",
            r#"var calls = 0;
function decodeUplink(input) {
  calls++;
  switch (input.fPort) {
    case 1: while (true) {}
    case 2: throw new TypeError("bad byte " + input.bytes[0]);
    case 3: return 42;
    case 4: var a = []; for (;;) a.push(new Array(100000).fill(1));
    case 5: return "x".repeat(1 << 30);
    case 6: return { data: [1, 2] };
    case 7: throw "a string";
    case 8: function f(n) { return f(n + 1) + 1; } return f(0);
    case 9: return undefined;
    case 10: var big = {}; for (var i = 0; i < 20000; i++) big["k" + i] = i; return { data: big };
    case 11: return new Uint8Array(1 << 30);
    default: return { data: { calls: calls, ok: true } };
  }
}"#,
        );
        let ok = |d: Result<Decoded, CodecError>| {
            let d = d.unwrap();
            assert_eq!(d.data["ok"], json!(true));
        };
        // The endless loop, stopped at codec_timeout_ms.
        let s = Script::start(&p, T).unwrap();
        ok(s.decode_uplink(input(&[0], 100)).await);
        let started = Instant::now();
        let e = s.decode_uplink(input(&[0], 1)).await.unwrap_err();
        assert_eq!(e, CodecError::Timeout(T));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        ok(s.decode_uplink(input(&[0], 100)).await);
        // The rest with time to spare, so that a slow machine (an emulated ARM board) meets
        // each bound under test before the clock.
        let s = Script::start(&p, Duration::from_secs(5)).unwrap();
        let e = s.decode_uplink(input(&[7], 2)).await.unwrap_err();
        assert_eq!(e.to_string(), "JavaScript: TypeError: bad byte 7");
        let e = s.decode_uplink(input(&[0], 3)).await.unwrap_err();
        assert!(e.to_string().contains("returned a number"), "{e}");
        let e = s.decode_uplink(input(&[0], 4)).await.unwrap_err();
        assert_eq!(e, CodecError::Memory(MEMORY_LIMIT));
        ok(s.decode_uplink(input(&[0], 100)).await);
        let e = s.decode_uplink(input(&[0], 5)).await.unwrap_err();
        assert!(
            matches!(e, CodecError::Memory(_) | CodecError::Script(_)),
            "{e:?}"
        );
        let e = s.decode_uplink(input(&[0], 6)).await.unwrap_err();
        assert!(e.to_string().contains("data = an array"), "{e}");
        let e = s.decode_uplink(input(&[0], 7)).await.unwrap_err();
        assert!(e.to_string().contains("threw \"a string\""), "{e}");
        let e = s.decode_uplink(input(&[0], 8)).await.unwrap_err();
        assert!(e.to_string().contains("stack"), "{e}");
        let e = s.decode_uplink(input(&[0], 9)).await.unwrap_err();
        assert!(e.to_string().contains("returned nothing"), "{e}");
        let e = s.decode_uplink(input(&[0], 10)).await.unwrap_err();
        assert!(e.to_string().contains("at most 65536"), "{e}");
        let e = s.decode_uplink(input(&[0], 11)).await.unwrap_err();
        assert!(
            matches!(e, CodecError::Memory(_) | CodecError::Script(_)),
            "{e:?}"
        );
        ok(s.decode_uplink(input(&[0], 100)).await);
    }

    #[test]
    fn scripts_that_cannot_work_are_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let e = |src: &str| check_file(&script(&dir, "x.js", src)).unwrap_err();
        assert!(
            e("function decodeUplink(input) {").contains("SyntaxError"),
            "{}",
            e("function decodeUplink(input) {")
        );
        assert!(e("var x = 1;").contains("defines no decodeUplink"));
        assert!(e("throw new Error('boom');").contains("boom"));
        assert!(e("while (true) {}").contains("top-level code ran longer"));
        assert!(check_file(&dir.path().join("missing.js"))
            .unwrap_err()
            .contains("cannot read"));
        check_file(Path::new(TH_SENSOR)).unwrap();
    }
}
