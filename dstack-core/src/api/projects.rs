//! dstack's `Project` and `User` models of a server with one project and one user
//! (`projects/{name}/get`, `users/get_my_user`): what dstack's `project add` and
//! `project list -v` ask a server for.

use serde_json::{json, Value};

use super::{dstack_id, Owner};

/// dstack's `User` of `owner.user`, the server's administrator.
pub fn user(owner: &Owner) -> Value {
    json!({
        "id": dstack_id(&format!("user-{}", owner.user)),
        "username": owner.user,
        "created_at": null,
        "global_role": "admin",
        "email": null,
        "active": true,
        "permissions": {"can_create_projects": false},
        "ssh_public_key": null,
    })
}

/// dstack's `UserWithCreds`: the user and the token the caller authenticated with (dstack
/// gives a user its own token back; nobody else is answered).
pub fn user_with_creds(owner: &Owner, token: &str) -> Value {
    let mut value = user(owner);
    value["creds"] = json!({"token": token});
    value
}

/// dstack's `Project` of `owner.project_name`, with its one member. Backends are not listed:
/// they are the server's configuration, holding credentials.
pub fn project(owner: &Owner) -> Value {
    let user = user(owner);
    json!({
        "project_id": dstack_id(&format!("project-{}", owner.project_name)),
        "project_name": owner.project_name,
        "owner": user,
        "created_at": null,
        "backends": [],
        "members": [{
            "user": user,
            "project_role": "admin",
            "permissions": {"can_manage_ssh_fleets": true, "can_manage_secrets": true},
        }],
        "is_public": false,
        "templates_repo": null,
    })
}
