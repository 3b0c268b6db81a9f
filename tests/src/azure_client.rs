//! What the tests need to point the real Azure SDK at the simulator: a credential
//! that hands out one fixed token (the simulator takes any), and an HTTPS client
//! that trusts the simulator's CA.

use std::sync::Arc;

use azure_core::TransportOptions;
use azure_core::auth::{AccessToken, TokenCredential};

#[derive(Debug)]
pub struct StaticToken(pub &'static str);

#[async_trait::async_trait]
impl TokenCredential for StaticToken {
    async fn get_token(&self, _scopes: &[&str]) -> azure_core::Result<AccessToken> {
        Ok(AccessToken::new(
            self.0,
            time::OffsetDateTime::now_utc() + time::Duration::hours(1),
        ))
    }

    async fn clear_cache(&self) -> azure_core::Result<()> {
        Ok(())
    }
}

/// A reqwest client that trusts `ca_pem` (the simulator's CA) besides the public
/// roots, and nothing less: certificates are checked.
pub fn https_client(ca_pem: &[u8]) -> reqwest::Client {
    let mut builder = reqwest::Client::builder().use_rustls_tls();
    for certificate in reqwest::Certificate::from_pem_bundle(ca_pem).expect("a PEM CA bundle") {
        builder = builder.add_root_certificate(certificate);
    }
    builder.build().expect("an HTTPS client")
}

/// The SDK's transport over [`https_client`].
pub fn transport(ca_pem: &[u8]) -> TransportOptions {
    TransportOptions::new(Arc::new(https_client(ca_pem)))
}
