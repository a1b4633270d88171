//! Checks that need more than one value: a region's data rates, unique ids, references from
//! devices and streams to applications and devices, and what a cloud demands of every device
//! a stream carries (IoT Hub device ids and keys, AWS IoT topic limits). Each error points at
//! the line of the key that has to change.

use super::devices::DeviceConfig;
use super::locate::Source;
use super::streams::{azure_device_id, azure_device_id_error};
use super::{
    ApplicationConfig, AzureIdentity, ConfigError, GatewayConfig, LogConfig, Scope, StorageConfig,
    StreamConfig, StreamKind,
};
use std::collections::HashSet;
use std::ops::Range;

/// `[gateway]`, `[storage]`, `[log]`: values that depend on each other or have limits.
/// `[runtime]`.
pub(super) fn runtime(r: &super::RuntimeConfig, src: &Source) -> Result<(), ConfigError> {
    if r.worker_threads > super::MAX_WORKER_THREADS {
        return Err(src.section_error(
            "[runtime]",
            "worker_threads",
            format!(
                "{} is more than {} (0 = one per CPU core)",
                r.worker_threads,
                super::MAX_WORKER_THREADS
            ),
        ));
    }
    Ok(())
}

pub(super) fn sections(
    g: &GatewayConfig,
    s: &StorageConfig,
    log: &LogConfig,
    src: &Source,
) -> Result<(), ConfigError> {
    let gw = |key, message: String| src.section_error("[gateway]", key, message);
    if let Some(dr) = g.rx2_dr {
        let drs = g.region.downlink_drs();
        if !drs.contains(&dr) {
            return Err(gw(
                "rx2_dr",
                format!(
                    "DR{dr} is not a downlink data rate of {} (DR{}..DR{})",
                    g.region,
                    drs.start(),
                    drs.end()
                ),
            ));
        }
    }
    if let Some(sb) = g.sub_band {
        if !g.region.has_fixed_channels() || !(1..=8).contains(&sb) {
            return Err(gw(
                "sub_band",
                format!(
                    "sub_band = {sb}: only US915 and AU915 have sub-bands, numbered 1..8 (channels 8n-8..8n-1)"
                ),
            ));
        }
    }
    if let Some(extra) = &g.extra_channels {
        extra_channels(g, extra).map_err(|m| gw("extra_channels", m))?;
    }
    if !(0.0..=30.0).contains(&g.adr_margin_db) {
        return Err(gw(
            "adr_margin_db",
            format!("{} dB is not within 0..30", g.adr_margin_db),
        ));
    }
    if g.dedup_window_ms > 2_000 {
        return Err(gw(
            "dedup_window_ms",
            "must be at most 2000 ms (RX1 opens 1 s after the uplink)".into(),
        ));
    }
    if g.max_gateways == 0 {
        return Err(gw("max_gateways", "must be at least 1".into()));
    }
    if !(1..=10_000).contains(&g.codec_timeout_ms) {
        return Err(gw(
            "codec_timeout_ms",
            format!(
                "{} ms is not within 1..10000 (a codec runs in the uplink's path)",
                g.codec_timeout_ms
            ),
        ));
    }
    let st = |key, message: &str| src.section_error("[storage]", key, message);
    if s.max_age.is_some_and(|d| d.as_secs() < 60) {
        return Err(st("max_age", "must be at least 1 minute"));
    }
    if s.max_bytes < 64 * 1024 {
        return Err(st("max_bytes", "must be at least 65536"));
    }
    #[cfg(not(feature = "sled"))]
    if s.backend == super::StorageBackend::Sled {
        return Err(st(
            "backend",
            "\"sled\" is not in this build of lorastream (cargo feature `sled`, off by default); use \"redb\"",
        ));
    }
    if let Err(e) = crate::logs::parse_filter(&log.level) {
        return Err(src.section_error(
            "[log]",
            "level",
            format!(
                "{:?}: {e} (use error, warn, info, debug, trace or a filter like \"lorastream=debug\")",
                log.level
            ),
        ));
    }
    Ok(())
}

