//! The Microsoft identity platform's token endpoint, as far as the client
//! credentials grant goes: `POST /{tenant}/oauth2/v2.0/token` with a form body
//! (`grant_type=client_credentials`, `client_id`, `client_secret`, `scope`)
//! answers a bearer token for an hour. The tests reach ARM through azure_identity's
//! own `ClientSecretCredential` pointed here, instead of a hand-made credential.
//! Every secret is accepted; a missing parameter is refused as the platform does.

use axum::Json;
use axum::body::Bytes;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// The path of the token endpoint, under the authority host.
pub const TOKEN_PATH: &str = "/{tenant}/oauth2/v2.0/token";

/// How long an issued token lasts (the platform's default for app tokens).
const TOKEN_SECONDS: u64 = 3599;

/// Issues a token for a client credentials request.
pub async fn token(Path(tenant): Path<String>, body: Bytes) -> Response {
    let form: std::collections::HashMap<String, String> = form_urlencoded::parse(&body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let missing = ["grant_type", "client_id", "client_secret", "scope"]
        .into_iter()
        .find(|name| form.get(*name).is_none_or(String::is_empty));
    if let Some(name) = missing {
        return refused(
            "invalid_request",
            &format!(
                "AADSTS900144: The request body must contain the following parameter: '{name}'."
            ),
        );
    }
    if form["grant_type"] != "client_credentials" {
        return refused(
            "unsupported_grant_type",
            "AADSTS70003: The app requested an unsupported grant type.",
        );
    }
    tracing::debug!(%tenant, client = %form["client_id"], scope = %form["scope"], "azure: token issued");
    Json(json!({
        "token_type": "Bearer",
        "expires_in": TOKEN_SECONDS,
        "ext_expires_in": TOKEN_SECONDS,
        "access_token": format!("sim-{}", uuid::Uuid::new_v4()),
    }))
    .into_response()
}

fn refused(error: &str, description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}
