//! The cluster backup file (`shoal cluster backup` / `cluster restore`, docs/design/backup.md).
//!
//! ```text
//! 0   8   magic "SHOALBAK"
//! 8   4   format version, big-endian (1)
//! 12  4   flags, big-endian (bit 0: body encrypted — no autolock yet, so never set)
//! 16  8   body length N, big-endian
//! 24  N   body: bincode of `Body` (the store at one applied index, the CA, the secrets key)
//! 24+N 32 SHA-256 of every byte before it
//! ```
//!
//! A file that is not exactly that — another magic, a version or flag this build does not
//! know, a length that does not match the file, a checksum that does not match, a body that
//! does not decode or does not hang together (the store's cluster, the CA's cluster and the
//! header's must be one) — is refused whole before anything is written.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ca::RootCa;
use crate::raft::Epoch;
use crate::store::{Dump, Kind};

/// The file's first bytes.
pub const MAGIC: &[u8; 8] = b"SHOALBAK";
/// The format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Flag bit: the body is encrypted (reserved for autolock).
pub const FLAG_ENCRYPTED: u32 = 1;
/// Header bytes before the body.
pub const HEADER_BYTES: usize = 24;
/// Checksum bytes after the body.
pub const CHECKSUM_BYTES: usize = 32;
/// Largest backup file read or written: a store of 10,000 services is ~30 MiB, and a restore
/// holds the file and the store it decodes to in memory at once.
pub const MAX_BACKUP_BYTES: u64 = 512 * 1024 * 1024;

/// Why a backup file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BackupError {
    #[error(
        "not a shoal backup file (it does not start with {:?})",
        String::from_utf8_lossy(MAGIC)
    )]
    BadMagic,
    #[error("the backup file is truncated: {have} bytes, {want} expected")]
    Truncated { have: u64, want: u64 },
    #[error("the backup file has {extra} bytes after its end")]
    TrailingBytes { extra: u64 },
    #[error(
        "backup format version {0} is not supported (this shoal reads version {FORMAT_VERSION})"
    )]
    Version(u32),
    #[error("the backup is encrypted, and this shoal has no autolock key to open it")]
    Encrypted,
    #[error("the backup file has unknown flags {0:#x}")]
    Flags(u32),
    #[error(
        "the backup file is {0} bytes: larger than the {MAX_BACKUP_BYTES} bytes a backup may be"
    )]
    TooLarge(u64),
    #[error("the backup file is corrupt: its checksum does not match its contents")]
    Checksum,
    #[error("the backup file's contents do not decode: {0}")]
    Body(String),
    #[error("the backup file does not hang together: {0}")]
    Inconsistent(String),
}

/// What a backup holds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Body {
    pub cluster_id: String,
    /// When it was taken (ms since the epoch, the taking manager's clock).
    pub created_ms: i64,
    /// The manager it was taken on, and whether it led.
    pub node_id: String,
    pub leader: bool,
    /// Whether that manager had confirmed with the leader that it applied every write
    /// committed before the backup began.
    pub caught_up: bool,
    /// The log id of the last entry applied to the store below.
    pub raft_term: u64,
    pub raft_index: u64,
    /// The raft group's epoch then (a restore starts the next one).
    pub epoch: Epoch,
    /// The cluster's root CA: certificates issued before the backup stay valid after a restore.
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    /// The secrets data key (without it the secrets in the store do not open); `None` for a
    /// cluster made before secrets existed.
    pub secrets_key: Option<Vec<u8>>,
    /// Every store tree at `raft_index` (`Store::dump`); the join tokens are in its cluster.
    pub store: Dump,
}

/// How many objects of each kind a backup holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub services: u64,
    pub nodes: u64,
    pub tasks: u64,
    pub networks: u64,
    pub secrets: u64,
    pub configs: u64,
}

impl Body {
    /// Objects per kind in the store.
    pub fn counts(&self) -> Counts {
        let n = |k| self.store.objects(k) as u64;
        Counts {
            services: n(Kind::Service),
            nodes: n(Kind::Node),
            tasks: n(Kind::Task),
            networks: n(Kind::Network),
            secrets: n(Kind::Secret),
            configs: n(Kind::Config),
        }
    }

    /// The root CA it holds, checked against its cluster.
    pub fn root_ca(&self) -> Result<RootCa, BackupError> {
        let ca = RootCa::from_pem(&self.ca_cert_pem, &self.ca_key_pem)
            .map_err(|e| BackupError::Inconsistent(format!("its CA: {e}")))?;
        if ca.cluster_id() != self.cluster_id {
            return Err(BackupError::Inconsistent(format!(
                "its CA is cluster {}'s, not {}'s",
                ca.cluster_id(),
                self.cluster_id
            )));
        }
        Ok(ca)
    }
}

/// The file for `body`.
pub fn encode(body: &Body) -> Result<Vec<u8>, BackupError> {
    let encoded = bincode::serialize(body).map_err(|e| BackupError::Body(e.to_string()))?;
    let total = (HEADER_BYTES + encoded.len() + CHECKSUM_BYTES) as u64;
    if total > MAX_BACKUP_BYTES {
        return Err(BackupError::TooLarge(total));
    }
    let mut out = Vec::with_capacity(total as usize);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&(encoded.len() as u64).to_be_bytes());
    out.extend_from_slice(&encoded);
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    Ok(out)
}