/// `[gateway] extra_channels`: a region with a channel list, room in it (16 channels), each
/// inside the region's band and not already a channel.
fn extra_channels(g: &GatewayConfig, extra: &[f64]) -> Result<(), String> {
    use crate::lorawan::region;
    if g.region.has_fixed_channels() {
        return Err(format!(
            "{} has a fixed channel plan; choose the gateway's channels with sub_band",
            g.region
        ));
    }
    let defaults: Vec<u32> = region::default_channels(g.region)
        .iter()
        .map(|c| c.freq_hz)
        .collect();
    let room = 16 - defaults.len();
    if extra.len() > room {
        return Err(format!(
            "{} channels given; {} has {} default channels, so at most {room} more",
            extra.len(),
            g.region,
            defaults.len()
        ));
    }
    let (lo, hi) = region::uplink_band_hz(g.region);
    let mut seen = defaults;
    for &mhz in extra {
        let hz = super::mhz_to_hz(mhz);
        if !mhz.is_finite() || !(lo..=hi).contains(&hz) {
            return Err(format!(
                "{mhz} MHz is outside {}'s band ({} .. {} MHz)",
                g.region,
                f64::from(lo) / 1e6,
                f64::from(hi) / 1e6
            ));
        }
        if seen.contains(&hz) {
            return Err(format!("{mhz} MHz is already a channel"));
        }
        seen.push(hz);
    }
    Ok(())
}

/// Application ids: non-empty and unique. Returns them.
pub(super) fn applications<'a>(
    apps: &'a [ApplicationConfig],
    src: &Source,
) -> Result<HashSet<&'a str>, ConfigError> {
    let mut seen = HashSet::new();
    for a in apps {
        if a.id.is_empty() || a.id.contains(['/', '+', '#']) || !seen.insert(a.id.as_str()) {
            let line = src
                .text
                .lines()
                .position(|l| {
                    l.split_once('=').is_some_and(|(k, v)| {
                        k.trim() == "id" && v.trim().trim_matches('"') == a.id
                    })
                })
                .map_or(0, |i| i + 1);
            return Err(ConfigError::Invalid {
                path: src.path.into(),
                line,
                entry: "[[application]] ".into(),
                key: "id".into(),
                message: format!(
                    "{:?} is empty, contains '/', '+' or '#', or is used twice",
                    a.id
                ),
            });
        }
    }
    Ok(seen)
}

/// Device ids and DevEUIs unique over the main file and every devices_dir file, applications
/// known. Each device comes with its span and the index of its file in `sources`; a duplicate
/// is reported where it is written second, naming the file of the first.
pub(super) fn devices(
    devices: &[(DeviceConfig, Range<usize>, usize)],
    apps: &HashSet<&str>,
    sources: &[Source],
) -> Result<(), ConfigError> {
    let mut ids = std::collections::HashMap::new();
    let mut euis = std::collections::HashMap::new();
    for (d, span, file) in devices {
        let src = &sources[*file];
        let err = |key: &str, message: String| src.entry_error(span, d.label(), key, message);
        let first_in = |i: usize| sources.get(i).map_or("", |s| s.path);
        if let Some(&other) = ids.get(d.id.as_str()) {
            return Err(err(
                "id",
                format!("another device has the same id (in {})", first_in(other)),
            ));
        }
        ids.insert(d.id.as_str(), *file);
        if let Some(&other) = euis.get(&d.dev_eui) {
            return Err(err(
                "dev_eui",
                format!(
                    "{} is used by another device (in {})",
                    d.dev_eui,
                    first_in(other)
                ),
            ));
        }
        euis.insert(d.dev_eui, *file);
        if !apps.contains(d.application.as_str()) {
            return Err(err(
                "application",
                format!(
                    "unknown application {:?}; add an [[application]] with id = {:?}",
                    d.application, d.application
                ),
            ));
        }
    }
    Ok(())
}

