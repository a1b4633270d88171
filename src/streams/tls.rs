//! rustls client configuration (ring provider) for the MQTT-based streams.
//!
//! Roots: the system store (`/etc/ssl/certs`, via rustls-native-certs) plus `ca_file` if given.
//! A gateway image without a CA bundle and no `ca_file` gets an error naming both fixes, instead
//! of the panic rumqttc's default TLS config would give (crate-notes, "rumqttc 0.25").

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use std::path::Path;
use std::sync::Arc;

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
) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    if use_system_roots {
        let native = rustls_native_certs::load_native_certs();
        for c in native.certs {
            let _ = roots.add(c);
        }
    }
    if let Some(p) = ca_file {
        let certs = read_certs(p)?;
        if certs.is_empty() {
            return Err(format!("ca_file {}: no PEM certificate found", p.display()));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("ca_file {}: {e}", p.display()))?;
        }
    }
    if roots.is_empty() {
        return Err(
            "no trusted CA certificates: install the system CA bundle (ca-certificates) or set ca_file"
                .into(),
        );
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
) -> Result<Arc<ClientConfig>, String> {
    let certs = match ca_file {
        Some(p) => read_certs(p)?,
        None => CertificateDer::pem_slice_iter(roots_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("built-in roots: {e}"))?,
    };
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| format!("CA certificate: {e}"))?;
    }
    finish(roots, client_cert, alpn)
}

fn finish(
    roots: RootCertStore,
    client_cert: Option<(&Path, &Path)>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, String> {
    if roots.is_empty() {
        return Err("no trusted CA certificate (ca_file has none)".into());
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots);
    let mut cfg = match client_cert {
        Some((cert, key)) => {
            let chain = read_certs(cert)?;
            if chain.is_empty() {
                return Err(format!(
                    "cert_file {}: no PEM certificate found",
                    cert.display()
                ));
            }
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                format!(
                    "key_file {}: cannot read a PEM private key (PKCS#8, RSA or EC): {e}",
                    key.display()
                )
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("cert_file/key_file: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(Arc::new(cfg))
}

fn read_certs(p: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_file_iter(p)
        .map_err(|e| format!("{}: {e}", p.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", p.display()))
}
