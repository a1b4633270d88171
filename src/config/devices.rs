//! `[[application]]` and `[[device]]`: what lorastream knows about each device, typed.
//!
//! A device is activated either by personalization (ABP: DevAddr and session keys from the
//! config) or over the air (OTAA: AppKey, LoRaWAN 1.0.x join); [`Activation`] says which, so
//! nothing downstream has to guess from a set of optional keys.

use super::locate::Source;
use super::{de_from_str, de_opt_from_str, ConfigError};
use crate::lorawan::session::DeviceClass;
use crate::model::{AesKey, DevAddr, Eui64};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// `codec` of an `[[application]]` or a `[[device]]` (contract, "Payload codecs").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CodecKind {
    /// Uplinks carry `frm_payload` only.
    #[default]
    None,
    /// CayenneLPP, built in (`crate::codec::cayenne`).
    Cayennelpp,
    /// A TS013 JavaScript codec (`codec_script`).
    Javascript,
}

impl CodecKind {
    pub fn name(self) -> &'static str {
        match self {
            CodecKind::None => "none",
            CodecKind::Cayennelpp => "cayennelpp",
            CodecKind::Javascript => "javascript",
        }
    }
}

/// The payload codec of a device: its own `codec`, else its application's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum CodecConfig {
    #[default]
    None,
    CayenneLpp,
    /// The script's path (a relative `codec_script` is taken from the directory of the file
    /// that names it).
    JavaScript {
        script: PathBuf,
    },
}

impl CodecConfig {
    pub fn kind(&self) -> CodecKind {
        match self {
            CodecConfig::None => CodecKind::None,
            CodecConfig::CayenneLpp => CodecKind::Cayennelpp,
            CodecConfig::JavaScript { .. } => CodecKind::Javascript,
        }
    }

    /// `codec` and `codec_script` as written in an entry, checked: a script for "javascript"
    /// and only for it, and a script file that can be read. `Err((key, message))`.
    fn from_keys(
        kind: CodecKind,
        script: Option<&Path>,
        file: &str,
    ) -> Result<CodecConfig, (&'static str, String)> {
        if kind == CodecKind::Javascript && !cfg!(feature = "js") {
            return Err(("codec", super::NO_JAVASCRIPT.into()));
        }
        match (kind, script) {
            (CodecKind::Javascript, None) => Err((
                "codec",
                "codec = \"javascript\" needs codec_script = \"/etc/lorastream/codecs/<name>.js\" (a TS013 script with decodeUplink)".into(),
            )),
            (CodecKind::Javascript, Some(p)) => {
                let script = match Path::new(file).parent() {
                    Some(base) if p.is_relative() => base.join(p),
                    _ => p.to_path_buf(),
                };
                match std::fs::metadata(&script) {
                    Ok(m) if m.is_file() => Ok(CodecConfig::JavaScript { script }),
                    Ok(_) => Err((
                        "codec_script",
                        format!("{} is not a file", script.display()),
                    )),
                    Err(e) => Err((
                        "codec_script",
                        format!("cannot read {}: {e}", script.display()),
                    )),
                }
            }
            (other, Some(_)) => Err((
                "codec_script",
                format!(
                    "is only used with codec = \"javascript\" (here codec = {:?})",
                    other.name()
                ),
            )),
            (CodecKind::None, None) => Ok(CodecConfig::None),
            (CodecKind::Cayennelpp, None) => Ok(CodecConfig::CayenneLpp),
        }
    }

    fn put(&self, t: &mut toml::Table) {
        t.insert("codec".into(), self.kind().name().into());
        if let CodecConfig::JavaScript { script } = self {
            t.insert("codec_script".into(), script.display().to_string().into());
        }
    }
}

/// One `[[application]]` as written.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawApplication {
    id: String,
    codec: CodecKind,
    codec_script: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplicationConfig {
    pub id: String,
    /// The payload codec of its devices (each may set its own).
    pub codec: CodecConfig,
}

impl ApplicationConfig {
    pub(super) fn effective(&self) -> toml::Table {
        let mut t = toml::Table::new();
        t.insert("id".into(), self.id.clone().into());
        self.codec.put(&mut t);
        t
    }
}

/// Type one `[[application]]` (its id is checked with the others in `validate`).
pub(super) fn build_application(
    a: RawApplication,
    span: &Range<usize>,
    src: &Source,
) -> Result<ApplicationConfig, ConfigError> {
    let codec = CodecConfig::from_keys(a.codec, a.codec_script.as_deref(), src.path).map_err(
        |(key, message)| {
            src.entry_error(span, format!("[[application]] {:?}: ", a.id), key, message)
        },
    )?;
    Ok(ApplicationConfig { id: a.id, codec })
}

