//! `lorastream devices import`: device exports of other network servers into a file of
//! `[gateway] devices_dir`.
//!
//! Each converter ([`tts`] for The Things Stack's JSON and CSV, [`chirpstack`] for ChirpStack
//! v4's JSON) only reads what its export says into a [`Candidate`]; the rules of what
//! lorastream needs are applied once, here ([`select`]): an OTAA device needs DevEUI, JoinEUI
//! and AppKey, an ABP device DevAddr, NwkSKey and AppSKey. A device that lacks one is reported
//! by name with what is missing and left out; no key is ever made up or taken from another
//! field. The file is written only if the whole configuration, with it, passes the same
//! checks as `lorastream check` (it is removed, or the old one put back, otherwise).
//!
//! Reports name devices and keys, never a key's value: the written file (mode 0640) is the only
//! place the keys go.

pub mod chirpstack;
mod csv;
pub mod tts;

use super::{Config, ConfigError, LorawanVersion};
use crate::model::{AesKey, DevAddr, Eui64};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Largest export read (a million devices of TTS JSON is far below it).
const MAX_INPUT_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Config(Box<ConfigError>),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: String, message: String },
    #[error("{config} has no [gateway] devices_dir: add e.g. devices_dir = \"/etc/lorastream/devices.d\" (and create the directory) to import devices")]
    NoDevicesDir { config: String },
    #[error("--application {0:?} is not an [[application]] of the configuration")]
    UnknownApplication(String),
    #[error("--output {0:?}: give a file name (no directory), e.g. \"farm.toml\"")]
    BadOutput(String),
    #[error("{0} exists; choose another --output or pass --force to replace it")]
    Exists(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("no device of {0} could be imported (see the lines above)")]
    Nothing(String),
    #[error(
        "the configuration with {path} does not pass the checks, so it was not kept: {source}"
    )]
    Rejected {
        path: String,
        source: Box<ConfigError>,
    },
}

impl From<ConfigError> for ImportError {
    fn from(e: ConfigError) -> Self {
        ImportError::Config(Box::new(e))
    }
}

/// The export formats read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `ttn-lw-cli end-devices get/list` JSON (one object, an array, or JSON lines).
    TtsJson,
    /// The Things Stack console's CSV template (`;` or `,` separated, header row).
    TtsCsv,
    /// ChirpStack v4 devices as its API gives them (JSON).
    ChirpStack,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::TtsJson => "tts-json",
            Format::TtsCsv => "tts-csv",
            Format::ChirpStack => "chirpstack",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tts-json" => Ok(Format::TtsJson),
            "tts-csv" => Ok(Format::TtsCsv),
            "chirpstack" => Ok(Format::ChirpStack),
            _ => Err(format!(
                "{s:?}: use tts-json, tts-csv or chirpstack (or leave --format out to detect it)"
            )),
        }
    }
}

/// What an export says about one device, before lorastream's rules are applied.
#[derive(Debug, Clone, Default)]
pub struct Candidate {
    /// How the device is named in reports when it has no usable id (`record 3`).
    pub record: String,
    pub id: Option<String>,
    pub dev_eui: Option<Eui64>,
    /// The export's own application id (TTS), if it has one that can be used as is.
    pub application: Option<String>,
    /// `Some(true)`: OTAA; `Some(false)`: ABP; `None`: not said (decided by the keys present).
    pub otaa: Option<bool>,
    pub class_c: bool,
    pub lorawan_version: Option<LorawanVersion>,
    pub join_eui: Option<Eui64>,
    pub app_key: Option<AesKey>,
    pub dev_addr: Option<DevAddr>,
    pub nwk_s_key: Option<AesKey>,
    pub app_s_key: Option<AesKey>,
    pub resets_f_cnt: bool,
    /// Why the device cannot be imported beyond missing keys (an encrypted key, LoRaWAN 1.1,
    /// a value that is not hex): never the value itself.
    pub problems: Vec<String>,
    /// Remarks that do not stop the import (an id made from the DevEUI).
    pub notes: Vec<String>,
}

