//! Who a certificate names: CN = node id, OU = role, O = cluster id.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::CaError;

/// A node's role in the cluster, as carried in its certificate's OU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Manager,
    Worker,
}

impl Role {
    /// The OU spelling: `manager` or `worker`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Manager => "manager",
            Role::Worker => "worker",
        }
    }

    /// Parses the OU spelling.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "manager" => Some(Role::Manager),
            "worker" => Some(Role::Worker),
            _ => None,
        }
    }

    /// The protocol enum of `objects.proto`.
    pub fn to_proto(self) -> shoal_proto::v1::NodeRole {
        match self {
            Role::Manager => shoal_proto::v1::NodeRole::Manager,
            Role::Worker => shoal_proto::v1::NodeRole::Worker,
        }
    }

    /// From the protocol enum of `objects.proto`.
    pub fn from_proto(role: shoal_proto::v1::NodeRole) -> Role {
        match role {
            shoal_proto::v1::NodeRole::Manager => Role::Manager,
            shoal_proto::v1::NodeRole::Worker => Role::Worker,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The identity a node certificate asserts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    pub node_id: String,
    pub role: Role,
    pub cluster_id: String,
}

/// What shoal reads out of a node certificate.
#[derive(Clone, Debug)]
pub struct CertInfo {
    pub identity: NodeIdentity,
    /// Lowercase hex, as stored in `Node.certificate_serial`.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Subject alternative names: IP addresses and DNS names, as text.
    pub sans: Vec<String>,
}

/// Reads the node identity (CN, OU, O) of a DER certificate.
pub fn identity_from_cert(der: &[u8]) -> Result<NodeIdentity, CaError> {
    Ok(cert_info(der)?.identity)
}

/// Reads identity, serial, validity and SANs of a DER certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, CaError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| CaError::CertInvalid(format!("not an X.509 certificate: {e}")))?;
    let subject = cert.subject();
    let node_id = single("CN", subject.iter_common_name())?;
    let ou = single("OU", subject.iter_organizational_unit())?;
    let cluster_id = single("O", subject.iter_organization())?;
    let role = Role::parse(&ou)
        .ok_or_else(|| CaError::CertInvalid(format!("subject OU {ou:?} is not a role")))?;
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(d) => sans.push((*d).to_string()),
                GeneralName::IPAddress(b) => {
                    if let Ok(a) = <[u8; 4]>::try_from(*b) {
                        sans.push(std::net::Ipv4Addr::from(a).to_string());
                    } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                        sans.push(std::net::Ipv6Addr::from(a).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let time = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
    };
    Ok(CertInfo {
        identity: NodeIdentity {
            node_id,
            role,
            cluster_id,
        },
        serial: hex::encode(cert.tbs_certificate.raw_serial()),
        not_before: time(cert.validity().not_before),
        not_after: time(cert.validity().not_after),
        sans,
    })
}

/// The one value of a subject attribute; several or none is an invalid node certificate.
fn single<'a>(
    field: &'static str,
    mut values: impl Iterator<Item = &'a x509_parser::x509::AttributeTypeAndValue<'a>>,
) -> Result<String, CaError> {
    let value = values
        .next()
        .ok_or_else(|| CaError::CertInvalid(format!("subject has no {field}")))?
        .as_str()
        .map_err(|_| CaError::CertInvalid(format!("subject {field} is not a string")))?
        .to_string();
    if values.next().is_some() {
        return Err(CaError::CertInvalid(format!("subject has several {field}")));
    }
    Ok(value)
}
