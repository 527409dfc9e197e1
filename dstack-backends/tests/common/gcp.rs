//! A stand-in for the GCP Compute Engine REST API (no emulator exists): it serves the calls the
//! `gcp` backend makes — firewalls, instances, disks, zone operations — keeps their state, and
//! checks each request's shape against what the real API requires and what dstack sends
//! (every violation is recorded; tests assert there are none). Machine types can be made
//! "exhausted" in a zone to inject capacity errors. It is a fake, used because nothing real can
//! run here; it says nothing about behaviour beyond the shapes it checks.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::http::read_request;

/// What the stand-in holds.
#[derive(Default)]
pub struct State {
    /// Instances by `zone/name`.
    pub instances: BTreeMap<String, Value>,
    /// Disks by `zone/name`.
    pub disks: BTreeMap<String, Value>,
    /// Firewall rules by name.
    pub firewalls: BTreeMap<String, Value>,
    /// `METHOD path` of every request, in order.
    pub calls: Vec<String>,
    /// Requests whose shape was wrong, with why.
    pub violations: Vec<String>,
    /// `(zone, machine type)` pairs without capacity.
    pub exhausted: Vec<(String, String)>,
    /// The access token the metadata server hands out for the instance's service account;
    /// `None`: the instance has no service account.
    pub service_account_token: Option<String>,
    /// The `Authorization` header of every request that had one.
    pub authorizations: Vec<String>,
    next_ip: u32,
}

impl State {
    /// The instances that are mapped to a host (label `dstack_address`), with their user
    /// data.
    fn booting(&self) -> Vec<super::cloud_init::Booting> {
        self.instances
            .iter()
            .filter_map(|(id, body)| {
                let address = body["labels"]["dstack_address"].as_str()?;
                let user_data = body["metadata"]["items"]
                    .as_array()?
                    .iter()
                    .find(|i| i["key"] == "user-data")?["value"]
                    .as_str()?;
                Some(super::cloud_init::Booting {
                    id: id.clone(),
                    address: address.to_string(),
                    user_data: user_data.to_string(),
                })
            })
            .collect()
    }
}

/// The `gcp` backend's configuration for the stand-in at `endpoint` (project `test-project`,
/// region `us-central1`, an image logged into as root), its instances mapped to `addresses`.
pub fn config(endpoint: &str, addresses: Vec<String>) -> dstack_backends::config::GcpConfig {
    use dstack_backends::config::{GcpConfig, GcpCreds, OsImage, OsImages};
    GcpConfig {
        project_id: "test-project".into(),
        creds: Some(GcpCreds::Anonymous),
        regions: Some(vec!["us-central1".into()]),
        os_images: OsImages {
            cpu: Some(OsImage {
                name: "projects/ubuntu-os-cloud/global/images/family/ubuntu-2204-lts".into(),
                owner: String::new(),
                user: "root".into(),
            }),
            nvidia: None,
        },
        endpoint_url: Some(endpoint.to_string()),
        instance_addresses: addresses,
        ..GcpConfig::default()
    }
}

/// The stand-in server; stopped on drop.
pub struct GcpStandIn {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its state.
    pub state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl GcpStandIn {
    /// Starts the stand-in.
    pub async fn start() -> GcpStandIn {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, &state).await;
                });
            }
        });
        GcpStandIn { url, state, task }
    }

    /// Makes `machine_type` have no capacity in `zone`.
    pub fn exhaust(&self, zone: &str, machine_type: &str) {
        let mut state = self.state.lock().unwrap();
        state
            .exhausted
            .push((zone.to_string(), machine_type.to_string()));
    }

    /// Boots `hosts` as the stand-in's instances mapped to them come (see `cloud_init`).
    pub fn boot(&self, hosts: &super::netns::TestHosts) {
        let state = self.state.clone();
        hosts.boot_instances(move || {
            let booting = state.lock().unwrap().booting();
            async move { booting }
        });
    }

    /// The shape violations seen so far.
    pub fn violations(&self) -> Vec<String> {
        self.state.lock().unwrap().violations.clone()
    }
}