impl Candidate {
    fn name(&self) -> String {
        match (&self.id, self.dev_eui) {
            (Some(id), Some(eui)) => format!("{id} ({eui})"),
            (Some(id), None) => id.clone(),
            (None, Some(eui)) => format!("{} ({eui})", self.record),
            (None, None) => self.record.clone(),
        }
    }
}

/// Parse a hex value of an export into `T`; a bad one becomes a problem naming the field.
pub(crate) fn hex_field<T: std::str::FromStr>(
    value: Option<&str>,
    field: &str,
    problems: &mut Vec<String>,
) -> Option<T>
where
    T::Err: std::fmt::Display,
{
    let v = value.map(str::trim).filter(|v| !v.is_empty())?;
    match v.parse::<T>() {
        Ok(x) => Some(x),
        Err(e) => {
            problems.push(format!("{field}: {e}"));
            None
        }
    }
}

/// A device id lorastream accepts as is (it goes into MQTT topics and file names).
pub(crate) fn usable_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The id TTS gives a device without one (ttscsv.go): `eui-` and the DevEUI in lower case.
pub(crate) fn eui_id(eui: Eui64) -> String {
    format!("eui-{}", eui.to_string().to_lowercase())
}

/// One device ready for the file.
#[derive(Debug, Clone)]
pub struct Imported {
    pub application: String,
    pub id: String,
    pub dev_eui: Eui64,
    pub class_c: bool,
    pub lorawan_version: Option<LorawanVersion>,
    pub keys: Keys,
    pub resets_f_cnt: bool,
}

#[derive(Debug, Clone)]
pub enum Keys {
    Otaa {
        join_eui: Eui64,
        app_key: AesKey,
    },
    Abp {
        dev_addr: DevAddr,
        nwk_s_key: AesKey,
        app_s_key: AesKey,
    },
}

/// The outcome of one device: imported, or why not (one line each, for stderr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub device: String,
    pub imported: bool,
    pub message: String,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.imported { "imported" } else { "skipped" };
        write!(f, "{}: {what}: {}", self.device, self.message)
    }
}

/// What the devices already configured hold: a new device may not reuse an id or a DevEUI.
#[derive(Default)]
pub struct Taken {
    pub ids: HashSet<String>,
    pub euis: HashSet<Eui64>,
}

