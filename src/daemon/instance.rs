//! This installation's instance id: 8 random hex digits kept in the store directory
//! (`instance-id`), made on the first start. Derived MQTT client ids end with it
//! ([`crate::config::ClientId`]): gateways imaged from one SD card, all called `raspberrypi`
//! with the example EUI copied, still connect as different clients (two clients with one id
//! take turns kicking each other off the broker), and one gateway keeps its id — and so its
//! persistent broker session — across restarts and upgrades.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The file in the store directory.
pub const FILE: &str = "instance-id";

#[derive(Debug, thiserror::Error)]
#[error("instance id {path}: {source}")]
pub struct InstanceError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Read the instance id from `dir`, or make one and keep it (written to a temporary file,
/// synced, renamed, directory synced: a power cut leaves the old state or the new one).
/// A file that does not hold 8 hex digits is replaced, with a warning.
pub fn load_or_create(dir: &Path) -> Result<String, InstanceError> {
    let path = dir.join(FILE);
    let err = |source| InstanceError {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(s) if valid(s.trim()) => return Ok(s.trim().to_string()),
        Ok(_) => {
            tracing::warn!(path = %path.display(), "the instance id file does not hold 8 hex digits; making a new one (derived MQTT client ids change)");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let id = new_id().map_err(err)?;
    let tmp = dir.join(format!("{FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        // Owner only, as every file of the store (whatever the umask).
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{id}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(err)?;
    tracing::info!(instance_id = %id, path = %path.display(), "new instance id");
    Ok(id)
}

fn valid(s: &str) -> bool {
    s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn new_id() -> std::io::Result<String> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 4];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| std::io::Error::other("no random numbers from the system"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_then_kept_and_a_bad_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        assert!(valid(&a), "{a}");
        assert_eq!(load_or_create(dir.path()).unwrap(), a);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(load_or_create(other.path()).unwrap(), a);
        std::fs::write(dir.path().join(FILE), "not hex\n").unwrap();
        let b = load_or_create(dir.path()).unwrap();
        assert!(valid(&b) && b != "not hex");
        assert!(!dir.path().join(format!("{FILE}.tmp")).exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }
}
