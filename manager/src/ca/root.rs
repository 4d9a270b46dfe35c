//! The cluster root CA and the node certificates it issues.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use sha2::{Digest, Sha256};
use x509_parser::prelude::FromDer;

use super::files::{read_string, write_atomic, CA_CERT_FILE, CA_KEY_FILE};
use super::identity::cert_info;
use super::token::{base36, DIGEST_DIGITS};
use super::{CaError, Role};

/// Node certificate lifetime when the cluster configures none (DESIGN.md timers).
pub const DEFAULT_NODE_CERT_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// Root CA lifetime.
const CA_LIFETIME: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// Shortest node certificate the CA issues (tests use a few seconds).
const MIN_NODE_CERT_LIFETIME: Duration = Duration::from_secs(2);
/// How far node certificates are backdated against clock skew, at most.
const MAX_BACKDATE: Duration = Duration::from_secs(60);
/// Random bytes in a certificate serial.
const SERIAL_BYTES: usize = 16;
/// Most SANs a node certificate carries.
const MAX_SANS: usize = 8;

/// The cluster's root certificate authority (ECDSA P-256).
pub struct RootCa {
    cluster_id: String,
    cert_pem: String,
    cert_der: Vec<u8>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for RootCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootCa")
            .field("cluster_id", &self.cluster_id)
            .field("digest", &self.digest())
            .finish_non_exhaustive()
    }
}

/// A node certificate the CA issued.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    pub cert_pem: String,
    /// Lowercase hex.
    pub serial: String,
    pub not_after: SystemTime,
}

impl RootCa {
    /// A new root CA for a new cluster (`cluster init`).
    pub fn create(cluster_id: &str) -> Result<RootCa, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "shoal root CA");
        dn.push(DnType::OrganizationName, cluster_id);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - MAX_BACKDATE).into();
        params.not_after = (now + CA_LIFETIME).into();
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(RootCa {
            cluster_id: cluster_id.to_string(),
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<RootCa, CaError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert_der = pem_to_der(cert_pem, "CERTIFICATE")?;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&cert_der)
            .map_err(|e| CaError::CertInvalid(format!("CA certificate: {e}")))?;
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CaError::CertInvalid(
                "CA key does not match the CA certificate".into(),
            ));
        }
        let cluster_id = cert
            .subject()
            .iter_organization()
            .next()
            .and_then(|o| o.as_str().ok())
            .ok_or_else(|| CaError::CertInvalid("CA certificate has no O (cluster id)".into()))?
            .to_string();
        let issuer = Issuer::from_ca_cert_der(&cert_der.clone().into(), key)?;
        Ok(RootCa {
            cluster_id,
            cert_pem: cert_pem.to_string(),
            cert_der,
            key_pem: key_pem.to_string(),
            issuer,
        })
    }

    /// Loads `ca.crt` and `ca.key` from a PKI directory.
    pub fn load(pki_dir: &Path) -> Result<RootCa, CaError> {
        let cert = read_string(&pki_dir.join(CA_CERT_FILE))?;
        let key = read_string(&pki_dir.join(CA_KEY_FILE))?;
        RootCa::from_pem(&cert, &key).map_err(|e| CaError::BadFile {
            path: pki_dir.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Writes `ca.crt` (0644) and `ca.key` (0600), each atomically.
    pub fn save(&self, pki_dir: &Path) -> Result<(), CaError> {
        write_atomic(&pki_dir.join(CA_KEY_FILE), self.key_pem.as_bytes(), 0o600)?;
        write_atomic(&pki_dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), 0o644)
    }

    /// The cluster id (the CA certificate's O).
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM (managers keep it on disk; it never enters the Raft log).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The base36 SHA-256 of the CA certificate DER, as join tokens carry it.
    pub fn digest(&self) -> String {
        cert_digest(&self.cert_der)
    }

    /// Issues a node certificate for the key in `csr_pem`. The subject is the CA's choice
    /// (CN = `node_id`, OU = `role`, O = cluster id); a CSR asking for any other CN, OU or O,
    /// or for a CA certificate, is refused. `sans` are IP addresses or DNS names.
    pub fn issue(
        &self,
        csr_pem: &str,
        node_id: &str,
        role: Role,
        sans: &[String],
        lifetime: Duration,
    ) -> Result<IssuedCert, CaError> {
        if lifetime < MIN_NODE_CERT_LIFETIME || lifetime > CA_LIFETIME {
            return Err(CaError::BadLifetime(lifetime));
        }
        if sans.len() > MAX_SANS {
            return Err(CaError::CsrInvalid(format!("more than {MAX_SANS} names")));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::CsrInvalid(e.to_string()))?;
        if !matches!(csr.params.is_ca, IsCa::NoCa | IsCa::ExplicitNoCa) {
            return Err(CaError::CsrInvalid("asks for a CA certificate".into()));
        }
        check_csr_subject(csr_pem, node_id, role, &self.cluster_id)?;

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_id);
        dn.push(DnType::OrganizationalUnitName, role.as_str());
        dn.push(DnType::OrganizationName, self.cluster_id.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = sans.iter().map(|s| san(s)).collect::<Result<Vec<_>, _>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        // Backdate a little against clock skew, but never by a large share of a short lifetime.
        params.not_before = (now - MAX_BACKDATE.min(lifetime / 10)).into();
        params.not_after = (now + lifetime).into();
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        let info = cert_info(cert.der())?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            serial: info.serial,
            not_after: info.not_after,
        })
    }
}

/// The base36 SHA-256 digest of a certificate's DER.
pub(crate) fn cert_digest(der: &[u8]) -> String {
    base36(&Sha256::digest(der), DIGEST_DIGITS)
}