impl Drop for GcpStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    while let Some((head, body)) = read_request(&mut stream).await? {
        let line = head.lines().next().unwrap_or_default().to_string();
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let target = parts.next().unwrap_or_default().to_string();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let header = |name: &str| {
            head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let (status, text) = {
            let mut state = state.lock().unwrap();
            state.calls.push(format!("{method} {path}"));
            if let Some(authorization) = header("authorization") {
                state.authorizations.push(authorization);
            }
            match path.strip_prefix("/computeMetadata/v1/") {
                Some(key) => metadata(&state, key, header("metadata-flavor").as_deref()),
                None => {
                    let (status, answer) = route(&mut state, &method, path, query, &body);
                    (status, answer.to_string())
                }
            }
        };
        let reason = if status == 200 { "OK" } else { "Error" };
        let response = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
        stream.write_all(response.as_bytes()).await?;
    }
    Ok(())
}

/// The metadata server of the (first) instance: its name, zone and service account token.
fn metadata(state: &State, key: &str, flavor: Option<&str>) -> (u16, String) {
    if flavor != Some("Google") {
        return (403, "Missing Metadata-Flavor:Google header".to_string());
    }
    let Some((zone, name)) = state
        .instances
        .keys()
        .next()
        .and_then(|k| k.split_once('/'))
    else {
        return (404, "no instance".to_string());
    };
    match (key, &state.service_account_token) {
        ("instance/name", _) => (200, name.to_string()),
        ("instance/zone", _) => (200, format!("projects/123456/zones/{zone}")),
        ("instance/service-accounts/default/token", Some(token)) => (
            200,
            json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"}).to_string(),
        ),
        _ => (404, format!("no metadata {key}")),
    }
}

fn operation(zone: &str, target: &str) -> Value {
    json!({
        "kind": "compute#operation",
        "name": format!("operation-{}", target.replace('/', "-")),
        "status": "DONE",
        "zone": zone,
        "targetLink": target,
    })
}

fn error(status: u16, message: &str) -> (u16, Value) {
    (
        status,
        json!({"error": {"code": status, "message": message, "errors": [{"message": message}]}}),
    )
}

/// Decodes `%XX` escapes of a query value.
fn unescape(s: &str) -> String {
    let bytes = s.replace('+', " ").into_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&String::from_utf8_lossy(&bytes[i + 1..i + 3]), 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| unescape(v))
    })
}

