//! Errors as dstack answers them: a status and `{"detail": [{"code", "msg"}]}`, with
//! dstack's codes, so that its clients (and ours, which map codes back to typed errors)
//! understand them.

use dstack_core::artifacts::ArtifactError;
use dstack_core::backend::ComputeError;
use dstack_core::client::protocol::{ErrorBody, ErrorDetail};
use dstack_core::client::ServerError;
use dstack_core::engine::EngineError;
use dstack_core::http::serve::{respond, Body, Refusal};
use dstack_core::store::StoreError;
use hyper::{Response, StatusCode};

/// A failed request: a status, dstack's error code and the message.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 `resource_not_exists`.
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "resource_not_exists", message)
    }

    /// 400 `server_client_error`: a request the server cannot take.
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "server_client_error", message)
    }

    /// The answer: with this project's codes for its own clients (`native`), else with the
    /// nearest of dstack's codes (its clients know no others).
    pub(crate) fn into_response(mut self, native: bool) -> Response<Body> {
        if !native {
            self.code = match self.code {
                "resource_exists" | "resource_not_exists" => self.code,
                "backend_auth_error" => "invalid_credentials",
                _ => "error",
            };
        }
        let body = ErrorBody {
            detail: vec![self.detail()],
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        respond(self.status, "application/json", bytes)
    }

    /// dstack's error item.
    pub(crate) fn detail(&self) -> ErrorDetail {
        ErrorDetail {
            code: self.code.to_string(),
            msg: self.message.clone(),
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(Refusal(status, message): Refusal) -> Self {
        ApiError::new(status, "server_client_error", message)
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let (status, code) = match &e {
            EngineError::Store(StoreError::NameTaken(_)) => {
                (StatusCode::BAD_REQUEST, "resource_exists")
            }
            EngineError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
            EngineError::Compute(c) => match c {
                ComputeError::NoCapacity(_) => (StatusCode::BAD_REQUEST, "no_capacity"),
                ComputeError::NotFound(_) => (StatusCode::BAD_REQUEST, "resource_not_exists"),
                ComputeError::Unauthenticated(_) => (StatusCode::BAD_REQUEST, "backend_auth_error"),
                ComputeError::NotSupported(_) => (StatusCode::BAD_REQUEST, "not_supported"),
                ComputeError::Other(_) | ComputeError::Unknown(_) => {
                    (StatusCode::BAD_REQUEST, "backend_error")
                }
            },
            EngineError::Agent(_) => (StatusCode::BAD_REQUEST, "backend_error"),
            EngineError::Unsupported(_) => (StatusCode::BAD_REQUEST, "not_supported"),
            EngineError::Artifacts(a) => match a {
                ArtifactError::Exists(_) => (StatusCode::BAD_REQUEST, "resource_exists"),
                ArtifactError::NotFound(_) => (StatusCode::BAD_REQUEST, "resource_not_exists"),
                ArtifactError::Unsupported(_) => (StatusCode::BAD_REQUEST, "not_supported"),
                ArtifactError::Frozen(_) | ArtifactError::Invalid(_) => {
                    (StatusCode::BAD_REQUEST, "server_client_error")
                }
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
            },
            EngineError::Invalid(_) | EngineError::PortUsed(_) => {
                (StatusCode::BAD_REQUEST, "server_client_error")
            }
            EngineError::Server(ServerError::Refused { .. }) | EngineError::Server(_) => {
                (StatusCode::BAD_GATEWAY, "server_error")
            }
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<ArtifactError> for ApiError {
    fn from(e: ArtifactError) -> Self {
        EngineError::from(e).into()
    }
}
