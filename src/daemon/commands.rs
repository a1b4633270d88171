//! Remote commands (contract: "Devices and configuration at run time"): a stream with
//! `commands = true` takes a request on `{prefix}/gateways/{eui}/command/{name}` and answers on
//! `.../command/{name}/reply` with the request's `id`, `"ok"` and a `result` or an `error`. The
//! cloud connection the gateway already opens carries them: no inbound port, no login.
//!
//! Commands: `status` (the `/health` document), `devices` (id, application, DevEUI, class,
//! DevAddr and counters; never a key), `logs` (`{"lines": N}`: the last lines of the log, at
//! most [`crate::logs::RING_LINES`]), `log_level` (`{"level": "debug"}`), `reload` (as SIGHUP),
//! `device_upsert` (`{"device": {...}}`) and `device_delete` (`{"device": "<id>"}`), which edit
//! one file of `devices_dir` ([`crate::config::remote_devices`]) and reload. All but the first
//! three are carried out by the command line's run loop, which holds the configuration path and
//! the log handle ([`Control`]).

use super::health::Sources;
use crate::downlink::SharedRegistry;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

/// The commands, for error messages.
pub const NAMES: &str = "status, reload, devices, device_upsert, device_delete, logs, log_level";

/// What only the run loop can do; it answers on the channel.
#[derive(Debug)]
pub enum Control {
    /// Re-read the configuration (as SIGHUP); the answer says what changed.
    Reload(oneshot::Sender<Result<Value, String>>),
    /// Change the log filter until the next reload or restart.
    LogLevel(String, oneshot::Sender<Result<Value, String>>),
    /// Add or replace a device in `devices_dir` (its `[[device]]` keys), then reload.
    DeviceUpsert(Value, oneshot::Sender<Result<Value, String>>),
    /// Remove a device added by `DeviceUpsert`, then reload.
    DeviceDelete(String, oneshot::Sender<Result<Value, String>>),
}

/// Commands running at once, over all streams; more are answered "busy" at once (a flood of
/// requests cannot pile up tasks).
pub const MAX_RUNNING: usize = 8;

/// The command service every commanding stream shares.
#[derive(Clone)]
pub(crate) struct Commands {
    sources: Sources,
    registry: SharedRegistry,
    control: mpsc::Sender<Control>,
    running: Arc<Semaphore>,
    /// Each command is logged (an audit trail of what the cloud asked), rate-limited.
    log: Arc<Mutex<crate::logs::LogLimiter>>,
}

impl Commands {
    pub fn new(sources: Sources, registry: SharedRegistry, control: mpsc::Sender<Control>) -> Self {
        Commands {
            sources,
            registry,
            control,
            running: Arc::new(Semaphore::new(MAX_RUNNING)),
            log: Arc::new(Mutex::new(crate::logs::LogLimiter::new())),
        }
    }

    /// A slot to run one command, or None when [`MAX_RUNNING`] run already.
    pub fn try_start(&self) -> Option<OwnedSemaphorePermit> {
        self.running.clone().try_acquire_owned().ok()
    }

    /// The answer to a command that found no slot.
    pub fn busy(&self, stream: &str, name: &str, body: &[u8]) -> Value {
        self.note(stream, name, "busy");
        let id = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|r| r.get("id").cloned())
            .unwrap_or(Value::Null);
        json!({"id": id, "ok": false, "error": format!("busy: {MAX_RUNNING} commands are running; try again")})
    }

    /// Count the command and log it (rate-limited).
    fn note(&self, stream: &str, name: &str, result: &'static str) {
        let known = NAMES.split(", ").find(|n| *n == name).unwrap_or("unknown");
        self.sources.metrics.remote_command(known, result);
        if self.log.lock().map(|mut l| l.allow()).unwrap_or(false) {
            tracing::info!(stream, command = known, result, "remote command");
        }
    }

    /// Run the command `name` (received on `stream`) with the request `body`; the reply
    /// document.
    pub async fn run(&self, stream: &str, name: &str, body: &[u8]) -> Value {
        let req: Result<Value, _> = if body.iter().all(u8::is_ascii_whitespace) {
            Ok(json!({}))
        } else {
            serde_json::from_slice(body)
        };
        let id = req
            .as_ref()
            .ok()
            .and_then(|r| r.get("id").cloned())
            .unwrap_or(Value::Null);
        let r = match req {
            Err(e) => Err(format!("the request is not JSON: {e}")),
            Ok(req) => self.dispatch(name, &req).await,
        };
        self.note(stream, name, if r.is_ok() { "ok" } else { "error" });
        match r {
            Ok(result) => json!({"id": id, "ok": true, "result": result}),
            Err(error) => json!({"id": id, "ok": false, "error": error}),
        }
    }

    async fn dispatch(&self, name: &str, req: &Value) -> Result<Value, String> {
        match name {
            "status" => serde_json::to_value(self.sources.health()).map_err(|e| e.to_string()),
            "devices" => Ok(self.devices()),
            "logs" => {
                let n = match req.get("lines") {
                    None => 100,
                    Some(v) => v
                        .as_u64()
                        .filter(|n| *n > 0)
                        .ok_or("\"lines\" must be a positive number")?
                        as usize,
                };
                let lines = crate::logs::recent(n.min(crate::logs::RING_LINES));
                Ok(json!({ "lines": lines }))
            }
            "log_level" => {
                let level = req
                    .get("level")
                    .and_then(Value::as_str)
                    .ok_or("give the filter as \"level\", e.g. {\"level\": \"debug\"}")?;
                self.ask(|tx| Control::LogLevel(level.to_string(), tx))
                    .await
            }
            "reload" => self.ask(Control::Reload).await,
            "device_upsert" => {
                let device = req
                    .get("device")
                    .filter(|d| d.is_object())
                    .ok_or("give the device as \"device\": {<the keys of a [[device]] table>}")?;
                self.ask(|tx| Control::DeviceUpsert(device.clone(), tx))
                    .await
            }
            "device_delete" => {
                let id = req
                    .get("device")
                    .and_then(Value::as_str)
                    .ok_or("give the device's id as \"device\": \"<id>\"")?;
                self.ask(|tx| Control::DeviceDelete(id.to_string(), tx))
                    .await
            }
            other => Err(format!("unknown command {other:?}; commands: {NAMES}")),
        }
    }

    /// Ask the run loop and wait for its answer (bounded).
    async fn ask(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<Value, String>>) -> Control,
    ) -> Result<Value, String> {
        let (tx, rx) = oneshot::channel();
        self.control
            .send(make(tx))
            .await
            .map_err(|_| "not available in this process (no run loop)".to_string())?;
        match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("not available in this process (no run loop)".into()),
            Err(_) => Err("no answer within 30 s".into()),
        }
    }

    /// The devices as the network knows them: no key, no payload.
    fn devices(&self) -> Value {
        let Ok(reg) = self.registry.lock() else {
            return json!([]);
        };
        let list: Vec<Value> = reg
            .devices()
            .iter()
            .filter(|d| !d.removed)
            .map(|d| {
                let s = d.session.as_ref().map(|s| s.state);
                json!({
                    "id": d.id,
                    "application": d.application,
                    "dev_eui": d.dev_eui.to_string(),
                    "class": format!("{:?}", d.class),
                    "activation": if d.app_key.is_some() { "OTAA" } else { "ABP" },
                    "dev_addr": s.map(|s| s.dev_addr.to_string()),
                    "f_cnt_up": s.and_then(|s| s.f_cnt_up),
                    "f_cnt_down": s.map(|s| s.f_cnt_down),
                })
            })
            .collect();
        Value::Array(list)
    }
}