/// Apply lorastream's rules to the candidates: which can be imported, and a report for each.
/// `application`: `--application`, else the device's own (if configured), else the only
/// application of the configuration.
pub fn select(
    candidates: Vec<Candidate>,
    application: Option<&str>,
    applications: &[String],
    mut taken: Taken,
) -> (Vec<Imported>, Vec<Report>) {
    let mut out = Vec::new();
    let mut reports = Vec::new();
    for c in candidates {
        let name = c.name();
        let skip = |reports: &mut Vec<Report>, message: String| {
            reports.push(Report {
                device: name.clone(),
                imported: false,
                message,
            })
        };
        let otaa = c
            .otaa
            .unwrap_or(c.app_key.is_some() || c.dev_addr.is_none());
        let mut missing = Vec::new();
        if c.dev_eui.is_none() {
            missing.push("dev_eui");
        }
        if c.id.is_none() {
            missing.push("id");
        }
        if otaa {
            if c.join_eui.is_none() {
                missing.push("join_eui");
            }
            if c.app_key.is_none() {
                missing.push("app_key");
            }
        } else {
            if c.dev_addr.is_none() {
                missing.push("dev_addr");
            }
            if c.nwk_s_key.is_none() {
                missing.push("nwk_s_key");
            }
            if c.app_s_key.is_none() {
                missing.push("app_s_key");
            }
        }
        let mut why: Vec<String> = c.problems.clone();
        if !missing.is_empty() {
            why.insert(
                0,
                format!(
                    "{} device without {}",
                    if otaa { "OTAA" } else { "ABP" },
                    missing.join(", ")
                ),
            );
        }
        let app = match application {
            Some(a) => Some(a.to_string()),
            None => match &c.application {
                Some(a) if applications.iter().any(|x| x == a) => Some(a.clone()),
                Some(a) => {
                    why.push(format!("its application {a:?} is not an [[application]] of the configuration: add it, or pass --application"));
                    None
                }
                None if applications.len() == 1 => Some(applications[0].clone()),
                None => {
                    why.push(format!(
                        "the export names no application and the configuration has {}: pass --application",
                        applications.len()
                    ));
                    None
                }
            },
        };
        if !why.is_empty() {
            skip(&mut reports, why.join("; "));
            continue;
        }
        let (Some(id), Some(dev_eui), Some(application)) = (c.id.clone(), c.dev_eui, app) else {
            continue; // reported as missing above
        };
        if taken.ids.contains(&id) {
            skip(
                &mut reports,
                format!("another device already has the id {id:?}"),
            );
            continue;
        }
        if taken.euis.contains(&dev_eui) {
            skip(
                &mut reports,
                format!("another device already has the DevEUI {dev_eui}"),
            );
            continue;
        }
        let keys = if otaa {
            match (c.join_eui, c.app_key) {
                (Some(join_eui), Some(app_key)) => Keys::Otaa { join_eui, app_key },
                _ => continue,
            }
        } else {
            match (c.dev_addr, c.nwk_s_key, c.app_s_key) {
                (Some(dev_addr), Some(nwk_s_key), Some(app_s_key)) => Keys::Abp {
                    dev_addr,
                    nwk_s_key,
                    app_s_key,
                },
                _ => continue,
            }
        };
        taken.ids.insert(id.clone());
        taken.euis.insert(dev_eui);
        let mut message = match &keys {
            Keys::Otaa { .. } => "OTAA".to_string(),
            Keys::Abp { dev_addr, .. } => format!("ABP, DevAddr {dev_addr}"),
        };
        let _ = write!(message, ", application {application:?}");
        for n in &c.notes {
            let _ = write!(message, "; {n}");
        }
        reports.push(Report {
            device: name,
            imported: true,
            message,
        });
        out.push(Imported {
            application,
            id,
            dev_eui,
            class_c: c.class_c,
            lorawan_version: c.lorawan_version,
            keys,
            resets_f_cnt: c.resets_f_cnt && !otaa,
        });
    }
    (out, reports)
}

/// Tell the format from the content: CSV has a header row, JSON starts with `{` or `[`; a JSON
/// device of TTS has `ids`, one of ChirpStack `devEui` (or a `device` holding it).
pub fn detect(text: &str) -> Option<Format> {
    let t = text.trim_start_matches('\u{feff}').trim_start();
    if !(t.starts_with('{') || t.starts_with('[')) {
        let header = t.lines().next().unwrap_or("").to_ascii_lowercase();
        return header.contains("dev_eui").then_some(Format::TtsCsv);
    }
    let first = json_records(t).ok()?.into_iter().next()?;
    if first.get("ids").is_some() {
        Some(Format::TtsJson)
    } else if chirpstack::looks_like(&first) {
        Some(Format::ChirpStack)
    } else {
        None
    }
}

/// The device objects of a JSON export: one object, an array of them, JSON lines (or any
/// sequence of values), or an object with a `result` / `devices` / `end_devices` array (API
/// list responses).
pub(crate) fn json_records(text: &str) -> Result<Vec<serde_json::Value>, String> {
    let mut out = Vec::new();
    let stream = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
    for v in stream {
        let v = v.map_err(|e| format!("not valid JSON: {e}"))?;
        flatten(v, &mut out);
    }
    Ok(out)
}

fn flatten(v: serde_json::Value, out: &mut Vec<serde_json::Value>) {
    match v {
        serde_json::Value::Array(a) => a.into_iter().for_each(|v| flatten(v, out)),
        serde_json::Value::Object(mut o) => {
            for key in ["result", "devices", "end_devices"] {
                if o.get(key).is_some_and(|v| v.is_array()) {
                    if let Some(list) = o.remove(key) {
                        flatten(list, out);
                    }
                    return;
                }
            }
            out.push(serde_json::Value::Object(o));
        }
        _ => {}
    }
}