/// LoRaWAN version of a device (1.0.x; what lorastream implements).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum LorawanVersion {
    #[serde(rename = "1.0.0")]
    V1_0_0,
    #[serde(rename = "1.0.1")]
    V1_0_1,
    #[serde(rename = "1.0.2")]
    V1_0_2,
    #[default]
    #[serde(rename = "1.0.3")]
    V1_0_3,
    #[serde(rename = "1.0.4")]
    V1_0_4,
}

impl LorawanVersion {
    /// LoRaWAN 1.0.4 §6.2.5: DevNonce is a counter; the network refuses one that is not
    /// greater than the last (earlier versions use random DevNonces).
    pub fn dev_nonce_counts_up(self) -> bool {
        self == LorawanVersion::V1_0_4
    }

    pub fn name(self) -> &'static str {
        match self {
            LorawanVersion::V1_0_0 => "1.0.0",
            LorawanVersion::V1_0_1 => "1.0.1",
            LorawanVersion::V1_0_2 => "1.0.2",
            LorawanVersion::V1_0_3 => "1.0.3",
            LorawanVersion::V1_0_4 => "1.0.4",
        }
    }
}

/// How a device gets its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Activation {
    /// Activation by personalization: the session is in the config.
    Abp {
        dev_addr: DevAddr,
        nwk_s_key: AesKey,
        app_s_key: AesKey,
    },
    /// Over-the-air activation (LoRaWAN 1.0.x): the device joins with its AppKey.
    Otaa {
        /// The JoinEUI (AppEUI) the device must send; any when not given.
        join_eui: Option<Eui64>,
        app_key: AesKey,
    },
}

/// One `[[device]]`, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    pub application: String,
    pub id: String,
    pub dev_eui: Eui64,
    pub class: DeviceClass,
    /// OTAA: the device's LoRaWAN version, which decides the DevNonce rule: 1.0.0–1.0.3 devices
    /// pick random DevNonces (a used one is refused), 1.0.4 devices count up (a DevNonce not
    /// above the last one is refused). Default "1.0.3", which also accepts 1.0.4 devices.
    pub lorawan_version: LorawanVersion,
    pub activation: Activation,
    /// Let the network manage this device's data rate and power (when `[gateway] adr`).
    pub adr: bool,
    /// ABP only: accept a frame counter that restarts near 0 as a new epoch (a device that
    /// loses its counter with its battery). Weakens replay protection (README).
    pub resets_f_cnt: bool,
    /// Its own payload codec; `None`: its application's.
    pub codec: Option<CodecConfig>,
}

impl DeviceConfig {
    /// `[[device]] "soil-1": ` in messages.
    pub fn label(&self) -> String {
        format!("[[device]] {:?}: ", self.id)
    }

    pub(super) fn effective(&self) -> toml::Table {
        let mut t = toml::Table::new();
        let mut put = |k: &str, v: String| {
            t.insert(k.into(), toml::Value::String(v));
        };
        put("application", self.application.clone());
        put("id", self.id.clone());
        put("dev_eui", self.dev_eui.to_string());
        put("class", format!("{:?}", self.class));
        put("lorawan_version", self.lorawan_version.name().into());
        match &self.activation {
            Activation::Abp { dev_addr, .. } => {
                put("dev_addr", dev_addr.to_string());
                put("nwk_s_key", "***".into());
                put("app_s_key", "***".into());
            }
            Activation::Otaa { join_eui, .. } => {
                if let Some(j) = join_eui {
                    put("join_eui", j.to_string());
                }
                put("app_key", "***".into());
            }
        }
        t.insert("adr".into(), toml::Value::Boolean(self.adr));
        t.insert(
            "resets_f_cnt".into(),
            toml::Value::Boolean(self.resets_f_cnt),
        );
        if let Some(c) = &self.codec {
            c.put(&mut t);
        }
        t
    }
}

/// One `[[device]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDevice {
    application: String,
    id: String,
    #[serde(deserialize_with = "de_from_str")]
    dev_eui: Eui64,
    #[serde(default)]
    class: DeviceClass,
    #[serde(default)]
    lorawan_version: LorawanVersion,
    #[serde(default, deserialize_with = "de_opt_from_str")]
    dev_addr: Option<DevAddr>,
    #[serde(default, deserialize_with = "de_opt_from_str")]
    nwk_s_key: Option<AesKey>,
    #[serde(default, deserialize_with = "de_opt_from_str")]
    app_s_key: Option<AesKey>,
    #[serde(default, deserialize_with = "de_opt_from_str")]
    join_eui: Option<Eui64>,
    #[serde(default, deserialize_with = "de_opt_from_str")]
    app_key: Option<AesKey>,
    #[serde(default = "yes")]
    adr: bool,
    #[serde(default)]
    resets_f_cnt: bool,
    #[serde(default)]
    codec: Option<CodecKind>,
    #[serde(default)]
    codec_script: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

