//! The devices the `device_upsert` and `device_delete` remote commands manage: one file,
//! [`FILE`] in `[gateway] devices_dir`, read like every other file there. An edit is written
//! atomically (0640, the directory's group) and can be undone ([`Edit::undo`]) when the
//! configuration with it does not load: the caller reloads after each edit.

use std::path::{Path, PathBuf};

/// The file in `devices_dir`.
pub const FILE: &str = "remote-commands.toml";

const HEADER: &str = "# Devices managed by lorastream's device_upsert / device_delete remote commands.\n# Rewritten by them: edit with care (a reload applies it).\n\n";

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("{0}")]
    Request(String),
    #[error("{path}: {source}{hint}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("{path} is not a devices file lorastream can edit: {message}")]
    Parse { path: PathBuf, message: String },
}

/// A change made to the file, with what it replaced.
#[derive(Debug)]
pub struct Edit {
    path: PathBuf,
    /// The file before the edit (None: it did not exist).
    previous: Option<Vec<u8>>,
}

impl Edit {
    /// Put the file back as it was.
    pub fn undo(self) -> std::io::Result<()> {
        match self.previous {
            Some(bytes) => super::import::write_secret_file(&self.path, &bytes),
            None => std::fs::remove_file(&self.path),
        }
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> EditError + '_ {
    move |source| {
        let hint = if source.kind() == std::io::ErrorKind::PermissionDenied
            || source.raw_os_error() == Some(libc::EROFS)
        {
            " (the packaged service may write only its state directory: allow devices_dir with ReadWritePaths= in `sudo systemctl edit lorastream` and make it writable for the group lorastream; README, \"Remote commands\")"
        } else {
            ""
        };
        EditError::Io {
            path: path.to_path_buf(),
            source,
            hint,
        }
    }
}

/// The file's `[[device]]` tables (empty when the file does not exist yet).
fn read(path: &Path) -> Result<(Option<Vec<u8>>, Vec<toml::Table>), EditError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, Vec::new())),
        Err(e) => return Err(io(path)(e)),
    };
    let parse = |message: String| EditError::Parse {
        path: path.to_path_buf(),
        message,
    };
    let text = std::str::from_utf8(&bytes).map_err(|e| parse(e.to_string()))?;
    let mut t: toml::Table = toml::from_str(text).map_err(|e| parse(e.to_string()))?;
    let devices = match t.remove("device") {
        None => Vec::new(),
        Some(toml::Value::Array(a)) => a
            .into_iter()
            .map(|v| match v {
                toml::Value::Table(t) => Ok(t),
                _ => Err(parse("`device` holds something else than tables".into())),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(parse("`device` is not an array of tables".into())),
    };
    if !t.is_empty() {
        return Err(parse("it holds more than [[device]] tables".into()));
    }
    Ok((Some(bytes), devices))
}

fn write(
    path: &Path,
    previous: Option<Vec<u8>>,
    devices: Vec<toml::Table>,
) -> Result<Edit, EditError> {
    let mut t = toml::Table::new();
    t.insert(
        "device".into(),
        toml::Value::Array(devices.into_iter().map(toml::Value::Table).collect()),
    );
    let text = toml::to_string(&t).map_err(|e| EditError::Request(e.to_string()))?;
    super::import::write_secret_file(path, format!("{HEADER}{text}").as_bytes())
        .map_err(io(path))?;
    Ok(Edit {
        path: path.to_path_buf(),
        previous,
    })
}

fn id_of(t: &toml::Table) -> Option<&str> {
    t.get("id").and_then(toml::Value::as_str)
}

/// Add the device (a `[[device]]` table as JSON), or replace the one with its `id`.
pub fn upsert(dir: &Path, device: &serde_json::Value) -> Result<Edit, EditError> {
    let table = match toml::Value::try_from(device) {
        Ok(toml::Value::Table(t)) => t,
        Ok(_) => {
            return Err(EditError::Request(
                "\"device\" must be an object with the keys of a [[device]] table".into(),
            ))
        }
        Err(e) => return Err(EditError::Request(format!("\"device\": {e}"))),
    };
    let id = id_of(&table)
        .ok_or_else(|| EditError::Request("\"device\" needs an \"id\"".into()))?
        .to_string();
    let path = dir.join(FILE);
    let (previous, mut devices) = read(&path)?;
    match devices.iter_mut().find(|d| id_of(d) == Some(id.as_str())) {
        Some(d) => *d = table,
        None => devices.push(table),
    }
    write(&path, previous, devices)
}

/// Remove the device with this id from the file.
pub fn delete(dir: &Path, id: &str) -> Result<Edit, EditError> {
    let path = dir.join(FILE);
    let (previous, mut devices) = read(&path)?;
    let before = devices.len();
    devices.retain(|d| id_of(d) != Some(id));
    if devices.len() == before {
        return Err(EditError::Request(format!(
            "device {id:?} is not in {} (only devices added by device_upsert can be deleted remotely)",
            path.display()
        )));
    }
    write(&path, previous, devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsert_replaces_by_id_delete_removes_and_undo_restores() {
        let dir = tempfile::tempdir().unwrap();
        let d = |id: &str, addr: &str| serde_json::json!({"application": "farm", "id": id, "dev_addr": addr});
        let e = upsert(dir.path(), &d("a", "26000001")).unwrap();
        assert!(e.previous.is_none());
        upsert(dir.path(), &d("b", "26000002")).unwrap();
        let e = upsert(dir.path(), &d("a", "26000009")).unwrap();
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert_eq!(text.matches("[[device]]").count(), 2, "{text}");
        assert!(
            text.contains("26000009") && !text.contains("26000001"),
            "{text}"
        );
        e.undo().unwrap();
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert!(
            text.contains("26000001") && !text.contains("26000009"),
            "{text}"
        );
        delete(dir.path(), "b").unwrap();
        assert!(delete(dir.path(), "b").is_err());
        assert!(upsert(dir.path(), &serde_json::json!({"application": "farm"})).is_err());
        assert!(upsert(dir.path(), &serde_json::json!(["x"])).is_err());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
    }
}
