//! Readiness of service replicas, as dstack's probes decide it: each probe is an HTTP request
//! sent every `interval` (default 15 s); a 2xx answer within `timeout` (default 10 s) is a
//! success, anything else resets the probe's streak; a replica is ready once every probe
//! has `ready_after` (default 1) successes in a row; `until_ready` probes stop once they
//! have. A model service (`model:`, OpenAI format) without `probes:` gets dstack's default
//! probe: a one-token chat completion. Without probes (none configured, or `probes: []`), a
//! replica is ready once its port accepts a connection, checked at once and then after
//! 50 ms, doubling up to every second (a replica a request waits for is found soon after its
//! app listens).
//!
//! The decisions (what is due, what a result changes) are pure; `super::supervise` sends the
//! requests.

use std::collections::BTreeMap;
use std::time::Duration;

use dstack_core::config::env::EnvValue;
use dstack_core::config::interpolate::{interpolate, Lookup};
use dstack_core::config::service::{ModelSpec, ProbeMethod, ServiceConfiguration};
use hyper::Method;

/// The first wait between two checks of a replica's port; it doubles after each failure.
pub(crate) const PORT_CHECK_FIRST: Duration = Duration::from_millis(50);

/// The longest wait between two checks of a replica's port.
pub(crate) const PORT_CHECK_PERIOD: Duration = Duration::from_secs(1);

/// One probe, with dstack's defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ProbeSpec {
    /// The request method.
    pub method: Method,
    /// The path (and query) requested.
    pub url: String,
    /// Request headers (`${{ env.X }}` resolved from the run's environment).
    pub headers: Vec<(String, String)>,
    /// The request body.
    pub body: Option<String>,
    /// How long an answer may take.
    pub timeout: Duration,
    /// Time between two probes.
    pub interval: Duration,
    /// Successes in a row that make the replica ready.
    pub ready_after: u32,
    /// Stop probing once ready.
    pub until_ready: bool,
}

/// The probes of a service: the configured ones, or dstack's default for an OpenAI-format
/// model; none means "ready when the port accepts connections". `env` is the run's
/// environment as its jobs get it (for `${{ env.X }}` in header values).
pub(crate) fn specs(
    config: &ServiceConfiguration,
    env: &BTreeMap<String, String>,
) -> Vec<ProbeSpec> {
    let lookup = |namespace: &str, name: &str| match namespace {
        "env" => match config.common.env.0.get(name) {
            Some(EnvValue::Value(v)) => Lookup::Value(v.clone()),
            _ => env
                .get(name)
                .map_or(Lookup::Keep, |v| Lookup::Value(v.clone())),
        },
        _ => Lookup::Keep,
    };
    match (&config.probes, &config.model) {
        (Some(probes), _) => probes
            .iter()
            .map(|p| ProbeSpec {
                method: match p.method.unwrap_or(ProbeMethod::Get) {
                    ProbeMethod::Get => Method::GET,
                    ProbeMethod::Post => Method::POST,
                    ProbeMethod::Put => Method::PUT,
                    ProbeMethod::Delete => Method::DELETE,
                    ProbeMethod::Patch => Method::PATCH,
                    ProbeMethod::Head => Method::HEAD,
                },
                url: p.url.clone().unwrap_or_else(|| "/".into()),
                headers: p
                    .headers
                    .iter()
                    .map(|h| {
                        let value = interpolate(&h.value, lookup).unwrap_or(h.value.clone());
                        (h.name.clone(), value)
                    })
                    .collect(),
                body: p.body.clone(),
                timeout: seconds(p.timeout.map_or(10, |d| d.0)),
                interval: seconds(p.interval.map_or(15, |d| d.0)),
                ready_after: p
                    .ready_after
                    .map_or(1, |n| n.clamp(1, i64::from(u32::MAX)) as u32),
                until_ready: p.until_ready.unwrap_or(false),
            })
            .collect(),
        (None, Some(ModelSpec::OpenAi { name, prefix, .. })) => vec![ProbeSpec {
            method: Method::POST,
            url: format!("{}/chat/completions", prefix.trim_end_matches('/')),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Some(
                serde_json::json!({
                    "model": name,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 1,
                })
                .to_string(),
            ),
            timeout: Duration::from_secs(30),
            interval: Duration::from_secs(15),
            ready_after: 1,
            until_ready: false,
        }],
        (None, _) => Vec::new(),
    }
}

