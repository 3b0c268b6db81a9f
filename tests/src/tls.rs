//! HTTPS for the simulated Azure Resource Manager: the server identity (from the
//! local cluster's CA, or a throwaway CA made in process), and a serve loop that
//! terminates TLS in front of an axum router.

use std::sync::Arc;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Why a TLS identity could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("failed to read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{what}: {message}")]
    Bad { what: String, message: String },
}

/// A server certificate chain and key, in PEM; and, when made here, the CA that
/// signed them (what a client trusts).
#[derive(Clone)]
pub struct TlsIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub ca_pem: Option<Vec<u8>>,
}

impl TlsIdentity {
    /// From PEM files (`hack/cluster.d/50-sim.sh` issues them from the cluster's CA).
    pub fn from_files(cert: &str, key: &str) -> Result<Self, TlsError> {
        let read = |path: &str| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.to_string(),
                source,
            })
        };
        Ok(TlsIdentity {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            ca_pem: None,
        })
    }

    /// A fresh CA and a certificate it signs for `127.0.0.1` and `localhost`.
    pub fn generate() -> Result<Self, TlsError> {
        let bad = |what: &str| {
            let what = what.to_string();
            move |e: rcgen::Error| TlsError::Bad {
                what,
                message: e.to_string(),
            }
        };
        let ca_key = rcgen::KeyPair::generate().map_err(bad("CA key"))?;
        let mut ca = rcgen::CertificateParams::new(Vec::new()).map_err(bad("CA"))?;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "outrigger-sim-ca");
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_cert = ca.self_signed(&ca_key).map_err(bad("CA"))?;
        let issuer = rcgen::Issuer::new(ca, ca_key);

        let key = rcgen::KeyPair::generate().map_err(bad("server key"))?;
        let mut server =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .map_err(bad("server certificate"))?;
        server
            .distinguished_name
            .push(rcgen::DnType::CommonName, "outrigger-sim-azure");
        server.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = server
            .signed_by(&key, &issuer)
            .map_err(bad("server certificate"))?;
        Ok(TlsIdentity {
            cert_pem: cert.pem().into_bytes(),
            key_pem: key.serialize_pem().into_bytes(),
            ca_pem: Some(ca_cert.pem().into_bytes()),
        })
    }

    /// The rustls acceptor for this identity (HTTP/1.1 and HTTP/2 by ALPN).
    pub fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
        let bad = |what: &str, e: &dyn std::fmt::Display| TlsError::Bad {
            what: what.to_string(),
            message: e.to_string(),
        };
        let chain = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("certificate", &e))?;
        if chain.is_empty() {
            return Err(bad("certificate", &"no PEM CERTIFICATE block"));
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| bad("key", &e))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("TLS versions", &e))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| bad("certificate and key", &e))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

/// Serves `router` over TLS on `listener` until `stop` turns true. A handshake
/// that fails (a client that does not trust the CA) ends only its connection.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    acceptor: tokio_rustls::TlsAcceptor,
    mut stop: watch::Receiver<bool>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => break,
        };
        let Ok((tcp, peer)) = accepted else {
            continue;
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        let mut stop = stop.clone();
        connections.spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(e) => {
                    tracing::debug!(%peer, "azure: TLS handshake failed: {e}");
                    return;
                }
            };
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(tls), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stop.wait_for(|s| *s) => connection.as_mut().graceful_shutdown(),
            }
        });
        while connections.try_join_next().is_some() {}
    }
    connections.shutdown().await;
}