/// Read an export (format given or detected) into candidates.
pub fn convert(text: &str, format: Format) -> Result<Vec<Candidate>, String> {
    match format {
        Format::TtsJson => tts::from_json(text),
        Format::TtsCsv => tts::from_csv(text),
        Format::ChirpStack => chirpstack::from_json(text),
    }
}

/// The TOML of the devices file.
pub fn render(devices: &[Imported], header: &str) -> String {
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut t = String::new();
    for line in header.lines() {
        let _ = writeln!(t, "# {line}");
    }
    for d in devices {
        let _ = writeln!(t, "\n[[device]]");
        let _ = writeln!(t, "application = {}", q(&d.application));
        let _ = writeln!(t, "id = {}", q(&d.id));
        let _ = writeln!(t, "dev_eui = \"{}\"", d.dev_eui);
        if d.class_c {
            let _ = writeln!(t, "class = \"C\"");
        }
        if let Some(v) = d.lorawan_version {
            let _ = writeln!(t, "lorawan_version = \"{}\"", v.name());
        }
        match &d.keys {
            Keys::Otaa { join_eui, app_key } => {
                let _ = writeln!(t, "join_eui = \"{join_eui}\"");
                let _ = writeln!(t, "app_key = \"{}\"", hex::encode_upper(app_key.0));
            }
            Keys::Abp {
                dev_addr,
                nwk_s_key,
                app_s_key,
            } => {
                let _ = writeln!(t, "dev_addr = \"{dev_addr}\"");
                let _ = writeln!(t, "nwk_s_key = \"{}\"", hex::encode_upper(nwk_s_key.0));
                let _ = writeln!(t, "app_s_key = \"{}\"", hex::encode_upper(app_s_key.0));
            }
        }
        if d.resets_f_cnt {
            let _ = writeln!(t, "resets_f_cnt = true");
        }
    }
    t
}

/// `lorastream devices import`'s options.
#[derive(Debug, Clone)]
pub struct Options {
    pub input: PathBuf,
    pub config: PathBuf,
    pub application: Option<String>,
    /// File name inside `devices_dir` (default: the input's name with `.toml`).
    pub output: Option<String>,
    pub format: Option<Format>,
    pub force: bool,
}

/// What an import did.
#[derive(Debug)]
pub struct Outcome {
    pub path: PathBuf,
    pub format: Format,
    pub imported: usize,
    pub reports: Vec<Report>,
}

/// The whole command: read, convert, select, write, check. The reports of a failed import are
/// returned with the error, so that the caller can show them.
pub fn run(opts: &Options) -> Result<Outcome, (ImportError, Vec<Report>)> {
    run_inner(opts).map_err(|(e, r)| (e, r.unwrap_or_default()))
}