/// Every JavaScript codec loads as the daemon will load it (syntax, top-level code, a
/// `decodeUplink` function), each file once however many entries name it; an error points at
/// the first entry's `codec_script`. Applications are in `sources[0]`. (A build without the `js`
/// feature refuses `codec = "javascript"` when the entry is read: `NO_JAVASCRIPT`.)
#[cfg(feature = "js")]
pub(super) fn codec_scripts(
    apps: &[(ApplicationConfig, Range<usize>)],
    devices: &[(DeviceConfig, Range<usize>, usize)],
    sources: &[Source],
) -> Result<(), ConfigError> {
    use super::CodecConfig;
    let mut checked = HashSet::new();
    let entries = apps
        .iter()
        .map(|(a, span)| {
            (
                Some(&a.codec),
                span,
                0,
                format!("[[application]] {:?}: ", a.id),
            )
        })
        .chain(
            devices
                .iter()
                .map(|(d, span, file)| (d.codec.as_ref(), span, *file, d.label())),
        );
    for (codec, span, file, label) in entries {
        let Some(CodecConfig::JavaScript { script }) = codec else {
            continue;
        };
        if !checked.insert(script.clone()) {
            continue;
        }
        if let Err(m) = crate::codec::js::check_file(script) {
            return Err(sources[file].entry_error(span, label, "codec_script", m));
        }
    }
    Ok(())
}

/// Stream names unique, scopes naming what exists, and each cloud's rules for every device
/// the stream carries.
pub(super) fn streams(
    streams: &[(StreamConfig, Range<usize>)],
    devices: &[DeviceConfig],
    apps: &HashSet<&str>,
    src: &Source,
) -> Result<(), ConfigError> {
    let mut names = HashSet::new();
    for (st, span) in streams {
        let err = |key: &str, message: String| src.entry_error(span, st.label(), key, message);
        if !names.insert(st.name.as_str()) {
            return Err(err("name", "another stream has the same name".into()));
        }
        match &st.scope {
            Scope::Application(a) if !apps.contains(a.as_str()) => {
                return Err(err("application", format!("unknown application {a:?}")))
            }
            Scope::Device(d) if !devices.iter().any(|x| x.id == *d) => {
                return Err(err("device", format!("unknown device {d:?}")))
            }
            _ => {}
        }
        let in_scope = || {
            devices
                .iter()
                .filter(|d| st.scope.covers(&d.application, &d.id))
        };
        match &st.kind {
            StreamKind::AzureIotHub(a) => {
                if let AzureIdentity::Device {
                    device_id,
                    policy,
                    device_keys,
                    ..
                } = &a.identity
                {
                    let mut ids = HashSet::new();
                    for d in in_scope() {
                        let id = azure_device_id(device_id, &d.id, d.dev_eui);
                        if let Some(e) = azure_device_id_error(&id) {
                            return Err(err("device_id", format!("device {:?}: {e}", d.id)));
                        }
                        if !ids.insert(id.clone()) {
                            return Err(err(
                                "device_id",
                                format!("IoT Hub device id {id:?} is used by two devices"),
                            ));
                        }
                        let keyed =
                            device_keys.contains_key(&d.id) || device_keys.contains_key(&id);
                        if !keyed && policy.is_none() {
                            return Err(err(
                                "device_keys",
                                format!("no key for device {:?} (IoT Hub device {id:?}); add it to device_keys or set a policy key", d.id),
                            ));
                        }
                    }
                }
            }
            StreamKind::AwsIot(a) => {
                // AWS IoT developer guide, "Quotas": at most 7 slashes and 256 bytes. The longest
                // topic is {prefix}/{application}/devices/{device}/down/replace.
                let prefix = &a.mqtt.topic_prefix;
                for d in in_scope() {
                    let t = format!("{prefix}/{}/devices/{}/down/replace", d.application, d.id);
                    let slashes = t.matches('/').count();
                    if slashes > 7 || t.len() > 256 {
                        return Err(err(
                            "topic_prefix",
                            format!(
                                "topic {t:?} has {slashes} slashes and {} bytes; AWS IoT allows 7 and 256",
                                t.len()
                            ),
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}
