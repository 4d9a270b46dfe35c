//! Secrets at rest: the cluster's data key seals each secret's data (AES-256-GCM, the
//! secret's id as associated data) before it is proposed, so the Raft log, the store and the
//! snapshots hold only ciphertext. Each manager keeps the data key on disk wrapped by its own
//! key-encryption key (`<data>/pki/secrets.kek`, mode 0600); autolock will replace that file
//! with a key derived from the operator's unlock key (docs/design/secrets.md).

use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::ca::write_atomic;

/// The key-encryption key file under the PKI dir (32 random bytes, mode 0600).
pub const KEK_FILE: &str = "secrets.kek";
/// The data key, wrapped by the key-encryption key, under the PKI dir (mode 0600).
pub const DEK_FILE: &str = "secrets.dek";
/// Bytes of a data key and of a key-encryption key.
pub const KEY_LEN: usize = 32;
/// Largest secret or config (swarm's limit: 500 KiB).
pub const MAX_DATA_BYTES: usize = 500 * 1024;
/// First byte of every sealed value: the format (AES-256-GCM, 12-byte nonce first).
const SEALED_V1: u8 = 1;
/// Associated data of the wrapped data key.
const DEK_AAD: &[u8] = b"shoal secrets data key";

/// Why a key or a sealed value could not be used.
#[derive(thiserror::Error, Debug)]
pub enum SecretsError {
    /// A key file is missing, unreadable or malformed.
    #[error("secrets key {path}: {reason}")]
    KeyFile { path: String, reason: String },
    /// Sealed data that this key did not seal (or that was altered).
    #[error("sealed data does not open with this key: wrong key, or altered data")]
    Open,
    /// No randomness from the system.
    #[error("no randomness from the system")]
    Random,
    /// Writing a key file failed.
    #[error(transparent)]
    Write(#[from] crate::ca::CaError),
}

/// The cluster's secrets data key.
pub struct Keyring {
    raw: [u8; KEY_LEN],
    key: LessSafeKey,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keyring(..)")
    }
}

fn random<const N: usize>() -> Result<[u8; N], SecretsError> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| SecretsError::Random)?;
    Ok(b)
}

fn aead(raw: &[u8]) -> Result<LessSafeKey, SecretsError> {
    UnboundKey::new(&AES_256_GCM, raw)
        .map(LessSafeKey::new)
        .map_err(|_| SecretsError::KeyFile {
            path: "data key".into(),
            reason: format!("want {KEY_LEN} bytes, got {}", raw.len()),
        })
}

fn seal_with(key: &LessSafeKey, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, SecretsError> {
    let nonce: [u8; NONCE_LEN] = random()?;
    let mut out = Vec::with_capacity(1 + NONCE_LEN + plaintext.len() + 16);
    out.push(SEALED_V1);
    out.extend_from_slice(&nonce);
    let mut body = plaintext.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut body,
    )
    .map_err(|_| SecretsError::Open)?;
    out.extend_from_slice(&body);
    Ok(out)
}

