//! How long `shmocker detect`'s probes take, together and one group at a time. Every build runs
//! them once before it starts, so the goal is all of them in 100 ms or less.
//!
//! `cargo bench --bench detect [-- STORE_DIR [RUNS]]`; STORE_DIR defaults to a fresh directory
//! under /var/tmp (the probes write there, as they would in a build's store). Run it as the user
//! whose builds matter: root and an unprivileged user take different paths (newuidmap).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use shmocker::detect::{self, probes};

fn stats(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!(
        "{name:24} min {:7.1} ms  median {:7.1} ms  mean {:7.1} ms  max {:7.1} ms  ({} runs)",
        ms(samples[0]),
        ms(samples[samples.len() / 2]),
        ms(mean),
        ms(*samples.last().unwrap()),
        samples.len()
    );
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> Vec<Duration> {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed()
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let store = args.first().map(PathBuf::from).unwrap_or_else(|| {
        std::env::temp_dir().join(format!("shmocker-bench-detect-{}", std::process::id()))
    });
    let runs: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(20);
    std::fs::create_dir_all(&store).expect("creating the store directory");
    let planned = detect::planned_mapping();
    let work = store.join("tmp/bench");

    // Everything, as `shmocker detect` and every build run it.
    stats(
        "all probes (detect::run)",
        time(runs, || detect::run(&store, &planned).expect("detect")),
    );
    let prep = || {
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).unwrap();
    };
    stats(
        "  namespace child",
        time(runs, || {
            prep();
            probes::namespace_probes(&work)
        }),
    );
    stats(
        "  map-subordinate",
        time(runs, || probes::mapping_probe(&planned)),
    );
    stats(
        "  reflink",
        time(runs, || {
            prep();
            probes::reflink_probe(&work)
        }),
    );
    let _ = std::fs::remove_dir_all(&work);
    if args.is_empty() {
        let _ = std::fs::remove_dir_all(&store);
    }
}
