//! rustls client configuration (ring provider) for the MQTT-based streams.
//!
//! Roots: the system store (`/etc/ssl/certs`, via rustls-native-certs) plus `ca_file` if given;
//! for clouds, the roots their documentation names (AWS: Amazon Root CA 1; Azure: see
//! [`AZURE_IOT_ROOTS`]).
//! A gateway image without a CA bundle and no `ca_file` gets an error naming both fixes, instead
//! of the panic rumqttc's default TLS config would give (crate-notes, "rumqttc 0.25").

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a TLS client configuration cannot be built (a file, a key, the trust store).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "no trusted CA certificates: install the system CA bundle (ca-certificates) or set ca_file"
    )]
    NoSystemRoots,
    #[error("no trusted CA certificate (ca_file has none)")]
    NoRoots,
    #[error("{}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("{what} {}: no PEM certificate found", path.display())]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("key_file {}: cannot read a PEM private key (PKCS#8, RSA or EC): {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    #[error("{what}: {source}")]
    Rustls {
        what: &'static str,
        source: rustls::Error,
    },
    #[error("built-in roots: {0}")]
    BuiltIn(String),
}

/// Install ring as the process-wide rustls provider (rumqttc's WebSocket path and any library
/// that asks for the default provider need one). Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Build a client config. `alpn` is e.g. `x-amzn-mqtt-ca` for AWS IoT on port 443.
pub fn client_config(
    ca_file: Option<&Path>,
    client_cert: Option<(&Path, &Path)>,
    use_system_roots: bool,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    if use_system_roots {
        let native = rustls_native_certs::load_native_certs();
        for c in native.certs {
            let _ = roots.add(c);
        }
    }
    if let Some(p) = ca_file {
        add_ca_file(&mut roots, p)?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoSystemRoots);
    }
    finish(roots, client_cert, alpn)
}

/// Amazon Root CA 1 (SHA-256 8ECDE688 4F3D87B1 125BA31A C3FCB13D 7016DE7F 57CC904F E1CB97C6
/// AE98196E), the default trust of `aws-iot` streams, as AWS advises for `-ats` endpoints.
pub const AMAZON_ROOT_CA_1: &[u8] = include_bytes!("certs/AmazonRootCA1.pem");

/// A client config that trusts only `roots_pem` (and `ca_file` instead, when given): for
/// clouds whose documentation names the roots to trust.
pub fn client_config_pinned_roots(
    roots_pem: &[u8],
    ca_file: Option<&Path>,
    client_cert: Option<(&Path, &Path)>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let certs = match ca_file {
        Some(p) => read_certs(p)?,
        None => CertificateDer::pem_slice_iter(roots_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::BuiltIn(e.to_string()))?,
    };
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|source| TlsError::Rustls {
            what: "CA certificate",
            source,
        })?;
    }
    finish(roots, client_cert, alpn)
}

/// The roots Microsoft advises devices to trust for Azure IoT Hub ("Azure IoT TLS: changes to
/// server certificates", Azure IoT Hub docs), the default trust of `azure-iot-hub` streams:
/// - DigiCert Global Root G2 (SHA-256 CB3CCBB7 6031E5E0 138F8DD3 9A23F9DE 47FFC35E 43C1144C
///   EA27D46A 5AB1CB5F), which IoT Hub's server certificates chain to since the 2023–2024
///   migration;
/// - Microsoft RSA Root Certificate Authority 2017 (SHA-256 C741F70F 4B2A8D88 BF2E71C1 4122EF53
///   EF10EBA0 CFA5E64C FA20F418 853073E0), Microsoft's own root, listed for future changes;
/// - Baltimore CyberTrust Root (SHA-256 16AF57A9 F676B0AB 126095AA 5EBADEF2 2AB31119 D644AC95
///   CD4B93DB F3F26AEB), the pre-migration root, listed by Microsoft for hubs not yet moved. It
///   expired on 2025-05-12; trust anchors carry no validity check in rustls, so it only matters
///   for a server that still sends a Baltimore chain.
pub const AZURE_IOT_ROOTS: [&[u8]; 3] = [
    include_bytes!("certs/DigiCert_Global_Root_G2.pem"),
    include_bytes!("certs/Microsoft_RSA_Root_Certificate_Authority_2017.pem"),
    include_bytes!("certs/Baltimore_CyberTrust_Root.pem"),
];

/// A client config trusting the built-in `roots_pem` plus `ca_file` when given (unlike
/// [`client_config_pinned_roots`], where `ca_file` replaces them). No system roots.
pub fn client_config_with_roots(
    roots_pem: &[&[u8]],
    ca_file: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for pem in roots_pem {
        for c in CertificateDer::pem_slice_iter(pem) {
            let c = c.map_err(|e| TlsError::BuiltIn(e.to_string()))?;
            roots.add(c).map_err(|e| TlsError::BuiltIn(e.to_string()))?;
        }
    }
    if let Some(p) = ca_file {
        add_ca_file(&mut roots, p)?;
    }
    finish(roots, None, alpn)
}

fn finish(
    roots: RootCertStore,
    client_cert: Option<(&Path, &Path)>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Rustls {
                what: "TLS setup",
                source,
            })?
            .with_root_certificates(roots);
    let mut cfg = match client_cert {
        Some((cert, key)) => {
            let chain = read_certs(cert)?;
            if chain.is_empty() {
                return Err(TlsError::NoCertificate {
                    what: "cert_file",
                    path: cert.to_path_buf(),
                });
            }
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
                path: key.to_path_buf(),
                reason: e.to_string(),
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|source| TlsError::Rustls {
                    what: "cert_file/key_file",
                    source,
                })?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// Add every certificate of a PEM `ca_file` to `roots`; a file without one is an error.
fn add_ca_file(roots: &mut RootCertStore, p: &Path) -> Result<(), TlsError> {
    let certs = read_certs(p)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what: "ca_file",
            path: p.to_path_buf(),
        });
    }
    for c in certs {
        roots.add(c).map_err(|source| TlsError::Rustls {
            what: "ca_file",
            source,
        })?;
    }
    Ok(())
}

fn read_certs(p: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |reason: String| TlsError::Read {
        path: p.to_path_buf(),
        reason,
    };
    CertificateDer::pem_file_iter(p)
        .map_err(|e| read(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded Azure roots are the certificates their documented fingerprints name.
    #[test]
    fn azure_roots_are_the_documented_certificates() {
        let want = [
            "CB3CCBB76031E5E0138F8DD39A23F9DE47FFC35E43C1144CEA27D46A5AB1CB5F",
            "C741F70F4B2A8D88BF2E71C14122EF53EF10EBA0CFA5E64CFA20F418853073E0",
            "16AF57A9F676B0AB126095AA5EBADEF22AB31119D644AC95CD4B93DBF3F26AEB",
        ];
        for (pem, want) in AZURE_IOT_ROOTS.iter().zip(want) {
            let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(certs.len(), 1);
            let d = ring::digest::digest(&ring::digest::SHA256, certs[0].as_ref());
            assert_eq!(hex::encode_upper(d.as_ref()), want);
        }
        assert!(client_config_with_roots(&AZURE_IOT_ROOTS, None, &[]).is_ok());
        let e =
            client_config_with_roots(&AZURE_IOT_ROOTS, Some(Path::new("/nonexistent.pem")), &[])
                .unwrap_err()
                .to_string();
        assert!(e.contains("/nonexistent.pem"), "{e}");
    }
}
