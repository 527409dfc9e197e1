//! Times catalog queries on a directory of gpuhunt-format catalogs: the same three queries as
//! `bench/gpuhunt_query.py`, printing `name<TAB>matches<TAB>median ms` per query.
//!
//! usage: catalog_query DIR REPEATS

use std::path::Path;
use std::time::Instant;

use dstack_core::offers::catalog::Catalog;
use dstack_core::offers::query::{QueryFilter, ALLOWED_FLAGS};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (dir, repeats) = match args.as_slice() {
        [_, dir, repeats] => (dir, repeats.parse::<usize>().expect("REPEATS is a number")),
        _ => {
            eprintln!("usage: catalog_query DIR REPEATS");
            std::process::exit(2);
        }
    };
    let t = Instant::now();
    let catalog = Catalog::load_dir(Path::new(dir)).expect("catalog");
    eprintln!(
        "loaded {} offers in {:.1} ms",
        catalog.len(),
        t.elapsed().as_secs_f64() * 1000.0
    );
    let base = QueryFilter {
        min_cpu: Some(2.0),
        min_memory: Some(8.0),
        min_gpu_count: Some(0.0),
        gpu_vendor: Some("nvidia".into()),
        spot: Some(false),
        min_disk_size: Some(100.0),
        allowed_flags: Some(ALLOWED_FLAGS.iter().map(|f| f.to_string()).collect()),
        ..QueryFilter::default()
    };
    let queries = [
        (
            "default task (cpu 2.., memory 8GB.., on-demand)",
            base.clone(),
        ),
        (
            "gpu A100:80GB:2",
            QueryFilter {
                gpu_name: Some(vec!["A100".into()]),
                min_gpu_memory: Some(80.0),
                max_gpu_memory: Some(80.0),
                min_gpu_count: Some(2.0),
                max_gpu_count: Some(2.0),
                ..base.clone()
            },
        ),
        (
            "gpu 24GB.., spot auto, max_price 2",
            QueryFilter {
                min_gpu_memory: Some(24.0),
                min_gpu_count: Some(1.0),
                spot: None,
                max_price: Some(2.0),
                ..base.clone()
            },
        ),
    ];
    for (name, filter) in queries {
        let mut times = Vec::with_capacity(repeats);
        let mut found = 0;
        for _ in 0..repeats {
            let t = Instant::now();
            found = catalog.query(&["aws"], &filter).len();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        println!("{name}\t{found}\t{:.3}", times[times.len() / 2]);
    }
}