fn open_with(key: &LessSafeKey, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SecretsError> {
    if sealed.len() < 1 + NONCE_LEN || sealed[0] != SEALED_V1 {
        return Err(SecretsError::Open);
    }
    let nonce = Nonce::try_assume_unique_for_key(&sealed[1..1 + NONCE_LEN])
        .map_err(|_| SecretsError::Open)?;
    let mut body = sealed[1 + NONCE_LEN..].to_vec();
    let plain = key
        .open_in_place(nonce, Aad::from(aad), &mut body)
        .map_err(|_| SecretsError::Open)?;
    Ok(plain.to_vec())
}

impl Keyring {
    /// A new random data key (made once per cluster, at `init`).
    pub fn generate() -> Result<Keyring, SecretsError> {
        Keyring::from_raw(&random::<KEY_LEN>()?)
    }

    /// The data key from its bytes (as a joining manager receives them).
    pub fn from_raw(raw: &[u8]) -> Result<Keyring, SecretsError> {
        let key = aead(raw)?;
        let mut r = [0u8; KEY_LEN];
        r.copy_from_slice(raw);
        Ok(Keyring { raw: r, key })
    }

    /// The data key's bytes, for a manager joining over TLS (never logged, never in the log).
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Seals a secret's data; `id` (the secret's id) is bound in, so ciphertext moved to
    /// another secret does not open.
    pub fn seal(&self, id: &str, plaintext: &[u8]) -> Result<Vec<u8>, SecretsError> {
        seal_with(&self.key, id.as_bytes(), plaintext)
    }

    /// Opens what [`Keyring::seal`] sealed for `id`.
    pub fn open(&self, id: &str, sealed: &[u8]) -> Result<Vec<u8>, SecretsError> {
        open_with(&self.key, id.as_bytes(), sealed)
    }

    /// Writes the data key into `pki_dir`, wrapped by the key-encryption key there (made now,
    /// random, if there is none yet).
    pub fn save(&self, pki_dir: &Path) -> Result<(), SecretsError> {
        let kek_path = pki_dir.join(KEK_FILE);
        let kek = match read_key(&kek_path)? {
            Some(k) => k,
            None => {
                let k: [u8; KEY_LEN] = random()?;
                write_atomic(&kek_path, &k, 0o600)?;
                k.to_vec()
            }
        };
        let wrapped = seal_with(&aead(&kek)?, DEK_AAD, &self.raw)?;
        write_atomic(&pki_dir.join(DEK_FILE), &wrapped, 0o600)?;
        Ok(())
    }

    /// The data key kept in `pki_dir`; `None` when there is none (a cluster made before
    /// secrets existed: its managers refuse secrets).
    pub fn load(pki_dir: &Path) -> Result<Option<Keyring>, SecretsError> {
        let dek_path = pki_dir.join(DEK_FILE);
        let Some(wrapped) = read_key(&dek_path)? else {
            return Ok(None);
        };
        let kek_path = pki_dir.join(KEK_FILE);
        let kek = read_key(&kek_path)?.ok_or_else(|| SecretsError::KeyFile {
            path: kek_path.display().to_string(),
            reason: "missing, but the wrapped data key is there".into(),
        })?;
        let raw =
            open_with(&aead(&kek)?, DEK_AAD, &wrapped).map_err(|_| SecretsError::KeyFile {
                path: dek_path.display().to_string(),
                reason: "does not open with the key-encryption key".into(),
            })?;
        Keyring::from_raw(&raw).map(Some)
    }
}

fn read_key(path: &Path) -> Result<Option<Vec<u8>>, SecretsError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SecretsError::KeyFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        }),
    }
}

/// Docker's rule for secret and config names: 1-64 characters, letters, digits, '-', '_' and
/// '.', starting and ending with a letter or digit.
pub fn check_name(kind: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {kind} name {name:?}: 1-64 letters, digits, '-', '_', '.', starting and ending with a letter or digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn sealed_data_is_ciphertext_and_opens_again() {
        let k = Keyring::generate().unwrap();
        let plain = b"the database password: hunter2";
        let sealed = k.seal("s1", plain).unwrap();
        assert!(!sealed.windows(plain.len()).any(|w| w == plain));
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(k.open("s1", &sealed).unwrap(), plain);
        // A fresh nonce each time.
        assert_ne!(k.seal("s1", plain).unwrap(), sealed);
    }

    #[test]
    fn wrong_key_wrong_id_or_altered_data_are_refused() {
        let k = Keyring::generate().unwrap();
        let other = Keyring::generate().unwrap();
        let sealed = k.seal("s1", b"x").unwrap();
        assert!(matches!(other.open("s1", &sealed), Err(SecretsError::Open)));
        assert!(matches!(k.open("s2", &sealed), Err(SecretsError::Open)));
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(k.open("s1", &bad), Err(SecretsError::Open)));
        assert!(matches!(k.open("s1", &[1, 2]), Err(SecretsError::Open)));
    }

    #[test]
    fn the_data_key_is_kept_wrapped_by_a_0600_kek() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Keyring::load(dir.path()).unwrap().is_none());
        let k = Keyring::generate().unwrap();
        k.save(dir.path()).unwrap();
        for f in [KEK_FILE, DEK_FILE] {
            let m = std::fs::metadata(dir.path().join(f)).unwrap();
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "{f}");
        }
        let wrapped = std::fs::read(dir.path().join(DEK_FILE)).unwrap();
        assert!(!wrapped.windows(KEY_LEN).any(|w| w == k.raw()));
        let back = Keyring::load(dir.path()).unwrap().unwrap();
        assert_eq!(back.raw(), k.raw());
        let sealed = k.seal("s", b"v").unwrap();
        assert_eq!(back.open("s", &sealed).unwrap(), b"v");
        // Another KEK does not unwrap it.
        std::fs::write(dir.path().join(KEK_FILE), [7u8; KEY_LEN]).unwrap();
        let e = Keyring::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("does not open"), "{e}");
    }

    #[test]
    fn names_follow_docker() {
        for ok in ["a", "db_password", "tls.crt", "A-1"] {
            assert!(check_name("secret", ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(65);
        for bad in ["", "-a", "a-", "a b", "a/b", "ü", long.as_str()] {
            assert!(check_name("secret", bad).is_err(), "{bad}");
        }
    }
}
