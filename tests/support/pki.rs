//! Test PKI: a CA, a server certificate for localhost, client certificates, written as PEM files.
#![allow(dead_code)]

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use std::path::{Path, PathBuf};

pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pub pem_path: PathBuf,
}

/// A certificate and key written to `dir`.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let cert = p.self_signed(&key).unwrap();
        let pem_path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&pem_path, cert.pem()).unwrap();
        Ca {
            cert,
            key,
            pem_path,
        }
    }

    /// A certificate with common name `cn` (clients) and `sans` (servers).
    pub fn issue(&self, dir: &Path, cn: &str, sans: &[&str]) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        let out = Issued {
            cert: dir.join(format!("{cn}.pem")),
            key: dir.join(format!("{cn}.key")),
        };
        std::fs::write(&out.cert, cert.pem()).unwrap();
        std::fs::write(&out.key, key.serialize_pem()).unwrap();
        out
    }
}