fn label_ok(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn route(state: &mut State, method: &str, path: &str, query: &str, body: &Value) -> (u16, Value) {
    let Some(rest) = path.strip_prefix("/compute/v1/projects/") else {
        return error(404, &format!("unknown path {path}"));
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match (method, parts.as_slice()) {
        ("GET", [_, "global", "firewalls", name]) => match state.firewalls.get(*name) {
            Some(rule) => (200, rule.clone()),
            None => error(404, &format!("firewall {name} not found")),
        },
        ("POST", [_, "global", "firewalls"]) => {
            check_firewall(state, body);
            let name = body["name"].as_str().unwrap_or_default().to_string();
            state.firewalls.insert(name.clone(), body.clone());
            (200, operation("", &format!("global/firewalls/{name}")))
        }
        ("POST", [_, "zones", zone, "instances"]) => insert_instance(state, zone, body),
        ("GET", [_, "zones", zone, "instances"]) => {
            let filter = query_param(query, "filter").unwrap_or_default();
            let wanted = filter
                .strip_prefix("labels.dstack_owner = \"")
                .and_then(|f| f.strip_suffix('"'));
            if wanted.is_none() {
                state
                    .violations
                    .push(format!("instances.list: unexpected filter {filter:?}"));
            }
            let items: Vec<Value> = state
                .instances
                .iter()
                .filter(|(key, _)| key.starts_with(&format!("{zone}/")))
                .map(|(_, i)| i.clone())
                .filter(|i| i["labels"]["dstack_owner"].as_str() == wanted)
                .collect();
            (200, json!({"kind": "compute#instanceList", "items": items}))
        }
        ("GET", [_, "zones", zone, "instances", name]) => {
            match state.instances.get(&format!("{zone}/{name}")) {
                Some(i) => (200, i.clone()),
                None => error(404, &format!("instance {name} not found")),
            }
        }
        ("DELETE", [_, "zones", zone, "instances", name]) => {
            match state.instances.remove(&format!("{zone}/{name}")) {
                Some(_) => (
                    200,
                    operation(zone, &format!("zones/{zone}/instances/{name}")),
                ),
                None => error(404, &format!("instance {name} not found")),
            }
        }
        ("POST", [_, "zones", zone, "instances", name, "attachDisk"]) => {
            let source = body["source"].as_str().unwrap_or_default().to_string();
            if body["autoDelete"] != json!(false) || body["deviceName"].as_str().is_none() {
                state
                    .violations
                    .push(format!("attachDisk: bad body {body}"));
            }
            let disk = source.rsplit('/').next().unwrap_or_default().to_string();
            let user = format!("projects/p/zones/{zone}/instances/{name}");
            match state.disks.get_mut(&format!("{zone}/{disk}")) {
                Some(d) => {
                    d["users"] = json!([user]);
                    (
                        200,
                        operation(zone, &format!("zones/{zone}/instances/{name}")),
                    )
                }
                None => error(404, &format!("disk {source} not found")),
            }
        }
        ("POST", [_, "zones", zone, "instances", name, "detachDisk"]) => {
            let device = query_param(query, "deviceName").unwrap_or_default();
            let user = format!("projects/p/zones/{zone}/instances/{name}");
            for disk in state.disks.values_mut() {
                let attached = format!("pd-{}", disk["name"].as_str().unwrap_or_default());
                if attached == device {
                    let users: Vec<Value> = disk["users"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|u| u.as_str() != Some(user.as_str()))
                        .collect();
                    disk["users"] = json!(users);
                }
            }
            (
                200,
                operation(zone, &format!("zones/{zone}/instances/{name}")),
            )
        }
        ("POST", [_, "zones", zone, "disks"]) => {
            let name = body["name"].as_str().unwrap_or_default().to_string();
            if body["type"].as_str() != Some(&format!("zones/{zone}/diskTypes/pd-balanced")) {
                state
                    .violations
                    .push(format!("disks.insert: type {}", body["type"]));
            }
            if !body["labels"]
                .as_object()
                .is_some_and(|l| l.contains_key("dstack_owner"))
            {
                state
                    .violations
                    .push("disks.insert: no dstack_owner label".to_string());
            }
            let size = body["sizeGb"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| body["sizeGb"].to_string());
            let disk = json!({"name": name, "sizeGb": size, "zone": zone, "users": []});
            state.disks.insert(format!("{zone}/{name}"), disk);
            (200, operation(zone, &format!("zones/{zone}/disks/{name}")))
        }
        ("GET", [_, "zones", zone, "disks", name]) => {
            match state.disks.get(&format!("{zone}/{name}")) {
                Some(d) => (200, d.clone()),
                None => error(404, &format!("disk {name} not found")),
            }
        }
        ("DELETE", [_, "zones", zone, "disks", name]) => {
            match state.disks.remove(&format!("{zone}/{name}")) {
                Some(_) => (200, operation(zone, &format!("zones/{zone}/disks/{name}"))),
                None => error(404, &format!("disk {name} not found")),
            }
        }
        ("GET", [_, "zones", zone, "operations", name]) => (
            200,
            json!({"kind": "compute#operation", "name": name, "status": "DONE", "zone": zone}),
        ),
        _ => error(404, &format!("unknown call {method} {path}")),
    }
}

fn check_firewall(state: &mut State, body: &Value) {
    let mut bad = Vec::new();
    if !body["name"]
        .as_str()
        .is_some_and(|n| n.starts_with("dstack-ssh-in-"))
    {
        bad.push("name");
    }
    if body["direction"] != json!("INGRESS") {
        bad.push("direction");
    }
    let cidrs = body["sourceRanges"].as_array().cloned().unwrap_or_default();
    if cidrs.is_empty()
        || !cidrs
            .iter()
            .all(|c| c.as_str().is_some_and(|c| c.contains('/')))
    {
        bad.push("sourceRanges");
    }
    if body["allowed"] != json!([{"IPProtocol": "tcp", "ports": ["22"]}]) {
        bad.push("allowed");
    }
    if !body["targetTags"]
        .as_array()
        .is_some_and(|t| t.len() == 1 && t[0].is_string())
    {
        bad.push("targetTags");
    }
    if !body["network"].is_string() {
        bad.push("network");
    }
    if !bad.is_empty() {
        state
            .violations
            .push(format!("firewalls.insert: bad {bad:?} in {body}"));
    }
}

fn insert_instance(state: &mut State, zone: &str, body: &Value) -> (u16, Value) {
    let name = body["name"].as_str().unwrap_or_default().to_string();
    let machine = body["machineType"].as_str().unwrap_or_default().to_string();
    let mut bad: Vec<String> = Vec::new();
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && label_ok(&name.replace('-', "_"))
        && !name.ends_with('-');
    if !name_ok {
        bad.push(format!("name {name:?}"));
    }
    let prefix = format!("zones/{zone}/machineTypes/");
    let machine_type = machine
        .strip_prefix(&prefix)
        .unwrap_or_default()
        .to_string();
    if machine_type.is_empty() {
        bad.push(format!("machineType {machine:?}"));
    }
    let boot = &body["disks"][0];
    if boot["boot"] != json!(true)
        || boot["autoDelete"] != json!(true)
        || !boot["initializeParams"]["sourceImage"].is_string()
        || boot["initializeParams"]["diskSizeGb"].is_null()
    {
        bad.push(format!("boot disk {boot}"));
    }
    if !body["networkInterfaces"][0]["network"].is_string() {
        bad.push("networkInterfaces".to_string());
    }
    let items = body["metadata"]["items"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let item = |key: &str| {
        items
            .iter()
            .find(|i| i["key"] == json!(key))
            .and_then(|i| i["value"].as_str().map(str::to_string))
    };
    if !item("user-data").is_some_and(|u| u.starts_with("#cloud-config\n")) {
        bad.push("metadata user-data".to_string());
    }
    if !item("ssh-keys").is_some_and(|k| k.contains(":ssh-ed25519 ")) {
        bad.push("metadata ssh-keys".to_string());
    }
    let labels = body["labels"].as_object().cloned().unwrap_or_default();
    for key in ["owner", "dstack_owner", "dstack_instance_id", "dstack_name"] {
        if !labels.contains_key(key) {
            bad.push(format!("label {key} missing"));
        }
    }
    for (k, v) in &labels {
        if !label_ok(k) || !v.as_str().is_some_and(label_ok) {
            bad.push(format!("label {k}={v}"));
        }
    }
    // SSH must reach it: a rule of its network lets SSH in to one of its tags.
    let network = &body["networkInterfaces"][0]["network"];
    let tags = body["tags"]["items"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let reachable = state
        .firewalls
        .values()
        .any(|rule| rule["network"] == *network && tags.contains(&rule["targetTags"][0]));
    if !reachable {
        bad.push(format!("tags {tags:?}: no SSH firewall rule targets them"));
    }
    let scheduling = &body["scheduling"];
    if scheduling["provisioningModel"] == json!("SPOT")
        && scheduling["instanceTerminationAction"] != json!("STOP")
    {
        bad.push(format!("spot scheduling {scheduling}"));
    }
    if !bad.is_empty() {
        state
            .violations
            .push(format!("instances.insert: {}", bad.join(", ")));
        return error(400, &format!("invalid instance: {}", bad.join(", ")));
    }
    let target = format!("zones/{zone}/instances/{name}");
    if state
        .exhausted
        .iter()
        .any(|(z, m)| z == zone && *m == machine_type)
    {
        let mut op = operation(zone, &target);
        op["error"] = json!({"errors": [{
            "code": "ZONE_RESOURCE_POOL_EXHAUSTED",
            "message": format!("The zone '{zone}' does not have enough resources available to fulfill the request."),
        }]});
        return (200, op);
    }
    state.next_ip += 1;
    let n = state.next_ip;
    let mut instance = body.clone();
    instance["status"] = json!("RUNNING");
    instance["zone"] = json!(format!(
        "https://compute.googleapis.com/compute/v1/projects/p/zones/{zone}"
    ));
    instance["networkInterfaces"][0]["networkIP"] = json!(format!("10.128.0.{n}"));
    if let Some(access) = instance["networkInterfaces"][0]["accessConfigs"].as_array_mut() {
        if let Some(first) = access.first_mut() {
            first["natIP"] = json!(format!("34.1.2.{n}"));
        }
    }
    state.instances.insert(format!("{zone}/{name}"), instance);
    (200, operation(zone, &target))
}
