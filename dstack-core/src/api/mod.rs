//! dstack's REST API shapes: pure conversions between this project's records and the JSON of
//! dstack 0.22.5's models (`Run`, `RunPlan`, `Fleet`, `Instance`, `Volume`,
//! `JobSubmissionLogs`, the error body), and the requests dstack's clients send
//! (`runs/get_plan`, `runs/apply`, `logs/poll`).
//!
//! Nothing here does I/O: a server reads its records, converts them here and writes the JSON.
//! `scripts/check-dstack-shapes.sh` parses what these functions write with dstack's own
//! pydantic models.
//!
//! What dstack requires and this project does not record is filled in as follows:
//! - ids: dstack wants UUIDs, and version 4 ones for runs and job submissions; [`dstack_id`]
//!   gives every record id such a form (job ids are time-ordered UUIDs v7);
//! - backends: `local` and `ssh` instances are dstack's `remote` backend (on-prem hosts);
//! - `last_processed_at`: the latest time the records hold (pure: no clock is read);
//! - a run's repo is dstack's virtual repo (`{"repo_type": "virtual"}`): runs carry no repo.

mod events;
mod fleets;
mod logs;
mod projects;
mod requests;
mod runs;

pub use events::{event, events_query, EventsAsked, ListEventsRequest};
pub use fleets::{fleet, instance, volume};
pub use logs::{error_body, log_page, ErrorCode, LogEvent, LogSource};
pub use projects::{project, user, user_with_creds};
pub use requests::{
    apply_request, merge_profile, plan_request, poll_logs_request, ApplyRequest, PlanRequest,
    PollLogsRequest, RequestError, RunRequest,
};
pub use runs::{job_submission_id, run, run_plan, run_spec};

/// Who the resources belong to, as dstack's models name them (`project_name`, `user`).
#[derive(Clone, Copy, Debug)]
pub struct Owner<'a> {
    /// The project (`main` for a server with one project).
    pub project_name: &'a str,
    /// The user name (`admin` for a server with one user).
    pub user: &'a str,
}

/// The id a record has in dstack's JSON: always a UUID of version 4 form.
///
/// A UUID v4 is kept as it is; a UUID of another version keeps its bits but the version's
/// (job ids are UUID v7, which dstack's `UUID4` fields refuse); any other text (the local
/// fleet is `fleet-local`) becomes a UUID derived from it (128-bit FNV-1a). The same id always
/// gives the same answer, so a server finds a record asked for by its dstack id by comparing
/// `dstack_id(&record.id)` with it.
pub fn dstack_id(id: &str) -> String {
    let bytes = match uuid::Uuid::parse_str(id) {
        Ok(u) if u.get_version_num() == 4 => return u.hyphenated().to_string(),
        Ok(u) => *u.as_bytes(),
        Err(_) => fnv1a_128(id.as_bytes()).to_be_bytes(),
    };
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// 128-bit FNV-1a.
fn fnv1a_128(data: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    data.iter().fold(OFFSET, |hash, b| {
        (hash ^ u128::from(*b)).wrapping_mul(PRIME)
    })
}

/// A Unix time in milliseconds as ISO 8601 in UTC with an explicit offset, as Python's
/// `datetime.isoformat()` writes it: `2026-12-07T10:11:12.345000+00:00`.
pub fn iso_time(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rest = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}000+00:00",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        ms % 1000
    )
}

/// Parses what [`iso_time`] writes back, and the other ISO 8601 forms dstack's clients send
/// (`Z` or `±HH:MM` offsets, 0 to 9 fraction digits), into Unix milliseconds. `None`: not such
/// a time, or before 1970.
pub fn parse_iso_time(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = text.get(from..from + len)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())
            .flatten()
    };
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b.get(i) == Some(&b'.') {
        let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        let fraction = format!("{:0<3}", &text[i + 1..i + 1 + digits.min(3)]);
        millis = fraction.parse().ok()?;
        i += 1 + digits;
    }
    let offset_secs = match &text[i..] {
        "Z" | "z" | "+00:00" => 0,
        tz if tz.len() == 6 && matches!(&tz[..1], "+" | "-") && &tz[3..4] == ":" => {
            let hours = num(i + 1, 2)?;
            let minutes = num(i + 4, 2)?;
            let sign = if &tz[..1] == "-" { -1 } else { 1 };
            sign * (hours * 3600 + minutes * 60)
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    u64::try_from(secs * 1000 + millis).ok()
}

/// The civil date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The day count since 1970-01-01 of a civil date (inverse of [`civil_from_days`]).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Standard base64 with padding (dstack's log messages).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// dstack's backend name for a backend of this project: hosts of this machine and of SSH
/// fleets are dstack's on-prem `remote` backend.
fn backend_type(backend: &str) -> &str {
    match backend {
        "local" | "ssh" => "remote",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_take_the_version_4_form_and_keep_the_rest() {
        let v4 = "0b9a6f9e-3c1d-4e2f-9a8b-7c6d5e4f3a2b";
        assert_eq!(dstack_id(v4), v4);
        let v7 = "01938a3e-7b2c-7d4e-8f1a-2b3c4d5e6f70";
        assert_eq!(dstack_id(v7), "01938a3e-7b2c-4d4e-8f1a-2b3c4d5e6f70");
        let local = dstack_id("fleet-local");
        assert_eq!(uuid::Uuid::parse_str(&local).unwrap().get_version_num(), 4);
        assert_eq!(local, dstack_id("fleet-local"));
        assert_ne!(local, dstack_id("instance-local-0"));
    }

    #[test]
    fn times_are_iso_8601_in_utc() {
        assert_eq!(iso_time(0), "1970-01-01T00:00:00.000000+00:00");
        assert_eq!(
            iso_time(1_796_638_272_345),
            "2026-12-07T10:11:12.345000+00:00"
        );
        assert_eq!(
            iso_time(951_782_400_000),
            "2000-02-29T00:00:00.000000+00:00"
        );
        for ms in [0, 1_796_638_272_345, 951_782_400_000, 4_102_444_799_999] {
            assert_eq!(parse_iso_time(&iso_time(ms)), Some(ms));
        }
        assert_eq!(
            parse_iso_time("2026-12-07T10:11:12Z"),
            Some(1_796_638_272_000)
        );
        assert_eq!(
            parse_iso_time("2026-12-07T12:11:12.3456+02:00"),
            Some(1_796_638_272_345)
        );
        assert_eq!(parse_iso_time("2026-12-07"), None);
        assert_eq!(parse_iso_time("2026-13-07T10:11:12Z"), None);
        assert_eq!(parse_iso_time("2026-12-07T10:11:12+0200"), None);
        assert_eq!(parse_iso_time("1969-12-31T23:59:59Z"), None);
    }

    #[test]
    fn base64_pads_like_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"hello\n\xff"), "aGVsbG8K/w==");
    }
}
