//! Dockerfile parsing and build-check speed on a generated 10,000-line Dockerfile.
//!
//! Run with `cargo bench --bench parse`. A plain `harness = false` program rather than criterion:
//! the question is one figure (the median time of a parse, and of the checks, against a 50 ms
//! budget), which needs no statistics crate and no new dependency.

use std::hint::black_box;
use std::time::{Duration, Instant};

use shmocker::dockerfile::{self, checks, dockerignore::Dockerignore};

const LINES: usize = 10_000;
const RUNS: usize = 21;

/// A realistic mix, one block per stage: global ARGs, multi-stage FROM with --platform, ENV,
/// LABEL with continuations, COPY with flags, RUN with --mount and continuation lines, heredocs
/// (expanded and quoted, `<<-` with tabs), EXPOSE, HEALTHCHECK, comments and blank lines.
fn generate() -> String {
    let mut s = String::from(
        "# syntax=docker/dockerfile:1\nARG GO_VERSION=1.22\nARG REGISTRY=registry.example.com\n\n",
    );
    let mut n = 0;
    while s.lines().count() < LINES - 4 {
        let port = 8000 + n % 1000;
        s.push_str(&format!(
            "# stage {n}: builds app-{n}\n\
             FROM --platform=$BUILDPLATFORM ${{REGISTRY}}/golang:${{GO_VERSION}} AS build-{n}\n\
             ARG TARGETOS TARGETARCH\n\
             ARG VERSION_{n}=1.2.{n}\n\
             ENV CGO_ENABLED=0 GOOS=${{TARGETOS}} GOARCH=${{TARGETARCH}} APP_{n}=/out/app-{n}\n\
             LABEL org.opencontainers.image.version=\"${{VERSION_{n}}}\" \\\n\
             \x20     org.opencontainers.image.title=\"app {n}\" \\\n\
             \x20     org.opencontainers.image.source=\"https://example.com/app-{n}\"\n\
             WORKDIR /src/app-{n}\n\
             COPY --chown=1000:1000 --chmod=644 go.mod go.sum ./\n\
             COPY --link --exclude=*.md cmd/ internal/ ./\n\
             RUN --mount=type=cache,target=/go/pkg/mod \\\n\
             \x20   --mount=type=cache,target=/root/.cache/go-build \\\n\
             \x20   go mod download && \\\n\
             \x20   go build -trimpath -ldflags \"-X main.version=${{VERSION_{n}}}\" \\\n\
             \x20     -o ${{APP_{n}}} ./cmd/app\n\
             COPY <<EOF /etc/app-{n}.conf\n\
             name=app-{n}\n\
             version=${{VERSION_{n}}}\n\
             EOF\n\
             RUN <<-'SCRIPT'\n\
             \tset -eu\n\
             \techo \"checking $APP_{n}\"\n\
             \ttest -x \"$APP_{n}\"\n\
             \tSCRIPT\n\
             EXPOSE {port}/tcp\n\
             HEALTHCHECK --interval=30s --timeout=3s CMD [\"/out/app\", \"health\"]\n\
             USER 1000:1000\n\n"
        ));
        n += 1;
    }
    s.push_str("FROM scratch\nCOPY --from=build-0 /out/app-0 /app\nENTRYPOINT [\"/app\"]\n");
    s
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let source = generate();
    let lines = source.lines().count();
    let ignore = Dockerignore::parse("*.log\n.git\n").expect("valid .dockerignore");

    let parsed = dockerfile::parse(&source).expect("the generated Dockerfile parses");
    let report = checks::check(&source, &parsed, Some(&ignore)).expect("checks run");
    assert!(
        report.findings.is_empty(),
        "the generated Dockerfile should be clean:\n{}",
        report.render_text("generated", &source)
    );

    let mut parse_times = Vec::with_capacity(RUNS);
    let mut check_times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let t = Instant::now();
        let parsed = dockerfile::parse(black_box(&source)).expect("parses");
        parse_times.push(t.elapsed());
        let t = Instant::now();
        let report = checks::check(black_box(&source), &parsed, Some(&ignore)).expect("checks");
        check_times.push(t.elapsed());
        black_box(report);
    }
    let (p, c) = (median(parse_times), median(check_times));
    println!(
        "Dockerfile: {lines} lines, {} bytes, {} instructions",
        source.len(),
        parsed.nodes.len()
    );
    println!(
        "parse:  median {:.2} ms over {RUNS} runs",
        p.as_secs_f64() * 1e3
    );
    println!(
        "checks: median {:.2} ms over {RUNS} runs",
        c.as_secs_f64() * 1e3
    );
    println!(
        "total:  {:.2} ms (budget: 50 ms)",
        (p + c).as_secs_f64() * 1e3
    );
}
