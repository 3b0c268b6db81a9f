//! EC2 errors as EC2 sends them: an XML `<Response><Errors>` body with a code the
//! SDKs surface (`err.code()`), and the HTTP status EC2 uses for that code.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

/// One EC2 error response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ec2Error {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
}

impl Ec2Error {
    fn new(status: StatusCode, code: &str, message: String) -> Self {
        Ec2Error {
            status,
            code: code.to_string(),
            message,
        }
    }

    /// No capacity for the type in the zone. EC2 lists this among its server
    /// errors and answers it with 500, which the SDKs retry.
    pub fn insufficient_capacity(instance_type: &str, zone: &str) -> Self {
        Ec2Error::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InsufficientInstanceCapacity",
            format!(
                "We currently do not have sufficient {instance_type} capacity in the Availability Zone you requested ({zone}). Our system will be working on provisioning additional capacity. You can currently get {instance_type} capacity by not specifying an Availability Zone in your request or choosing a different Availability Zone."
            ),
        )
    }

    /// The account's vCPU quota for the type's instance family is used up.
    pub fn vcpu_limit(instance_type: &str) -> Self {
        Ec2Error::new(
            StatusCode::BAD_REQUEST,
            "VcpuLimitExceeded",
            format!(
                "You have requested more vCPU capacity than your current vCPU limit allows for the instance bucket that the specified instance type ({instance_type}) belongs to. Please visit the Service Quotas console to request an adjustment to this limit."
            ),
        )
    }

    /// Throttled.
    pub fn request_limit() -> Self {
        Ec2Error::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "RequestLimitExceeded",
            "Request limit exceeded.".to_string(),
        )
    }

    pub fn internal(message: &str) -> Self {
        Ec2Error::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            message.to_string(),
        )
    }

    /// The region is out (an outage with `api: true`).
    pub fn unavailable() -> Self {
        Ec2Error::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            "The server is overloaded and can't handle the request.".to_string(),
        )
    }

    /// A `ClientToken` reused with different parameters.
    pub fn idempotent_mismatch(token: &str) -> Self {
        Ec2Error::new(
            StatusCode::BAD_REQUEST,
            "IdempotentParameterMismatch",
            format!(
                "The client token {token} was already used by a RunInstances request with different parameters."
            ),
        )
    }

    /// The XML body, with `request_id` as its `RequestID`.
    pub fn body(&self, request_id: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{}</Code><Message>{}</Message></Error></Errors><RequestID>{}</RequestID></Response>",
            escape(&self.code),
            escape(&self.message),
            escape(request_id)
        )
    }

    pub fn into_response(self, request_id: &str) -> Response {
        (
            self.status,
            [(header::CONTENT_TYPE, "text/xml;charset=UTF-8")],
            self.body(request_id),
        )
            .into_response()
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_the_ec2_error_document() {
        let e = Ec2Error::internal("a < b");
        assert_eq!(
            e.body("req-1"),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>InternalError</Code><Message>a &lt; b</Message></Error></Errors><RequestID>req-1</RequestID></Response>"
        );
        assert_eq!(
            super::super::moto::parse_error(&e.body("r")),
            Some(("InternalError".into(), "a < b".into()))
        );
    }
}
