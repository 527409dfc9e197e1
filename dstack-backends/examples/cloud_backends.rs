//! Prints which cloud backends `$DSTACK_HOME/config.yml` yields here, and why any is skipped:
//! `cloud_backends HOME`. Used by the AWS tests to check the credentials chain in a clean
//! environment.

use std::path::Path;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let home = std::env::args().nth(1).expect("usage: cloud_backends HOME");
    let started = std::time::Instant::now();
    match dstack_backends::cloud::configured_backends(Path::new(&home), Path::new("/bin/true"))
        .await
    {
        Ok((backends, skipped)) => {
            for backend in backends {
                println!("backend {}", backend.backend());
            }
            for why in skipped {
                println!("skipped {why}");
            }
            println!("took {} ms", started.elapsed().as_millis());
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    }
}