fn seconds(s: i64) -> Duration {
    Duration::from_secs(u64::try_from(s).unwrap_or(1).max(1))
}

/// What the proxy knows of one replica's probes (times in ms on the server's clock).
#[derive(Debug, Default)]
pub(crate) struct ProbeState {
    /// A check is under way.
    pub checking: bool,
    /// Successes in a row, per probe.
    pub streaks: Vec<u32>,
    /// When each probe (or the port check) is due next.
    due_ms: Vec<u64>,
    /// Whether the port check succeeded (replicas without probes).
    port_open: bool,
    /// Port checks failed in a row.
    port_failures: u32,
    /// The last failure, for `dstack ps`.
    pub last_error: Option<String>,
}

impl ProbeState {
    /// Which probes are due at `now` (indices into `specs`); for a replica without probes,
    /// `[0]` while its port check is due.
    pub fn due(&mut self, specs: &[ProbeSpec], now_ms: u64) -> Vec<usize> {
        let slots = specs.len().max(1);
        if self.due_ms.len() != slots {
            self.due_ms = vec![now_ms; slots];
            self.streaks = vec![0; specs.len()];
        }
        if specs.is_empty() {
            return if !self.port_open && self.due_ms[0] <= now_ms {
                vec![0]
            } else {
                Vec::new()
            };
        }
        (0..specs.len())
            .filter(|&i| self.due_ms[i] <= now_ms)
            .filter(|&i| !(specs[i].until_ready && self.streaks[i] >= specs[i].ready_after))
            .collect()
    }

    /// Records the result of probe `index` (or the port check) taken at `now`.
    pub fn record(
        &mut self,
        specs: &[ProbeSpec],
        index: usize,
        result: Result<(), String>,
        now_ms: u64,
    ) {
        let ok = result.is_ok();
        self.last_error = result.err();
        if specs.is_empty() {
            self.port_open = ok;
            self.port_failures = if ok {
                0
            } else {
                self.port_failures.saturating_add(1)
            };
            let wait = PORT_CHECK_FIRST
                .saturating_mul(1 << self.port_failures.saturating_sub(1).min(10))
                .min(PORT_CHECK_PERIOD);
            self.due_ms[0] = now_ms + wait.as_millis() as u64;
            return;
        }
        let spec = &specs[index];
        self.streaks[index] = if ok {
            self.streaks[index].saturating_add(1)
        } else {
            0
        };
        self.due_ms[index] = now_ms + spec.interval.as_millis() as u64;
    }

    /// Whether the replica may receive requests.
    pub fn ready(&self, specs: &[ProbeSpec]) -> bool {
        if specs.is_empty() {
            return self.port_open;
        }
        self.streaks.len() == specs.len()
            && specs
                .iter()
                .zip(&self.streaks)
                .all(|(spec, streak)| *streak >= spec.ready_after)
    }

