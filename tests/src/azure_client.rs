//! What the tests need to point the real Azure SDK at the simulator: azure_identity's
//! client secret credential, asking the simulator's token endpoint
//! ([`crate::azure::identity`]), and an HTTPS client that trusts the simulator's CA.

use std::sync::Arc;

use azure_core::auth::TokenCredential;
use azure_core::{TransportOptions, Url};
use azure_identity::ClientSecretCredential;

/// The tenant the tests' credential names (the simulator serves any).
const TENANT: &str = "00000000-0000-0000-0000-0000000000aa";

/// A client secret credential of `client_id` whose authority host is the
/// simulator's Azure endpoint `azure_url`, over HTTPS trusting `ca_pem`.
pub fn credential(azure_url: &str, ca_pem: &[u8], client_id: &str) -> Arc<dyn TokenCredential> {
    Arc::new(ClientSecretCredential::new(
        Arc::new(https_client(ca_pem)),
        Url::parse(azure_url).expect("the simulator's Azure URL"),
        TENANT.to_string(),
        client_id.to_string(),
        "outrigger-test-secret".to_string(),
    ))
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
