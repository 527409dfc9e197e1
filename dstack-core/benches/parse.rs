//! Configuration parsing throughput over real dstack configurations.
//!
//! Reads every `*.dstack.yml` in `$DSTACK_BENCH_DIR` (default: the shared corpus's `valid/`
//! folder, else `examples/`) and measures parse + validate + normalize per file.
//! `bench/compare_dstack.sh` runs this next to dstack 0.22.5's own parser.

use std::path::PathBuf;

use criterion::{criterion_main, Criterion, Throughput};
use dstack_core::config::parse;

fn bench_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DSTACK_BENCH_DIR") {
        return PathBuf::from(dir);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let corpus = root.join("../shared/corpus/valid");
    if corpus.is_dir() {
        corpus
    } else {
        root.join("examples")
    }
}

fn load_files() -> Vec<(String, String)> {
    let dir = bench_dir();
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".dstack.yml"))
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("preset-"))
        })
        .map(|p| {
            (
                p.display().to_string(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no configurations in {}", dir.display());
    files
}

fn parse_corpus(c: &mut Criterion) {
    let files = load_files();
    let mut group = c.benchmark_group("config");
    group.throughput(Throughput::Elements(files.len() as u64));
    group.bench_function(format!("parse {} configurations", files.len()), |b| {
        b.iter(|| {
            for (name, text) in &files {
                let parsed = parse(std::hint::black_box(text), name);
                std::hint::black_box(parsed.is_ok());
            }
        })
    });
    group.finish();
}

/// The benchmark group (kept private: criterion's macro generates an undocumented function).
mod suite {
    criterion::criterion_group!(benches, super::parse_corpus);
}

criterion_main!(suite::benches);
