//! What DEL needs about one attachment, kept on disk from before the
//! namespace exists until after DEL has run: the config list as it was
//! used, the container id, interface, namespace path and the ADD result.
//! A restarted isolated releases an action's network from this alone, even
//! if the config has changed since.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::NetworkError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub container_id: String,
    pub ifname: String,
    pub netns: PathBuf,
    pub bin_dir: PathBuf,
    /// The config list, with isolated's injections (dataDir).
    pub conflist: Value,
    /// The ADD result; absent until ADD has succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
}

impl Record {
    /// Reads the record at `path`; `None` when there is none.
    pub fn read(path: &Path) -> Result<Option<Record>, NetworkError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(NetworkError::Io {
                    what: "read",
                    path: path.to_owned(),
                    reason: e.to_string(),
                })
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| NetworkError::Io {
                what: "parse",
                path: path.to_owned(),
                reason: e.to_string(),
            })
    }

    /// Writes the record: a temp file renamed over it, so a crash leaves
    /// the old record or the new one, never half of one. `durable` syncs it
    /// first, for the write that must outlast a power loss: IPAM leases are
    /// files that survive a reboot, and a lease without its record would
    /// never be released.
    pub fn write(&self, path: &Path, durable: bool) -> Result<(), NetworkError> {
        let io = |what: &'static str, p: &Path, e: std::io::Error| NetworkError::Io {
            what,
            path: p.to_owned(),
            reason: e.to_string(),
        };
        let parent = path.parent().unwrap_or(Path::new("."));
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| NetworkError::Io {
            what: "encode",
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let tmp = path.with_extension("json.tmp");
        // The tenant's directory may vanish under a concurrent removal of
        // its last record; once more is enough.
        for attempt in 0..2 {
            std::fs::create_dir_all(parent).map_err(|e| io("create", parent, e))?;
            let written = std::fs::File::create(&tmp).and_then(|mut f| {
                f.write_all(&bytes)?;
                if durable {
                    f.sync_all()?;
                }
                Ok(())
            });
            match written {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempt == 0 => {}
                Err(e) => return Err(io("write", &tmp, e)),
            }
        }
        std::fs::rename(&tmp, path).map_err(|e| io("rename", &tmp, e))
    }

    /// Deletes the record at `path`, and the tenant's directory once empty.
    pub fn remove(path: &Path) -> Result<(), NetworkError> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(NetworkError::Io {
                    what: "remove",
                    path: path.to_owned(),
                    reason: e.to_string(),
                })
            }
        }
        if let Some(parent) = path.parent() {
            let _ = std::fs::remove_dir(parent);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_record_round_trips_and_removal_tidies_up() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("direktiv.ns").join("a1.json");
        assert_eq!(Record::read(&path).unwrap(), None);
        let mut r = Record {
            container_id: "direktiv.ns--a1".into(),
            ifname: "eth0".into(),
            netns: "/s/netns/direktiv.ns/a1".into(),
            bin_dir: "/usr/lib/cni".into(),
            conflist: json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "bridge"}]}),
            result: None,
        };
        r.write(&path, true).unwrap();
        assert_eq!(Record::read(&path).unwrap().as_ref(), Some(&r));
        r.result = Some(json!({"ips": []}));
        r.write(&path, false).unwrap();
        assert_eq!(Record::read(&path).unwrap(), Some(r));
        Record::remove(&path).unwrap();
        Record::remove(&path).unwrap();
        assert!(!path.parent().unwrap().exists());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "{").unwrap();
        assert!(Record::read(&path)
            .unwrap_err()
            .to_string()
            .contains("parse"));
    }
}
