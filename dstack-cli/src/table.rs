//! Plain-text tables in the style of dstack's CLI, and human formatting helpers.

use std::future::Future;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use dstack_core::agent::HostInfo;
use dstack_core::model::now_ms;

use crate::Failure;

/// How often `-w/--watch` reads and draws its table again (dstack's interval).
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// A table with a header row; columns are padded to their widest cell.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Self {
        Table {
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
        }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders with a leading space and two spaces between columns.
    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..cols)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::from(" ");
            for (c, cell) in row.iter().enumerate() {
                line.push_str(cell);
                if c + 1 < row.len() {
                    line.push_str(&" ".repeat(widths[c] - cell.chars().count() + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `-w/--watch` (`ps`, `fleet`, `volume`): the table `draw` renders, drawn again over the
/// previous one every [`WATCH_INTERVAL`] until Ctrl-C (then the last table stays on the
/// screen).
pub async fn watch<F, Fut>(mut draw: F) -> Result<ExitCode, Failure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<String, Failure>>,
{
    let mut drawn_lines = 0;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let text = tokio::select! {
            text = draw() => text?,
            _ = &mut ctrl_c => return Ok(ExitCode::SUCCESS),
        };
        // Back to the first line of the previous table, which is then cleared.
        let up = match drawn_lines {
            0 => String::new(),
            n => format!("\x1b[{n}F\x1b[J"),
        };
        let mut out = std::io::stdout().lock();
        write!(out, "{up}{text}")
            .and_then(|()| out.flush())
            .map_err(|e| Failure::new(format!("cannot write the table: {e}")))?;
        drop(out);
        drawn_lines = text.lines().count();
        tokio::select! {
            _ = tokio::time::sleep(WATCH_INTERVAL) => {}
            _ = &mut ctrl_c => return Ok(ExitCode::SUCCESS),
        }
    }
}

/// `cpu=2 mem=23GB disk=252GB gpu=A100:80GB:2`.
pub fn resources(host: &HostInfo) -> String {
    let gib = |b: u64| (b as f64 / (1u64 << 30) as f64).round() as u64;
    let mut s = format!(
        "cpu={} mem={}GB disk={}GB",
        host.cpus,
        gib(host.memory_bytes),
        gib(host.disk_bytes)
    );
    if let Some(g) = host.gpus.first() {
        s.push_str(&format!(
            " gpu={}:{}GB:{}",
            g.name,
            g.memory_mib / 1024,
            host.gpus.len()
        ));
    }
    s
}

/// "now", "12 sec ago", "3 mins ago", "2 hours ago", "5 days ago".
pub fn ago(ms: u64) -> String {
    let secs = now_ms().saturating_sub(ms) / 1000;
    match secs {
        0..=4 => "now".to_string(),
        5..=59 => format!("{secs} sec ago"),
        60..=3599 => format!("{} mins ago", secs / 60),
        3600..=86399 => format!("{} hours ago", secs / 3600),
        _ => format!("{} days ago", secs / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_columns() {
        let mut t = Table::new(&["NAME", "STATUS"]);
        t.row(vec!["a-long-name".into(), "done".into()]);
        assert_eq!(t.render(), " NAME         STATUS\n a-long-name  done\n");
    }
}