fn run_inner(opts: &Options) -> Result<Outcome, (ImportError, Option<Vec<Report>>)> {
    let plain = |e: ImportError| (e, None);
    let cfg = Config::load(&opts.config).map_err(|e| plain(e.into()))?;
    let config_shown = opts.config.display().to_string();
    let dir = cfg.gateway.devices_dir_at(&opts.config).ok_or_else(|| {
        plain(ImportError::NoDevicesDir {
            config: config_shown.clone(),
        })
    })?;
    let apps: Vec<String> = cfg.applications.iter().map(|a| a.id.clone()).collect();
    if let Some(a) = &opts.application {
        if !apps.contains(a) {
            return Err(plain(ImportError::UnknownApplication(a.clone())));
        }
    }
    let name = output_name(opts).map_err(plain)?;
    let path = dir.join(&name);
    let shown = path.display().to_string();
    let old = match std::fs::read(&path) {
        Ok(b) if !opts.force => {
            drop(b);
            return Err(plain(ImportError::Exists(shown)));
        }
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(plain(ImportError::Read {
                path: shown,
                source,
            }))
        }
    };

    let input_shown = opts.input.display().to_string();
    let text = read_input(&opts.input).map_err(plain)?;
    let format = match opts.format.or_else(|| detect(&text)) {
        Some(f) => f,
        None => {
            return Err(plain(ImportError::Format {
                path: input_shown,
                message: "cannot tell the format (TTS JSON with `ids`, TTS CSV with a dev_eui column, ChirpStack JSON with devEui); pass --format".into(),
            }))
        }
    };
    let candidates = convert(&text, format).map_err(|message| {
        plain(ImportError::Format {
            path: input_shown.clone(),
            message,
        })
    })?;

    // The devices configured now, except those of the file being replaced.
    let mut taken = Taken::default();
    let mut start = 0;
    for src in &cfg.device_sources {
        let range = start..start + src.devices;
        start = range.end;
        if src.path == path {
            continue;
        }
        for d in cfg.devices.get(range).unwrap_or_default() {
            taken.ids.insert(d.id.clone());
            taken.euis.insert(d.dev_eui);
        }
    }
    let (devices, reports) = select(candidates, opts.application.as_deref(), &apps, taken);
    if devices.is_empty() {
        return Err((ImportError::Nothing(input_shown), Some(reports)));
    }
    let header = format!(
        "Written by `lorastream devices import` from {} ({}): {} devices.\nIt holds keys: keep it readable by root and lorastream only (mode 0640).",
        opts.input
            .file_name()
            .map_or(input_shown.clone(), |n| n.to_string_lossy().into_owned()),
        format.name(),
        devices.len()
    );
    let body = render(&devices, &header);
    let fail = |e: ImportError| (e, Some(reports.clone()));
    write_secret_file(&path, body.as_bytes()).map_err(|source| {
        fail(ImportError::Write {
            path: shown.clone(),
            source,
        })
    })?;
    // The file must leave the configuration valid, exactly as `lorastream check` sees it.
    if let Err(source) = Config::load(&opts.config) {
        let _ = match &old {
            Some(b) => write_secret_file(&path, b),
            None => std::fs::remove_file(&path),
        };
        return Err(fail(ImportError::Rejected {
            path: shown,
            source: Box::new(source),
        }));
    }
    Ok(Outcome {
        path,
        format,
        imported: devices.len(),
        reports,
    })
}

fn output_name(opts: &Options) -> Result<String, ImportError> {
    let name = match &opts.output {
        Some(n) => n.clone(),
        None => opts
            .input
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "imported".into()),
    };
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\\']) {
        return Err(ImportError::BadOutput(name));
    }
    Ok(if name.ends_with(".toml") {
        name
    } else {
        format!("{name}.toml")
    })
}

fn read_input(path: &Path) -> Result<String, ImportError> {
    let shown = path.display().to_string();
    let read = |source| ImportError::Read {
        path: shown.clone(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read)?.len();
    if size > MAX_INPUT_BYTES {
        return Err(ImportError::Format {
            path: shown,
            message: format!("{size} bytes; at most {MAX_INPUT_BYTES} are read"),
        });
    }
    let bytes = std::fs::read(path).map_err(read)?;
    String::from_utf8(bytes).map_err(|_| ImportError::Format {
        path: shown,
        message: "not UTF-8 text (save the export as UTF-8)".into(),
    })
}

/// Write `path` through a temporary file in the same directory (named so that the config
/// loader ignores it), mode 0640, synced, then renamed over: a reader sees the old file or
/// the new one, never half of one.
pub(crate) fn write_secret_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o640);
    }
    let result = (|| {
        let mut f = opts.open(&tmp)?;
        // The directory's group (root:lorastream under the Debian package): the daemon's user
        // reads the file through it. Best effort: only root or a member may set it.
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            if let Ok(m) = std::fs::metadata(dir) {
                let _ = std::os::unix::fs::fchown(&f, None, Some(m.gid()));
            }
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests;
