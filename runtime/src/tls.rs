//! Cluster identity: one CA per cluster, one certificate per node (`ID.node.dsys` plus the
//! shared name `node.dsys`), one admin certificate for the CLI (`cli.client.dsys`) and one
//! read-only client certificate (`reader.client.dsys`), all made by [`init_cluster_certs`]. The transport uses them for mutual TLS in both directions.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Name every node certificate carries, used by clients that only know an address.
pub(crate) const ANY_NODE_NAME: &str = "node.dsys";

/// Name of the node certificate for `id`.
pub(crate) fn node_name(id: &str) -> String {
    format!("{id}.node.dsys")
}

/// Name of the CLI client certificate (admin: may change state).
pub(crate) const CLIENT_NAME: &str = "cli.client.dsys";

/// Name of the read-only client certificate.
pub(crate) const READER_NAME: &str = "reader.client.dsys";

/// Problems with certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing or unreadable.
    #[error("certificates: {path}: {msg} (run `dsys cluster init`)")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// Generating or loading key material failed.
    #[error("certificates: {0}")]
    Crypto(String),
}

fn crypto<E: std::fmt::Display>(e: E) -> TlsError {
    TlsError::Crypto(e.to_string())
}

/// Install the ring crypto provider for rustls once per process (quinn uses ring).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Create `dir/ca.pem`, `dir/<id>.pem` + `dir/<id>.key` for each node id, the admin client's
/// `dir/cli.pem` + `dir/cli.key` and the read-only client's `dir/reader.pem` +
/// `dir/reader.key`. Existing files are replaced: re-running makes a new CA.
pub fn init_cluster_certs(dir: &Path, node_ids: &[String]) -> Result<(), TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    std::fs::create_dir_all(dir).map_err(|e| TlsError::File {
        path: dir.into(),
        msg: e.to_string(),
    })?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(crypto)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "dsys cluster CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(crypto)?)
        .map_err(crypto)?;
    write(dir, "ca.pem", &ca.pem())?;
    let leaf = |file: &str, names: Vec<String>| -> Result<(), TlsError> {
        let key = KeyPair::generate().map_err(crypto)?;
        let mut params = CertificateParams::new(names.clone()).map_err(crypto)?;
        params
            .distinguished_name
            .push(DnType::CommonName, &names[0]);
        let cert = params.signed_by(&key, &ca).map_err(crypto)?;
        write(dir, &format!("{file}.pem"), &cert.pem())?;
        write(dir, &format!("{file}.key"), &key.serialize_pem())
    };
    for id in node_ids {
        leaf(id, vec![node_name(id), ANY_NODE_NAME.to_string()])?;
    }
    leaf("cli", vec![CLIENT_NAME.to_string()])?;
    leaf("reader", vec![READER_NAME.to_string()])
}

fn write(dir: &Path, name: &str, body: &str) -> Result<(), TlsError> {
    let path = dir.join(name);
    std::fs::write(&path, body).map_err(|e| TlsError::File {
        path,
        msg: e.to_string(),
    })
}

/// A loaded identity: CA roots plus our own chain and key.
#[derive(Clone, Debug)]
pub struct TlsIdentity {
    roots: Arc<rustls::RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl TlsIdentity {
    /// Load the CA and the certificate named `file` (`n1`, `cli`) from `dir`.
    pub fn load(dir: &Path, file: &str) -> Result<Self, TlsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|e| TlsError::File {
                path,
                msg: e.to_string(),
            })
        };
        let ca = read("ca.pem")?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&ca) {
            roots.add(c.map_err(crypto)?).map_err(crypto)?;
        }
        let chain = CertificateDer::pem_slice_iter(&read(&format!("{file}.pem"))?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(crypto)?;
        let key = PrivateKeyDer::from_pem_slice(&read(&format!("{file}.key"))?).map_err(crypto)?;
        Ok(TlsIdentity {
            roots: Arc::new(roots),
            chain,
            key: Arc::new(key),
        })
    }

    pub(crate) fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder(self.roots.clone())
            .build()
            .map_err(crypto)?;
        let mut cfg = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(crypto)?;
        cfg.alpn_protocols = vec![b"dsys/1".to_vec()];
        Ok(cfg)
    }

    pub(crate) fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut cfg = rustls::ClientConfig::builder()
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(crypto)?;
        cfg.alpn_protocols = vec![b"dsys/1".to_vec()];
        Ok(cfg)
    }
}

/// Whether the (already chain-verified) end-entity certificate is valid for `name`.
pub(crate) fn cert_names(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let Ok(sn) = ServerName::try_from(name.to_string()) else {
        return false;
    };
    ee.verify_is_valid_for_subject_name(&sn).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certs_name_their_node() {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        init_cluster_certs(dir.path(), &["n1".into(), "n2".into()]).unwrap();
        let pem = std::fs::read(dir.path().join("n1.pem")).unwrap();
        let cert = CertificateDer::pem_slice_iter(&pem)
            .next()
            .unwrap()
            .unwrap();
        assert!(cert_names(&cert, "n1.node.dsys"));
        assert!(cert_names(&cert, "node.dsys"));
        assert!(!cert_names(&cert, "n2.node.dsys"));
        let id = TlsIdentity::load(dir.path(), "n2").unwrap();
        id.server_config().unwrap();
        id.client_config().unwrap();
        assert!(TlsIdentity::load(dir.path(), "n9").is_err());
    }
}