/// The DER of the first PEM block with this label.
pub(crate) fn pem_to_der(pem: &str, label: &str) -> Result<Vec<u8>, CaError> {
    use rustls::pki_types::pem::{PemObject, SectionKind};
    for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem.as_bytes()) {
        let (kind, der) = item.map_err(|e| CaError::CertInvalid(format!("bad PEM: {e}")))?;
        let want = match label {
            "CERTIFICATE" => SectionKind::Certificate,
            _ => SectionKind::Csr,
        };
        if kind == want {
            return Ok(der);
        }
    }
    Err(CaError::CertInvalid(format!("no {label} PEM block")))
}

/// The CA sets the subject itself, so a CSR may leave it empty; whatever it does name must be
/// what will be issued, so a request for someone else's identity or role fails loudly.
fn check_csr_subject(
    csr_pem: &str,
    node_id: &str,
    role: Role,
    cluster_id: &str,
) -> Result<(), CaError> {
    let der = pem_to_der(csr_pem, "CERTIFICATE REQUEST")?;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|e| CaError::CsrInvalid(e.to_string()))?;
    let subject = &csr.certification_request_info.subject;
    let checks: [(&'static str, Vec<_>, &str); 3] = [
        ("CN", subject.iter_common_name().collect(), node_id),
        (
            "OU",
            subject.iter_organizational_unit().collect(),
            role.as_str(),
        ),
        ("O", subject.iter_organization().collect(), cluster_id),
    ];
    for (field, values, issued) in checks {
        for v in values {
            let asked = v
                .as_str()
                .map_err(|_| CaError::CsrInvalid(format!("subject {field} is not a string")))?;
            if asked != issued {
                return Err(CaError::CsrIdentityMismatch {
                    field,
                    asked: asked.to_string(),
                    issued: issued.to_string(),
                });
            }
        }
    }
    Ok(())
}

fn san(name: &str) -> Result<SanType, CaError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !valid {
        return Err(CaError::BadAddress(name.to_string()));
    }
    let dns = name
        .to_string()
        .try_into()
        .map_err(|_| CaError::BadAddress(name.to_string()))?;
    Ok(SanType::DnsName(dns))
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; SERIAL_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut b);
    // Positive and of full length, so the DER encoding is exactly SERIAL_BYTES long.
    b[0] = (b[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::make_csr;

    #[test]
    fn issues_the_subject_it_decides() {
        let ca = RootCa::create("cluster-a").unwrap();
        let (_, csr) = make_csr(None).unwrap();
        let issued = ca
            .issue(
                &csr,
                "node1",
                Role::Worker,
                &["127.0.0.1".into(), "h1.lan".into()],
                Duration::from_secs(60),
            )
            .unwrap();
        let der = pem_to_der(&issued.cert_pem, "CERTIFICATE").unwrap();
        let info = cert_info(&der).unwrap();
        assert_eq!(info.identity.node_id, "node1");
        assert_eq!(info.identity.role, Role::Worker);
        assert_eq!(info.identity.cluster_id, "cluster-a");
        assert_eq!(
            info.sans,
            vec!["127.0.0.1".to_string(), "h1.lan".to_string()]
        );
        assert_eq!(info.serial, issued.serial);
        assert_eq!(info.serial.len(), 2 * SERIAL_BYTES);
        let life = info.not_after.duration_since(info.not_before).unwrap();
        assert!(
            life >= Duration::from_secs(60) && life <= Duration::from_secs(68),
            "{life:?}"
        );
    }

    #[test]
    fn refuses_a_csr_for_another_identity() {
        let ca = RootCa::create("cluster-a").unwrap();
        let (_, csr) = make_csr(Some("someone-else")).unwrap();
        let err = ca
            .issue(&csr, "node1", Role::Worker, &[], Duration::from_secs(60))
            .unwrap_err();
        assert!(
            matches!(err, CaError::CsrIdentityMismatch { field: "CN", .. }),
            "{err}"
        );
        let (_, same) = make_csr(Some("node1")).unwrap();
        ca.issue(&same, "node1", Role::Worker, &[], Duration::from_secs(60))
            .unwrap();
    }

    #[test]
    fn refuses_garbage_and_bad_names() {
        let ca = RootCa::create("c").unwrap();
        assert!(matches!(
            ca.issue(
                "not a csr",
                "n",
                Role::Worker,
                &[],
                DEFAULT_NODE_CERT_LIFETIME
            ),
            Err(CaError::CertInvalid(_) | CaError::CsrInvalid(_))
        ));
        let (_, csr) = make_csr(None).unwrap();
        assert!(matches!(
            ca.issue(
                &csr,
                "n",
                Role::Worker,
                &["bad name!".into()],
                DEFAULT_NODE_CERT_LIFETIME
            ),
            Err(CaError::BadAddress(_))
        ));
        assert!(matches!(
            ca.issue(&csr, "n", Role::Worker, &[], Duration::from_millis(10)),
            Err(CaError::BadLifetime(_))
        ));
    }

    #[test]
    fn save_and_load_keep_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = RootCa::create("cluster-b").unwrap();
        ca.save(dir.path()).unwrap();
        let back = RootCa::load(dir.path()).unwrap();
        assert_eq!(back.digest(), ca.digest());
        assert_eq!(back.cluster_id(), "cluster-b");
        let (_, csr) = make_csr(None).unwrap();
        back.issue(&csr, "n", Role::Manager, &[], DEFAULT_NODE_CERT_LIFETIME)
            .unwrap();
    }
}
