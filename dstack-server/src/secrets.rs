//! dstack's secrets routes (`secrets/list|get|create_or_update|delete`), the same in both
//! dialects: dstack's `Secret` shape (`{id, name, value}`; a value only from `get`).

use dstack_core::http::serve::{json, Body};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::errors::ApiError;
use crate::routes::body;
use crate::Shared;

#[derive(Deserialize)]
struct Named {
    name: String,
}

#[derive(Deserialize)]
struct NewValue {
    name: String,
    value: String,
}

#[derive(Deserialize)]
struct Names {
    secrets_names: Vec<String>,
}

/// dstack's `Secret`.
fn secret(name: &str, value: Option<&str>) -> Value {
    json!({"id": dstack_core::api::dstack_id(&format!("secret-{name}")), "name": name, "value": value})
}

/// dstack's `RemoteRepoCreds`.
#[derive(Deserialize)]
struct RemoteRepoCreds {
    clone_url: String,
    #[serde(default)]
    private_key: Option<String>,
    #[serde(default)]
    oauth_token: Option<String>,
}

/// dstack's `SaveRepoCredsRequest` (the repo's id and info are derived from its URL).
#[derive(Deserialize)]
struct InitRepo {
    #[serde(default)]
    repo_creds: Option<RemoteRepoCreds>,
}

/// `repos/init`: keeps a remote repo's credentials with the secrets (a repo without
/// credentials, or a local one, needs nothing kept: its code is uploaded with each run).
pub(crate) async fn init_repo(
    shared: &Shared,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let InitRepo { repo_creds } = body(req).await?;
    if let Some(creds) = repo_creds {
        let kept = dstack_core::repos::RepoCreds {
            token: creds.oauth_token.filter(|t| !t.is_empty()),
            private_key: creds.private_key.filter(|k| !k.is_empty()),
        };
        shared
            .client
            .secrets()
            .init_repo(&creds.clone_url, &kept)
            .await?;
    }
    Ok(json(&Value::Null))
}

/// Answers a `secrets/…` route.
pub(crate) async fn route(
    shared: &Shared,
    action: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let secrets = shared.client.secrets();
    match action {
        "list" => {
            let names = secrets.names().await?;
            let listed: Vec<Value> = names.iter().map(|n| secret(n, None)).collect();
            Ok(json(&listed))
        }
        "get" => {
            let Named { name } = body(req).await?;
            match secrets.get(&name).await? {
                Some(value) => Ok(json(&secret(&name, Some(&value)))),
                None => Err(ApiError::not_found(format!("secret {name} does not exist"))),
            }
        }
        "create_or_update" => {
            let NewValue { name, value } = body(req).await?;
            secrets.set(&name, &value).await?;
            Ok(json(&secret(&name, None)))
        }
        "delete" => {
            let Names { secrets_names } = body(req).await?;
            let mut missing = Vec::new();
            for name in &secrets_names {
                if !secrets.delete(name).await? {
                    missing.push(name.as_str());
                }
            }
            if missing.is_empty() {
                Ok(json(&Value::Null))
            } else {
                Err(ApiError::not_found(format!(
                    "no such secret: {}",
                    missing.join(", ")
                )))
            }
        }
        _ => Err(ApiError::not_found(format!(
            "no such route secrets/{action}"
        ))),
    }
}
