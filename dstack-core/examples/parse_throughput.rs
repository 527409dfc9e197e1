//! Times `config::parse` over the given files: `parse_throughput ROUNDS FILE...`.
//! Prints `dstack-rs FILES ROUNDS SECONDS_PER_CONFIGURATION` (used by bench/compare_dstack.sh).

use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args
        .next()
        .and_then(|r| r.parse().ok())
        .expect("usage: parse_throughput ROUNDS FILE...");
    let files: Vec<(String, String)> = args
        .map(|f| (std::fs::read_to_string(&f).expect("readable file"), f))
        .collect();
    for (text, name) in &files {
        if let Err(e) = dstack_core::config::parse(text, name) {
            panic!("{e}");
        }
    }
    let start = Instant::now();
    for _ in 0..rounds {
        for (text, name) in &files {
            let parsed = dstack_core::config::parse(std::hint::black_box(text), name);
            std::hint::black_box(parsed.is_ok());
        }
    }
    let per = start.elapsed().as_secs_f64() / (rounds * files.len()) as f64;
    println!("dstack-rs {} {} {:.9}", files.len(), rounds, per);
}
