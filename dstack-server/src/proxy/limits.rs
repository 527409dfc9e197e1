//! A service's `rate_limits`, which dstack applies only on gateways (Nginx `limit_req`) and
//! this proxy applies itself: the rule with the longest matching `prefix` decides; requests
//! are counted per key (the client's IP address, or a header's value) in windows of one
//! second (or `1/rps` seconds when `rps` is below one), each opened by the key's first
//! request after the last one ended, that admit `rps` (at least one) plus `burst` requests;
//! one more is answered 429 with the seconds left in `Retry-After`. (Nginx spaces requests
//! evenly at `rps` and delays up to `burst` of them; here a window's allowance may come at
//! once — "10 per second" lets the 11th request within a second be refused — and nothing is
//! delayed.)

use std::collections::HashMap;

use dstack_core::config::service::{RateLimit, RateLimitKey};

/// Keys counted per service before ended windows are dropped (bounded memory under many
/// keys).
const MAX_KEYS: usize = 100_000;

/// The windows of one service.
#[derive(Default)]
pub(crate) struct Limiter {
    /// `(rule index, key)` → (when the window opened in ms, requests admitted in it).
    windows: HashMap<(usize, String), (u64, u64)>,
}

/// The rule that applies to `path`: the longest prefix that matches.
pub(crate) fn rule_for<'a>(rules: &'a [RateLimit], path: &str) -> Option<(usize, &'a RateLimit)> {
    rules
        .iter()
        .enumerate()
        .filter(|(_, r)| path.starts_with(&r.prefix))
        .max_by_key(|(_, r)| r.prefix.len())
}

/// What a request is counted by under `rule`: its client's address, or a header's value.
pub(crate) fn key_of(
    rule: &RateLimit,
    client_ip: &str,
    header: impl Fn(&str) -> Option<String>,
) -> String {
    match &rule.key {
        RateLimitKey::IpAddress => client_ip.to_string(),
        RateLimitKey::Header { header: name } => header(name).unwrap_or_default(),
    }
}

impl Limiter {
    /// Takes one request of `key` under rule `index` at `now_ms`; `Err(seconds)` when it
    /// is over the limit (try again after that many seconds).
    pub fn take(
        &mut self,
        index: usize,
        rule: &RateLimit,
        key: String,
        now_ms: u64,
    ) -> Result<(), u64> {
        let window_ms = (1000.0 / rule.rps.min(1.0)).ceil() as u64;
        let allowance = (rule.rps.max(1.0).floor() as u64).saturating_add(rule.burst.max(0) as u64);
        if self.windows.len() >= MAX_KEYS {
            // Ended windows can be forgotten without changing any answer.
            self.windows
                .retain(|_, (opened, _)| now_ms < *opened + window_ms);
            if self.windows.len() >= MAX_KEYS {
                self.windows.clear();
            }
        }
        let (opened, admitted) = self.windows.entry((index, key)).or_insert((now_ms, 0));
        if now_ms >= *opened + window_ms {
            (*opened, *admitted) = (now_ms, 0);
        }
        if *admitted < allowance {
            *admitted += 1;
            Ok(())
        } else {
            Err((*opened + window_ms - now_ms).div_ceil(1000).max(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(prefix: &str, rps: f64, burst: i64) -> RateLimit {
        RateLimit {
            prefix: prefix.into(),
            key: RateLimitKey::IpAddress,
            rps,
            burst,
        }
    }

    /// A rule counts requests by the client's address (`type: ip_address`) or by a header's
    /// value (`type: header`; a request without it is counted under the empty value).
    #[test]
    fn requests_are_counted_by_client_address_or_header_value() {
        let by_ip = rule("/", 1.0, 0);
        let by_header = RateLimit {
            key: RateLimitKey::Header {
                header: "X-Api-Key".into(),
            },
            ..rule("/", 1.0, 0)
        };
        let headers = |name: &str| (name == "X-Api-Key").then(|| "team-a".to_string());
        assert_eq!(key_of(&by_ip, "1.2.3.4", headers), "1.2.3.4");
        assert_eq!(key_of(&by_header, "1.2.3.4", headers), "team-a");
        assert_eq!(key_of(&by_header, "1.2.3.4", |_| None), "");
    }

    #[test]
    fn the_eleventh_request_in_a_second_of_ten_rps_is_refused() {
        let r = rule("/", 10.0, 0);
        let mut limiter = Limiter::default();
        for i in 0..10 {
            assert!(
                limiter.take(0, &r, "1.2.3.4".into(), i * 10).is_ok(),
                "request {i}"
            );
        }
        assert_eq!(limiter.take(0, &r, "1.2.3.4".into(), 900), Err(1));
        assert!(
            limiter.take(0, &r, "5.6.7.8".into(), 900).is_ok(),
            "another client"
        );
        assert!(
            limiter.take(0, &r, "1.2.3.4".into(), 1_000).is_ok(),
            "a new second"
        );
    }

    #[test]
    fn burst_adds_to_the_allowance_and_slow_rates_have_long_windows() {
        let r = rule("/", 1.0 / 60.0, 2);
        let mut limiter = Limiter::default();
        for _ in 0..3 {
            assert!(limiter.take(0, &r, "k".into(), 0).is_ok());
        }
        assert_eq!(limiter.take(0, &r, "k".into(), 1_000), Err(59));
        assert!(limiter.take(0, &r, "k".into(), 61_000).is_ok());
    }

    #[test]
    fn the_longest_matching_prefix_decides() {
        let rules = [
            rule("/", 10.0, 0),
            rule("/api", 1.0, 0),
            rule("/api/v2", 5.0, 0),
        ];
        assert_eq!(rule_for(&rules, "/api/v1/x").map(|(i, _)| i), Some(1));
        assert_eq!(rule_for(&rules, "/api/v2/x").map(|(i, _)| i), Some(2));
        assert_eq!(rule_for(&rules, "/other").map(|(i, _)| i), Some(0));
        assert_eq!(rule_for(&rules[1..], "/other").map(|(i, _)| i), None);
    }
}
