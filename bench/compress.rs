//! Layer compression throughput: shmocker's deterministic parallel gzip with 1 and 2 threads and
//! its zstd, next to `pigz -6` and `zstd -3` on the same data (the hardware's reference).
//!
//! `cargo bench --bench compress [-- FILE [RUNS]]` (FILE "" for the default). Without FILE the
//! input is a generated 128 MiB tar-like stream of mixed compressibility (text, repeated blocks, noise). MB/s are of the
//! uncompressed input, median of RUNS (default 3). It also checks that 1 and 2 threads give the
//! very same bytes.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shmocker::layer::ParGzEncoder;

fn generate(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    while out.len() < len {
        let r = next();
        match r % 8 {
            // Source-like text.
            0..=3 => {
                for _ in 0..64 {
                    let v = next();
                    out.extend_from_slice(
                        format!(
                            "    let value_{} = compute({}, \"{}\");\n",
                            v % 97,
                            v % 10_000,
                            v % 13
                        )
                        .as_bytes(),
                    );
                }
            }
            // Binary with structure (tables, zero padding).
            4 | 5 => {
                for i in 0..4096u64 {
                    out.extend_from_slice(&((i * (r % 17)) as u32).to_le_bytes());
                }
                out.extend(std::iter::repeat_n(0u8, (r % 4096) as usize));
            }
            // Already-compressed content: noise.
            _ => {
                for _ in 0..2048 {
                    out.extend_from_slice(&next().to_le_bytes());
                }
            }
        }
    }
    out.truncate(len);
    out
}

/// User + system CPU time of this process so far, its threads' included (/proc/self/stat, in
/// clock ticks of 10 ms).
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which ends with the last ')'): utime is the 12th, stime 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split(' ')
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    Duration::from_millis((f[0] + f[1]) * 10)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn report(name: &str, bytes: usize, out_len: usize, d: Duration) {
    let mbs = bytes as f64 / 1e6 / d.as_secs_f64();
    println!(
        "{name:34} {mbs:8.1} MB/s  ratio {:5.3}  ({:.3} s)",
        out_len as f64 / bytes as f64,
        d.as_secs_f64()
    );
}

fn ours(data: &[u8], threads: usize) -> Vec<u8> {
    let mut enc = ParGzEncoder::new(Vec::with_capacity(data.len() / 2), 6, threads);
    // As the layer writer feeds it: 128 KiB writes.
    for c in data.chunks(128 * 1024) {
        enc.write_all(c).unwrap();
    }
    enc.finish().unwrap()
}

fn ours_zstd(data: &[u8], threads: u32) -> Vec<u8> {
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    enc.multithread(threads).unwrap();
    enc.include_checksum(true).unwrap();
    for c in data.chunks(128 * 1024) {
        enc.write_all(c).unwrap();
    }
    enc.finish().unwrap()
}

/// Runs a tool reading `file` and writing to a pipe; returns the time and output size.
fn tool(cmd: &str, args: &[&str], file: &PathBuf) -> Option<(Duration, usize)> {
    let input = std::fs::File::open(file).ok()?;
    let t = Instant::now();
    let out = Command::new(cmd)
        .args(args)
        .stdin(input)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let d = t.elapsed();
    out.status.success().then_some((d, out.stdout.len()))
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let runs: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(3);
    let (data, file, _tmp) = match args.first().filter(|f| !f.is_empty()) {
        Some(f) => (std::fs::read(f).unwrap(), PathBuf::from(f), None),
        None => {
            let tmp = tempfile::tempdir().unwrap();
            let f = tmp.path().join("input");
            let data = generate(128 << 20);
            std::fs::write(&f, &data).unwrap();
            (data, f, Some(tmp))
        }
    };
    println!(
        "input: {} ({} MB), {} cores, median of {runs} runs",
        file.display(),
        data.len() / 1_000_000,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    let mut first: Option<Vec<u8>> = None;
    let mut one = Duration::ZERO;
    for threads in [1, 2] {
        let mut times = Vec::new();
        let mut cpus = Vec::new();
        let mut out = Vec::new();
        for _ in 0..runs {
            let (t, c) = (Instant::now(), cpu());
            out = ours(&data, threads);
            times.push(t.elapsed());
            cpus.push(cpu() - c);
        }
        match &first {
            None => first = Some(out.clone()),
            Some(f) => assert!(
                f == &out,
                "{threads} threads gave other bytes than 1 thread"
            ),
        }
        let d = median(times);
        report(
            &format!("shmocker gzip -6, {threads} thread(s)"),
            data.len(),
            out.len(),
            d,
        );
        println!(
            "{:34} CPU {:.3} s ({:.0} % of the wall time)",
            "",
            median(cpus.clone()).as_secs_f64(),
            100.0 * median(cpus).as_secs_f64() / d.as_secs_f64()
        );
        if threads == 1 {
            one = d;
        } else {
            println!(
                "{:34} {:8.2}x one thread (same bytes)",
                "",
                one.as_secs_f64() / d.as_secs_f64()
            );
        }
    }
    // The serial flate2 stream layers were written with before: the size the blocks cost.
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        for c in data.chunks(128 * 1024) {
            enc.write_all(c).unwrap();
        }
        size = enc.finish().unwrap().len();
        times.push(t.elapsed());
    }
    report(
        "serial flate2 gzip -6 (zlib-rs)",
        data.len(),
        size,
        median(times),
    );

    let mut zfirst: Option<Vec<u8>> = None;
    for threads in [1, 2] {
        let mut times = Vec::new();
        let mut out = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            out = ours_zstd(&data, threads);
            times.push(t.elapsed());
        }
        match &zfirst {
            None => zfirst = Some(out.clone()),
            Some(f) => assert!(f == &out, "zstd: {threads} workers gave other bytes"),
        }
        report(
            &format!("shmocker zstd -3, {threads} worker(s)"),
            data.len(),
            out.len(),
            median(times),
        );
    }

    for (name, cmd, args) in [
        ("pigz -6 (2 threads)", "pigz", &["-6", "-c"][..]),
        ("pigz -6 -p1", "pigz", &["-6", "-p1", "-c"][..]),
        ("gzip -6", "gzip", &["-6", "-c"][..]),
        ("zstd -3 -T2", "zstd", &["-3", "-T2", "-c"][..]),
        ("zstd -3 (1 thread)", "zstd", &["-3", "-T1", "-c"][..]),
    ] {
        let mut times = Vec::new();
        let mut size = 0;
        for _ in 0..runs {
            match tool(cmd, args, &file) {
                Some((d, n)) => {
                    times.push(d);
                    size = n;
                }
                None => {
                    println!("{name:34} not run: `{cmd}` is missing (apt-get install {cmd})");
                    break;
                }
            }
        }
        if !times.is_empty() {
            report(name, data.len(), size, median(times));
        }
    }
}
