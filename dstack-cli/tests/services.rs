//! Services end to end through the CLI and the server's proxy, with a real HTTP app
//! (`tests/apps/service_app.py`) as the replica: URLs, auth, streaming, WebSockets, timeouts,
//! rate limits, probes and the model endpoint.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{text, workspace, Env};

/// An answer: status, headers (lower-case names), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", text(&self.body)))
    }
}

/// `host:port` and path of an `http://` URL.
fn split(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    (authority.to_string(), format!("/{path}"))
}

/// Sends one request on a connection of its own and reads the whole answer.
fn request(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let (authority, path) = split(url);
    let mut stream = TcpStream::connect(&authority).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader);
    let mut raw = Vec::new();
    reader.read_to_end(&mut raw).unwrap();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked { unchunk(&raw) } else { raw };
    Answer {
        status,
        headers,
        body,
    }
}

fn read_head(reader: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        let (name, value) = trimmed.split_once(':').unwrap();
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    (status, headers)
}

fn unchunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let end = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&raw[..end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[end + 2..end + 2 + size]);
        raw = &raw[end + 4 + size..];
    }
}

fn get(url: &str, token: Option<&str>) -> Answer {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    request("GET", url, &headers, b"")
}

/// A TCP port free at the time of the call.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn app() -> String {
    workspace()
        .join("dstack-cli/tests/apps/service_app.py")
        .canonicalize()
        .unwrap()
        .display()
        .to_string()
}

/// Applies `yaml` detached as run `name`; returns the service URL that `apply` printed.
fn apply_service(env: &Env, name: &str, yaml: &str, extra_env: &[(&str, &str)]) -> String {
    let file = env.write(&format!("{name}.dstack.yml"), yaml);
    let mut cmd = env.cmd(&["apply", "-f", &file, "-d", "-y", "--name", name]);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let url = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Service is published at "))
        .unwrap_or_else(|| panic!("no service URL printed: {stdout}"))
        .to_string();
    assert!(
        url.ends_with(&format!("/proxy/services/main/{name}/")),
        "{url}"
    );
    url
}

