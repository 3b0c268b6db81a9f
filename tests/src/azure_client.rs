//! What the tests need to point the real Azure SDK at the simulator: a credential
//! that hands out one fixed token (the simulator takes any).

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