/// Type one `[[device]]`: its id, and ABP or OTAA (never both, never neither).
pub(super) fn build(
    d: RawDevice,
    span: &Range<usize>,
    src: &Source,
) -> Result<DeviceConfig, ConfigError> {
    let label = format!("[[device]] {:?}: ", d.id);
    let err = |key: &str, message: &str| src.entry_error(span, label.clone(), key, message);
    if d.id.is_empty() || d.id.contains(['/', '+', '#']) {
        return Err(err(
            "id",
            "must be non-empty and contain no '/', '+' or '#' (it is used in MQTT topics)",
        ));
    }
    let activation = match (d.dev_addr, d.nwk_s_key, d.app_s_key, d.app_key) {
        (Some(dev_addr), Some(nwk_s_key), Some(app_s_key), None) => Activation::Abp {
            dev_addr,
            nwk_s_key,
            app_s_key,
        },
        (None, None, None, Some(app_key)) => Activation::Otaa {
            join_eui: d.join_eui,
            app_key,
        },
        (None, None, None, None) => {
            return Err(err(
                "dev_addr",
                "set dev_addr + nwk_s_key + app_s_key (ABP) or app_key (OTAA)",
            ))
        }
        (_, _, _, Some(_)) => return Err(err(
            "app_key",
            "a device is either ABP (dev_addr, nwk_s_key, app_s_key) or OTAA (app_key), not both",
        )),
        (dev_addr, nwk, app, None) => {
            let missing = [
                ("dev_addr", dev_addr.is_some()),
                ("nwk_s_key", nwk.is_some()),
                ("app_s_key", app.is_some()),
            ]
            .into_iter()
            .find(|(_, set)| !set)
            .map_or("dev_addr", |(k, _)| k);
            return Err(err(
                missing,
                "ABP devices need dev_addr, nwk_s_key and app_s_key",
            ));
        }
    };
    if d.join_eui.is_some() && matches!(activation, Activation::Abp { .. }) {
        return Err(err("join_eui", "is for OTAA devices (with app_key)"));
    }
    if d.resets_f_cnt && matches!(activation, Activation::Otaa { .. }) {
        return Err(err(
            "resets_f_cnt",
            "is for ABP devices; an OTAA device starts a new session (and counters) by joining",
        ));
    }
    let codec = match (d.codec, &d.codec_script) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(err(
                "codec_script",
                "is only used with codec = \"javascript\"; add that line to this device",
            ))
        }
        (Some(kind), script) => Some(
            CodecConfig::from_keys(kind, script.as_deref(), src.path)
                .map_err(|(key, message)| err(key, &message))?,
        ),
    };
    Ok(DeviceConfig {
        application: d.application,
        id: d.id,
        dev_eui: d.dev_eui,
        class: d.class,
        lorawan_version: d.lorawan_version,
        activation,
        adr: d.adr,
        resets_f_cnt: d.resets_f_cnt,
        codec,
    })
}

/// A file of `[gateway] devices_dir`: `[[device]]` tables and nothing else.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevicesFile {
    #[serde(default, rename = "device")]
    devices: Vec<toml::Spanned<RawDevice>>,
}

/// Most files read from `devices_dir`: a bound on what one start reads (each file is also
/// read whole, so a stray huge file is refused by size first).
const MAX_DIR_FILES: usize = 10_000;
const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// The `*.toml` files of `dir`, sorted by name, each as (path for messages, text). Other
/// files (editor backups, `.tmp` files of `lorastream devices import`) are ignored.
pub(super) fn read_dir(dir: &std::path::Path) -> Result<Vec<(String, String)>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        format!(
            "cannot read directory {}: {e} (create it, or remove the key)",
            dir.display()
        )
    })?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot read directory {}: {e}", dir.display()))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".toml") || !path.is_file() {
            continue;
        }
        paths.push(path);
        if paths.len() > MAX_DIR_FILES {
            return Err(format!(
                "{} holds more than {MAX_DIR_FILES} .toml files",
                dir.display()
            ));
        }
    }
    paths.sort();
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        let shown = path.display().to_string();
        let size = std::fs::metadata(&path)
            .map_err(|e| format!("cannot read {shown}: {e}"))?
            .len();
        if size > MAX_FILE_BYTES {
            return Err(format!(
                "{shown} is {size} bytes; a devices file may hold at most {MAX_FILE_BYTES}"
            ));
        }
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("cannot read {shown}: {e}"))?;
        files.push((shown, text));
    }
    Ok(files)
}

/// The `[[device]]` tables of one devices_dir file, typed, with their spans in it.
pub(super) fn parse_file(src: &Source) -> Result<Vec<(DeviceConfig, Range<usize>)>, ConfigError> {
    let raw: RawDevicesFile = toml::from_str(src.text).map_err(|e| src.toml_error(&e))?;
    let mut out = Vec::with_capacity(raw.devices.len());
    for d in raw.devices {
        let span = d.span();
        out.push((build(d.into_inner(), &span, src)?, span));
    }
    Ok(out)
}