    /// Forgets every success and makes every probe due at once: the proxy could not reach
    /// the replica.
    pub fn reset(&mut self, now_ms: u64) {
        self.port_open = false;
        self.port_failures = 0;
        self.streaks.iter_mut().for_each(|s| *s = 0);
        self.due_ms.iter_mut().for_each(|d| *d = now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(interval: u64, ready_after: u32, until_ready: bool) -> ProbeSpec {
        ProbeSpec {
            method: Method::GET,
            url: "/".into(),
            headers: Vec::new(),
            body: None,
            timeout: Duration::from_secs(1),
            interval: Duration::from_secs(interval),
            ready_after,
            until_ready,
        }
    }

    #[test]
    fn a_replica_is_ready_after_its_streak_and_not_after_a_failure() {
        let specs = [spec(2, 2, false)];
        let mut state = ProbeState::default();
        assert_eq!(state.due(&specs, 0), [0]);
        state.record(&specs, 0, Ok(()), 0);
        assert!(!state.ready(&specs));
        assert!(state.due(&specs, 1_999).is_empty());
        assert_eq!(state.due(&specs, 2_000), [0]);
        state.record(&specs, 0, Ok(()), 2_000);
        assert!(state.ready(&specs));
        state.record(&specs, 0, Err("500".into()), 4_000);
        assert!(!state.ready(&specs));
        assert_eq!(state.last_error.as_deref(), Some("500"));
    }

    #[test]
    fn until_ready_probes_stop_once_ready_and_every_probe_must_pass() {
        let specs = [spec(1, 1, true), spec(1, 1, false)];
        let mut state = ProbeState::default();
        assert_eq!(state.due(&specs, 0), [0, 1]);
        state.record(&specs, 0, Ok(()), 0);
        assert!(!state.ready(&specs), "the second probe has not passed");
        state.record(&specs, 1, Ok(()), 0);
        assert!(state.ready(&specs));
        assert_eq!(state.due(&specs, 5_000), [1]);
    }

    #[test]
    fn without_probes_the_port_is_checked_until_it_opens() {
        let mut state = ProbeState::default();
        assert_eq!(state.due(&[], 0), [0]);
        state.record(&[], 0, Err("refused".into()), 0);
        assert!(!state.ready(&[]));
        assert!(state.due(&[], 49).is_empty());
        assert_eq!(state.due(&[], 50), [0], "soon after a first failure");
        state.record(&[], 0, Err("refused".into()), 50);
        assert!(state.due(&[], 149).is_empty(), "then twice as long");
        for _ in 0..10 {
            state.record(&[], 0, Err("refused".into()), 200);
        }
        assert!(state.due(&[], 1_199).is_empty(), "at most a second");
        assert_eq!(state.due(&[], 1_200), [0]);
        state.record(&[], 0, Ok(()), 1_000);
        assert!(state.ready(&[]));
        assert!(
            state.due(&[], 10_000).is_empty(),
            "an open port is not checked again"
        );
        state.reset(10_000);
        assert_eq!(state.due(&[], 10_000), [0]);
    }

    #[test]
    fn a_model_service_without_probes_gets_the_chat_completion_probe() {
        let text = "type: service\nport: 8000\ncommands: [serve]\nmodel: my-llm\n";
        let config = match dstack_core::config::parse(text, "s.yml").unwrap() {
            dstack_core::config::Configuration::Service(s) => s,
            _ => unreachable!(),
        };
        let probes = specs(&config, &BTreeMap::new());
        assert_eq!(probes.len(), 1);
        assert_eq!(probes[0].method, Method::POST);
        assert_eq!(probes[0].url, "/v1/chat/completions");
        assert!(probes[0].body.as_deref().unwrap().contains("\"my-llm\""));
        let text = "type: service\nport: 8000\ncommands: [serve]\nmodel: my-llm\nprobes: []\n";
        let config = match dstack_core::config::parse(text, "s.yml").unwrap() {
            dstack_core::config::Configuration::Service(s) => s,
            _ => unreachable!(),
        };
        assert!(
            specs(&config, &BTreeMap::new()).is_empty(),
            "probes: [] disables them"
        );
    }

    #[test]
    fn probe_headers_take_the_runs_environment() {
        let text = "type: service\nport: 8000\ncommands: [serve]\nenv: [TOKEN=abc]\nprobes:\n  - type: http\n    url: /health\n    headers:\n      - name: Authorization\n        value: Bearer ${{ env.TOKEN }}\n";
        let config = match dstack_core::config::parse(text, "s.yml").unwrap() {
            dstack_core::config::Configuration::Service(s) => s,
            _ => unreachable!(),
        };
        let specs = specs(&config, &BTreeMap::new());
        assert_eq!(
            specs[0].headers,
            [("Authorization".to_string(), "Bearer abc".to_string())]
        );
        assert_eq!(specs[0].interval, Duration::from_secs(15));
        assert_eq!(specs[0].timeout, Duration::from_secs(10));
    }
}