/// Polls `f` for up to 30 s.
fn wait_for(env: &Env, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        if Instant::now() >= deadline {
            let runs = text(&env.run(&["ps", "-a", "--json"]).stdout);
            let log = std::fs::read_to_string(env.home.path().join("agent/agent.log"))
                .unwrap_or_default();
            panic!("timed out waiting for {what}\nruns: {runs}\nagent log: {log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn service_yaml(port: u16, extra: &str) -> String {
    format!(
        "type: service\nport: {port}\ncommands:\n  - python3 {} {port}\n{extra}",
        app()
    )
}

#[test]
fn a_service_answers_through_its_url_with_the_token_and_stops_answering_when_stopped() {
    let env = Env::new();
    let port = free_port();
    let url = apply_service(&env, "web", &service_yaml(port, ""), &[]);
    let token = env.token();
    wait_for(&env, "the service to answer", || {
        get(&format!("{url}hello?x=1"), Some(&token)).status == 200
    });
    let answer = get(&format!("{url}hello?x=1"), Some(&token));
    let about = answer.json();
    assert_eq!(about["path"], "/hello?x=1", "strip_prefix is on by default");
    assert_eq!(
        about["authorization"], true,
        "the header reaches the replica, as in dstack"
    );

    assert_eq!(get(&url, None).status, 401);
    assert_eq!(get(&url, Some("not-the-token")).status, 403);
    let unknown = url.replace("/web/", "/nothing/");
    assert_eq!(get(&unknown, Some(&token)).status, 404);

    // Bodies both ways, another method.
    let auth = format!("Bearer {token}");
    let payload = vec![7u8; 3 * 1024 * 1024];
    let echoed = request(
        "POST",
        &format!("{url}echo"),
        &[("Authorization", &auth)],
        &payload,
    );
    assert_eq!(echoed.status, 200);
    assert_eq!(echoed.body, payload);
    let put = request(
        "PUT",
        &format!("{url}x"),
        &[("Authorization", &auth)],
        b"{}",
    );
    assert_eq!(put.json()["method"], "PUT");

    // Server-sent events arrive as they are sent, not at the end.
    let (authority, path) = split(&format!("{url}sse"));
    let mut stream = TcpStream::connect(&authority).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let started = Instant::now();
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader);
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(n, v)| n == "content-type" && v == "text/event-stream"));
    let mut events = Vec::new();
    let mut line = String::new();
    while events.len() < 3 {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if let Some(event) = line.trim_end().strip_prefix("data: ") {
            events.push((event.to_string(), started.elapsed()));
        }
    }
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names, ["event 0", "event 1", "event 2"]);
    assert!(
        events[0].1 + Duration::from_millis(400) < events[2].1,
        "events were held back: {events:?}"
    );

    // A WebSocket echo.
    let (authority, path) = split(&format!("{url}ws"));
    let mut ws = TcpStream::connect(&authority).unwrap();
    ws.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        ws,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: {auth}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(ws.try_clone().unwrap());
    let (status, headers) = read_head(&mut reader);
    assert_eq!(status, 101, "{headers:?}");
    assert!(headers
        .iter()
        .any(|(n, v)| n == "sec-websocket-accept" && v == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    for message in ["hello", "again"] {
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![0x81, 0x80 | message.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(message.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        ws.write_all(&frame).unwrap();
        let mut head = [0u8; 2];
        reader.read_exact(&mut head).unwrap();
        let mut data = vec![0u8; usize::from(head[1] & 0x7f)];
        reader.read_exact(&mut data).unwrap();
        assert_eq!((head[0], text(&data)), (0x81, message.to_string()));
    }

    // A replica that drops the connection: 502.
    assert_eq!(get(&format!("{url}crash"), Some(&token)).status, 502);

    // `dstack ps` shows the URL.
    let ps = text(&env.run(&["ps"]).stdout);
    assert!(ps.contains(&format!("web: {url}")), "{ps}");

    let out = env.run(&["stop", "-y", "web"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_for(&env, "the URL to answer 404 after stop", || {
        get(&url, Some(&token)).status == 404
    });
}

#[test]
fn an_open_service_keeps_its_prefix_and_slow_answers_time_out() {
    let env = Env::new();
    let port = free_port();
    let yaml = service_yaml(port, "auth: false\nstrip_prefix: false\n");
    let url = apply_service(&env, "open", &yaml, &[("DSTACK_SERVER_PROXY_TIMEOUT", "1")]);
    wait_for(&env, "the service to answer", || {
        get(&url, None).status == 200
    });
    let about = get(&format!("{url}a/b"), None).json();
    assert_eq!(about["path"], "/proxy/services/main/open/a/b");
    assert_eq!(about["authorization"], false);
    let slow = get(&format!("{url}slow?s=3"), None);
    assert_eq!(slow.status, 504, "{}", text(&slow.body));
    // Without the trailing slash: redirected to the service's root.
    let bare = get(url.trim_end_matches('/'), None);
    assert_eq!(bare.status, 308);
    assert_eq!(bare.header("location"), Some("/proxy/services/main/open/"));
}

#[test]
fn rate_limits_refuse_the_eleventh_request_in_a_second_and_failing_probes_keep_traffic_away() {
    let env = Env::new();
    let port = free_port();
    let yaml = service_yaml(
        port,
        "auth: false\nrate_limits:\n  - prefix: /limited\n    rps: 10\n",
    );
    let url = apply_service(&env, "limited", &yaml, &[]);
    wait_for(&env, "the service to answer", || {
        get(&url, None).status == 200
    });
    let statuses: Vec<u16> = (0..11)
        .map(|_| get(&format!("{url}limited/x"), None).status)
        .collect();
    assert_eq!(statuses[..10], [200; 10], "{statuses:?}");
    assert_eq!(statuses[10], 429, "{statuses:?}");
    assert_eq!(
        get(&format!("{url}other"), None).status,
        200,
        "only /limited is limited"
    );

    let out = env.run(&["stop", "-y", "limited"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A replica whose `/` answers 500 never becomes ready.
    let port = free_port();
    let yaml = format!(
        "type: service\nport: {port}\nauth: false\nenv:\n  - FAIL_ROOT=1\ncommands:\n  - python3 {} {port}\nprobes:\n  - type: http\n    url: /\n    interval: 1s\n",
        app()
    );
    let url = apply_service(&env, "failing", &yaml, &[]);
    wait_for(&env, "the replica to run", || {
        let runs: serde_json::Value =
            serde_json::from_slice(&env.run(&["ps", "--json"]).stdout).unwrap();
        runs.as_array()
            .unwrap()
            .iter()
            .any(|r| r["run"]["name"] == "failing" && r["jobs"][0]["status"] == "running")
    });
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert_eq!(get(&format!("{url}x"), None).status, 503);
        std::thread::sleep(Duration::from_millis(200));
    }
    // `dstack ps -v` says why.
    let ps = text(&env.run(&["ps", "-v"]).stdout);
    let row = ps
        .lines()
        .find(|l| l.contains("replica=0 job=0"))
        .unwrap_or_else(|| panic!("{ps}"));
    assert!(row.contains("running, not ready [probe / 0/1]"), "{ps}");
    assert!(row.contains("/ answered 500"), "{ps}");
}

#[test]
fn the_model_endpoint_lists_models_and_routes_chat_completions_by_name() {
    let env = Env::new();
    let port = free_port();
    let yaml = service_yaml(port, "model: test-model\n");
    let url = apply_service(&env, "llm", &yaml, &[]);
    let token = env.token();
    let models = url.replace("/proxy/services/main/llm/", "/proxy/models/main/");
    // The default probe of a model service is a chat completion: ready once it answers.
    wait_for(&env, "the model to be ready", || {
        get(&format!("{url}v1/models"), Some(&token)).status == 200
    });
    let listed = get(&format!("{models}models"), Some(&token)).json();
    assert_eq!(listed["data"][0]["id"], "test-model", "{listed}");
    assert_eq!(get(&format!("{models}models"), None).status, 401);

    let auth = format!("Bearer {token}");
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    let body = br#"{"model":"test-model","messages":[{"role":"user","content":"hi"}]}"#;
    let answer = request("POST", &format!("{models}chat/completions"), &headers, body);
    assert_eq!(answer.status, 200, "{}", text(&answer.body));
    assert_eq!(
        answer.json()["choices"][0]["message"]["content"],
        "hello from test-model"
    );
    let body = br#"{"model":"test-model","stream":true,"messages":[]}"#;
    let streamed = request("POST", &format!("{models}chat/completions"), &headers, body);
    let sse = text(&streamed.body);
    assert!(sse.contains(r#""content": "hello""#), "{sse}");
    assert!(sse.trim_end().ends_with("data: [DONE]"), "{sse}");
    let body = br#"{"model":"other","messages":[]}"#;
    let unknown = request("POST", &format!("{models}chat/completions"), &headers, body);
    assert_eq!(unknown.status, 404);
}

#[test]
fn what_the_proxy_cannot_do_is_refused_by_name_and_replicas_need_hosts_of_their_own() {
    let env = Env::new();
    let gateway = env.write(
        "gw.dstack.yml",
        "type: gateway\nname: gw\nbackend: aws\nregion: eu-west-1\ndomain: example.com\n",
    );
    let out = env.run(&["apply", "-f", &gateway, "-y"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("built-in proxy"),
        "{}",
        text(&out.stderr)
    );
    for (extra, expected) in [
        ("gateway: true\n", "`gateway`"),
        ("https: false\n", "`https: false`"),
        (
            "model:\n  type: chat\n  name: m\n  format: tgi\n",
            "`model.format: tgi`",
        ),
    ] {
        let file = env.write("refused.dstack.yml", &service_yaml(8000, extra));
        let out = env.run(&["apply", "-f", &file, "-y", "-d"]);
        assert!(!out.status.success(), "{extra}");
        assert!(
            text(&out.stderr).contains(expected),
            "{extra}: {}",
            text(&out.stderr)
        );
    }

    // Two replicas of a port on the one local host: the second says why it cannot run.
    let port = free_port();
    let file = env.write("two.dstack.yml", &service_yaml(port, "replicas: 2\n"));
    let out = env.run(&["apply", "-f", &file, "-y", "-d", "--name", "two"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_for(&env, "the run to fail", || {
        let runs: serde_json::Value =
            serde_json::from_slice(&env.run(&["ps", "-a", "--json"]).stdout).unwrap();
        runs[0]["run"]["status"] == "failed"
    });
    let runs: serde_json::Value =
        serde_json::from_slice(&env.run(&["ps", "-a", "--json"]).stdout).unwrap();
    let jobs = runs[0]["jobs"].as_array().unwrap();
    let second = jobs.iter().find(|j| j["replica_num"] == 1).unwrap();
    let why = second["termination_message"].as_str().unwrap_or_default();
    assert!(
        why.contains(&format!(
            "runs another replica of this service (port {port})"
        )),
        "{why}"
    );
}

#[test]
fn a_service_scaled_to_zero_answers_its_first_request_once_a_replica_is_up() {
    let env = Env::new();
    let port = free_port();
    let yaml = format!(
        "type: service\nport: {port}\nauth: false\nreplicas: 0..1\n\
         scaling:\n  metric: rps\n  target: 10\n  window: 30s\n  scale_down_delay: 1s\n\
         commands:\n  - sleep 1\n  - python3 {} {port}\n",
        app()
    );
    let url = apply_service(&env, "cold", &yaml, &[]);
    let runs: serde_json::Value =
        serde_json::from_slice(&env.run(&["ps", "--json"]).stdout).unwrap();
    assert_eq!(runs[0]["run"]["status"], "pending", "{runs}");
    assert_eq!(
        runs[0]["jobs"].as_array().unwrap().len(),
        0,
        "no replica before a request"
    );
    let started = Instant::now();
    let first = get(&format!("{url}first"), None);
    assert_eq!(first.status, 200, "{}", text(&first.body));
    assert_eq!(first.json()["path"], "/first");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the replica sleeps 1 s first"
    );
    let runs: serde_json::Value =
        serde_json::from_slice(&env.run(&["ps", "--json"]).stdout).unwrap();
    assert_eq!(runs[0]["run"]["status"], "running", "{runs}");
}

#[test]
fn applying_a_changed_service_on_one_host_replaces_its_replica_without_a_failed_request() {
    let env = Env::new();
    let port = free_port();
    let yaml = |version: u32| {
        service_yaml(
            port,
            &format!("auth: false\nenv:\n  - VERSION={version}\nprobes:\n  - type: http\n    url: /health\n    interval: 1s\n"),
        )
    };
    let url = apply_service(&env, "web", &yaml(1), &[]);
    let version = |url: &str| {
        let answer = get(url, None);
        let about: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
        (answer.status, about["version"].as_str().map(str::to_string))
    };
    wait_for(&env, "version 1", || {
        version(&url) == (200, Some("1".into()))
    });

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looping = {
        let (url, stop) = (url.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut answers = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && answers.len() < 20_000 {
                answers.push(get(&url, None).status);
                std::thread::sleep(Duration::from_millis(20));
            }
            answers
        })
    };
    let file = env.write("web.dstack.yml", &yaml(2));
    let out = env.run(&["apply", "-f", &file, "-y", "-d", "--name", "web"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("Updated run web (deployment 1)"),
        "{stdout}"
    );
    wait_for(&env, "version 2", || {
        version(&url) == (200, Some("2".into()))
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = looping.join().unwrap();
    let failed: Vec<&u16> = answers.iter().filter(|s| **s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        answers.len()
    );
    let runs: serde_json::Value =
        serde_json::from_slice(&env.run(&["ps", "--json"]).stdout).unwrap();
    let jobs = runs[0]["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert_eq!(jobs[0]["termination_reason"], "scaled_down", "{jobs:?}");
    assert_eq!(jobs[1]["status"], "running", "{jobs:?}");

    // What cannot change in place is refused by name.
    let file = env.write(
        "web.dstack.yml",
        &yaml(2).replace("auth: false", "auth: true"),
    );
    let out = env.run(&["apply", "-f", &file, "-y", "-d", "--name", "web"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("auth changed"),
        "{}",
        text(&out.stderr)
    );
}
