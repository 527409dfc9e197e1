//! Plain-text tables in the style of dstack's CLI, and human formatting helpers.

use dstack_core::agent::HostInfo;
use dstack_core::model::now_ms;

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