/// Checks a whole file and decodes its body.
pub fn decode(file: &[u8]) -> Result<Body, BackupError> {
    let have = file.len() as u64;
    if have > MAX_BACKUP_BYTES {
        return Err(BackupError::TooLarge(have));
    }
    if file.len() < MAGIC.len() || &file[..MAGIC.len()] != MAGIC {
        return Err(BackupError::BadMagic);
    }
    if file.len() < HEADER_BYTES {
        return Err(BackupError::Truncated {
            have,
            want: (HEADER_BYTES + CHECKSUM_BYTES) as u64,
        });
    }
    let word = |at: usize| u32::from_be_bytes([file[at], file[at + 1], file[at + 2], file[at + 3]]);
    let version = word(8);
    if version != FORMAT_VERSION {
        return Err(BackupError::Version(version));
    }
    let flags = word(12);
    if flags & FLAG_ENCRYPTED != 0 {
        return Err(BackupError::Encrypted);
    }
    if flags != 0 {
        return Err(BackupError::Flags(flags));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&file[16..24]);
    let body_len = u64::from_be_bytes(len);
    let want = body_len.saturating_add((HEADER_BYTES + CHECKSUM_BYTES) as u64);
    if have < want {
        return Err(BackupError::Truncated { have, want });
    }
    if have > want {
        return Err(BackupError::TrailingBytes { extra: have - want });
    }
    let end = HEADER_BYTES + body_len as usize;
    if Sha256::digest(&file[..end]).as_slice() != &file[end..] {
        return Err(BackupError::Checksum);
    }
    let body: Body = bincode::deserialize(&file[HEADER_BYTES..end])
        .map_err(|e| BackupError::Body(e.to_string()))?;
    body.root_ca()?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> Body {
        let ca = RootCa::create("c1").unwrap();
        Body {
            cluster_id: "c1".into(),
            created_ms: 1,
            node_id: "n1".into(),
            leader: false,
            caught_up: true,
            raft_term: 3,
            raft_index: 42,
            epoch: Epoch::default(),
            ca_cert_pem: ca.cert_pem().into(),
            ca_key_pem: ca.key_pem().into(),
            secrets_key: Some(vec![7; 32]),
            store: Dump::default(),
        }
    }

    #[test]
    fn a_file_decodes_to_what_was_encoded() {
        let b = body();
        let f = encode(&b).unwrap();
        assert_eq!(&f[..8], MAGIC);
        assert_eq!(decode(&f).unwrap(), b);
    }

    #[test]
    fn every_damage_is_refused_by_name() {
        let f = encode(&body()).unwrap();
        assert_eq!(decode(&f[..f.len() - 1]).unwrap_err(), {
            let have = f.len() as u64 - 1;
            BackupError::Truncated {
                have,
                want: have + 1,
            }
        });
        assert!(matches!(
            decode(&f[..HEADER_BYTES - 1]).unwrap_err(),
            BackupError::Truncated { .. }
        ));
        assert_eq!(decode(b"").unwrap_err(), BackupError::BadMagic);
        let mut g = f.clone();
        g[0] = b'X';
        assert_eq!(decode(&g).unwrap_err(), BackupError::BadMagic);
        let mut g = f.clone();
        g[11] = 2;
        assert_eq!(decode(&g).unwrap_err(), BackupError::Version(2));
        let mut g = f.clone();
        g[15] = 1;
        assert_eq!(decode(&g).unwrap_err(), BackupError::Encrypted);
        let mut g = f.clone();
        g[15] = 4;
        assert_eq!(decode(&g).unwrap_err(), BackupError::Flags(4));
        let mut g = f.clone();
        g[HEADER_BYTES + 3] ^= 1;
        assert_eq!(decode(&g).unwrap_err(), BackupError::Checksum);
        let mut g = f.clone();
        g.push(0);
        assert_eq!(
            decode(&g).unwrap_err(),
            BackupError::TrailingBytes { extra: 1 }
        );
        // A length that overflows is a truncation, not a panic.
        let mut g = f.clone();
        g[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(
            decode(&g).unwrap_err(),
            BackupError::Truncated { .. }
        ));
    }

    /// Cases per property here (`PROPTEST_CASES` overrides it).
    const FUZZ_CASES: u32 = 256;

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(FUZZ_CASES),
        ))]

        #[test]
        fn any_bytes_are_refused_without_a_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            magic in proptest::prelude::any::<bool>(),
        ) {
            let mut f = bytes;
            if magic && f.len() >= 8 {
                f[..8].copy_from_slice(MAGIC);
            }
            proptest::prop_assert!(decode(&f).is_err());
        }

        #[test]
        fn a_damaged_file_never_decodes(at in 0usize..4096, bit in 0u8..8, cut in 0usize..64) {
            let f = encode(&body()).unwrap();
            let mut g = f.clone();
            let at = at % g.len();
            g[at] ^= 1 << bit;
            proptest::prop_assert!(decode(&g).is_err());
            let mut h = f;
            h.truncate(h.len().saturating_sub(cut + 1));
            proptest::prop_assert!(decode(&h).is_err());
        }
    }

    #[test]
    fn a_ca_of_another_cluster_is_refused() {
        let mut b = body();
        let other = RootCa::create("c2").unwrap();
        b.ca_cert_pem = other.cert_pem().into();
        b.ca_key_pem = other.key_pem().into();
        let f = encode(&b).unwrap();
        assert!(matches!(
            decode(&f).unwrap_err(),
            BackupError::Inconsistent(_)
        ));
        // A key that is not the certificate's.
        let mut b = body();
        b.ca_key_pem = other.key_pem().into();
        assert!(matches!(
            decode(&encode(&b).unwrap()).unwrap_err(),
            BackupError::Inconsistent(_)
        ));
    }
}
