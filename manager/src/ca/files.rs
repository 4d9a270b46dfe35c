//! The PKI directory (`<data_dir>/pki`) and atomic file replacement.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::CaError;

/// Name of the PKI directory under the data dir.
pub const PKI_DIR: &str = "pki";
/// Root CA certificate (PEM).
pub const CA_CERT_FILE: &str = "ca.crt";
/// Root CA private key (PEM, mode 0600); only on managers.
pub const CA_KEY_FILE: &str = "ca.key";
/// This node's certificate (PEM).
pub const NODE_CERT_FILE: &str = "node.crt";
/// This node's private key (PEM, mode 0600).
pub const NODE_KEY_FILE: &str = "node.key";
/// The node key that `node.crt` may still belong to if a renewal was cut short between the
/// two renames (the key is replaced first).
pub(crate) const NODE_KEY_PREV_FILE: &str = "node.key.prev";

/// Replaces `path` with `contents` atomically: a temporary file in the same directory, created
/// with `mode`, fsynced, renamed over `path`, then the directory fsynced.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let err = |source| CaError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        err(e)
    })
}

pub(crate) fn read_string(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a node's certificate and key so that a crash at any point leaves a usable pair:
/// the old key is kept as `node.key.prev` until the new certificate is in place.
pub(crate) fn save_node_pair(pki_dir: &Path, cert_pem: &str, key_pem: &str) -> Result<(), CaError> {
    let key = pki_dir.join(NODE_KEY_FILE);
    let prev = pki_dir.join(NODE_KEY_PREV_FILE);
    if key.exists() {
        let old = fs::read(&key).map_err(|source| CaError::Read {
            path: key.clone(),
            source,
        })?;
        write_atomic(&prev, &old, 0o600)?;
    }
    write_atomic(&key, key_pem.as_bytes(), 0o600)?;
    write_atomic(&pki_dir.join(NODE_CERT_FILE), cert_pem.as_bytes(), 0o644)?;
    match fs::remove_file(&prev) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CaError::Write { path: prev, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pki").join("node.key");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left behind");
    }
}
