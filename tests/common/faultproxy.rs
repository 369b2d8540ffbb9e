//! A fault-injecting HTTP/1.1 proxy for registry tests.
//!
//! It listens on 127.0.0.1 (a free port), relays each request to an upstream registry on a
//! fresh connection, and answers every request with `Connection: close`, so one request is one
//! connection and a fault never has to resynchronise a stream. A share of requests fail, in the
//! ways a flaky registry or network fails:
//!
//! - `503 Service Unavailable`, `429 Too Many Requests` with `Retry-After: 1`, without contacting
//!   the registry;
//! - a reset (RST) after the request was read, before any answer;
//! - a blob GET whose body stops half way (the headers promise the whole length);
//! - `500` on an upload's final PUT (its body read and dropped);
//! - on request only ([`Plan::trickle_blob_gets`]), a blob GET answered with its head and then
//!   one byte every half second, for ever: a stalled connection that never goes idle long
//!   enough for a read timeout;
//! - on request only ([`Plan::rate_limits`]), the first N requests of a [`Kind`] answered
//!   `429 Too Many Requests` with a `Retry-After` of so many seconds or an HTTP-date, without
//!   contacting the registry.
//!
//! Which requests fail comes from a seeded generator over the request's sequence number, so a
//! run is reproducible up to the order in which parallel requests arrive. With `each_kind_once`,
//! the first request a kind applies to gets that fault, so every kind is exercised in every run.
//! [`FaultProxy::counts`] says what was injected, for tests to assert on, and
//! [`FaultProxy::seen`] when each request arrived.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    Unavailable503,
    TooMany429,
    ResetBeforeResponse,
    TruncatedBlob,
    UploadPut500,
    /// Never chosen at random: see [`Plan::trickle_blob_gets`].
    TrickleBlob,
    /// Never chosen at random: see [`Plan::rate_limits`].
    RetryAfter429,
}

/// A kind of registry request, for [`RateLimit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    ManifestGet,
    ManifestPut,
    BlobHead,
    BlobGet,
    /// The POST that opens a blob upload session.
    UploadPost,
}

/// What a refused request's `Retry-After` says.
#[derive(Debug, Clone, Copy)]
pub enum RetryAfter {
    /// Delay-seconds: `Retry-After: N`.
    Seconds(u64),
    /// An HTTP-date at least this many seconds after the refusal (the next whole second, plus
    /// N): `Retry-After: Sun, 06 Nov 1994 08:49:37 GMT`.
    DateIn(u64),
}

/// Answer the first `first` requests of `kind` with 429 and `retry_after`.
#[derive(Debug, Clone)]
pub struct RateLimit {
    pub kind: Kind,
    pub first: u64,
    pub retry_after: RetryAfter,
}

/// A request as it arrived.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub wall: SystemTime,
    pub method: String,
    pub path: String,
    pub fault: Option<Fault>,
    /// For a request refused with an HTTP-date, that date.
    pub retry_at: Option<SystemTime>,
}

const ALL: [Fault; 5] = [
    Fault::Unavailable503,
    Fault::TooMany429,
    Fault::ResetBeforeResponse,
    Fault::TruncatedBlob,
    Fault::UploadPut500,
];

/// A blob answer at least this long may be cut short (layers, not configs).
const TRUNCATE_MIN: u64 = 256 * 1024;

#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    /// Share of requests that fail, 0.0 to 1.0.
    pub rate: f64,
    /// Inject each kind on the first request it applies to.
    pub each_kind_once: bool,
    /// Fail every upload's final PUT with 500 (the registry never commits a blob).
    pub fail_all_upload_puts: bool,
    /// Trickle the first this many blob GETs (see the module docs).
    pub trickle_blob_gets: u64,
    /// Refuse requests with 429 and `Retry-After` (see the module docs).
    pub rate_limits: Vec<RateLimit>,
}

impl Plan {
    /// ~10 % of requests failing in mixed ways, every kind at least once.
    pub fn flaky(seed: u64) -> Plan {
        Plan {
            seed,
            rate: 0.10,
            each_kind_once: true,
            fail_all_upload_puts: false,
            trickle_blob_gets: 0,
            rate_limits: Vec::new(),
        }
    }

    /// Nothing fails at random; only `rate_limits` are refused.
    pub fn rate_limited(rate_limits: Vec<RateLimit>) -> Plan {
        Plan {
            seed: 0,
            rate: 0.0,
            each_kind_once: false,
            fail_all_upload_puts: false,
            trickle_blob_gets: 0,
            rate_limits,
        }
    }
}

struct State {
    plan: Plan,
    upstream: SocketAddr,
    requests: AtomicU64,
    counts: Mutex<BTreeMap<Fault, u64>>,
    /// Request lines seen, for failure messages.
    log: Mutex<Vec<String>>,
    seen: Mutex<Vec<Seen>>,
    /// How many requests each of `plan.rate_limits` refused.
    limited: Mutex<Vec<u64>>,
    stop: AtomicBool,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    _runtime: std::thread::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy in front of `upstream` (`host:port`) on a thread of its own.
    pub fn start(upstream: &str, plan: Plan) -> FaultProxy {
        let upstream: SocketAddr = upstream.parse().expect("upstream host:port");
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let state = Arc::new(State {
            plan,
            upstream,
            requests: AtomicU64::new(0),
            counts: Mutex::new(BTreeMap::new()),
            log: Mutex::new(Vec::new()),
            seen: Mutex::new(Vec::new()),
            limited: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let st = state.clone();
        let runtime = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).unwrap();
                while !st.stop.load(Ordering::Relaxed) {
                    let accepted =
                        tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
                    if let Ok(Ok((conn, _))) = accepted {
                        let st = st.clone();
                        tokio::spawn(async move {
                            let _ = handle(conn, st).await;
                        });
                    }
                }
            });
        });
        FaultProxy {
            addr,
            state,
            _runtime: runtime,
        }
    }

    /// `127.0.0.1:PORT`, to put in image references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// What was injected so far, by kind.
    pub fn counts(&self) -> BTreeMap<Fault, u64> {
        self.state.counts.lock().unwrap().clone()
    }

    pub fn total_faults(&self) -> u64 {
        self.counts().values().sum()
    }

    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Every request in the order it arrived.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Every request line with the fault it got, one per line.
    pub fn log(&self) -> String {
        self.state.log.lock().unwrap().join("\n")
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
    }
}

/// splitmix64: a well-mixed number from the seed and the request's sequence number.
fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct Head {
    method: String,
    path: String,
    /// The head as received, without the blank line.
    lines: Vec<String>,
    content_length: Option<u64>,
    chunked: bool,
}

impl Head {
    fn is_blob_get(&self) -> bool {
        self.method == "GET" && self.path.contains("/blobs/sha256:")
    }
    fn is_upload_put(&self) -> bool {
        self.method == "PUT" && self.path.contains("/blobs/uploads/")
    }
    fn is(&self, kind: Kind) -> bool {
        match kind {
            Kind::ManifestGet => self.method == "GET" && self.path.contains("/manifests/"),
            Kind::ManifestPut => self.method == "PUT" && self.path.contains("/manifests/"),
            Kind::BlobHead => self.method == "HEAD" && self.path.contains("/blobs/sha256:"),
            Kind::BlobGet => self.is_blob_get(),
            Kind::UploadPost => self.method == "POST" && self.path.contains("/blobs/uploads/"),
        }
    }
    fn applies(&self, f: Fault) -> bool {
        match f {
            Fault::TruncatedBlob => self.is_blob_get(),
            Fault::UploadPut500 => self.is_upload_put(),
            _ => true,
        }
    }
}

/// Reads up to the end of an HTTP head; returns the head and whatever followed it.
async fn read_head<R: AsyncRead + Unpin>(
    conn: &mut R,
) -> std::io::Result<Option<(Vec<String>, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&buf[..end]).into_owned();
            let rest = buf[end + 4..].to_vec();
            return Ok(Some((
                text.split("\r\n").map(str::to_string).collect(),
                rest,
            )));
        }
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 1 << 20 {
            return Err(std::io::Error::other("head too large"));
        }
    }
}

fn header<'a>(lines: &'a [String], name: &str) -> Option<&'a str> {
    lines.iter().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The head with `Connection: close` in place of any connection headers.
fn closing(lines: &[String]) -> Vec<u8> {
    let mut out = String::new();
    for l in lines {
        let name = l
            .split_once(':')
            .map(|(k, _)| k.trim().to_ascii_lowercase());
        if matches!(name.as_deref(), Some("connection" | "keep-alive")) {
            continue;
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

/// Reads (and drops) a request body of known length, `already` bytes of which were read.
async fn drain(conn: &mut TcpStream, head: &Head, already: usize) -> std::io::Result<()> {
    let Some(len) = head.content_length else {
        return Ok(());
    };
    let mut left = len.saturating_sub(already as u64);
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let n = conn.read(&mut buf[..left.min(65536) as usize]).await?;
        if n == 0 {
            break;
        }
        left -= n as u64;
    }
    Ok(())
}

/// An answer with the error envelope a registry sends with that status.
async fn respond(conn: &mut TcpStream, status: &str, extra: &str) -> std::io::Result<()> {
    let code = match status.split(' ').next() {
        Some("429") => "TOOMANYREQUESTS",
        Some("503") => "UNAVAILABLE",
        _ => "UNKNOWN",
    };
    let body = format!(
        "{{\"errors\":[{{\"code\":\"{code}\",\"message\":\"injected by the test proxy: {status}\"}}]}}"
    );
    let msg = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(msg.as_bytes()).await?;
    conn.shutdown().await
}

/// The `Retry-After` value (and its date, if one) to refuse this request with, if a rate
/// limit of the plan applies to it.
fn rate_limit(state: &State, head: &Head) -> Option<(String, Option<SystemTime>)> {
    let mut limited = state.limited.lock().unwrap();
    limited.resize(state.plan.rate_limits.len(), 0);
    let (i, rule) = state
        .plan
        .rate_limits
        .iter()
        .enumerate()
        .find(|(i, r)| head.is(r.kind) && limited[*i] < r.first)?;
    limited[i] += 1;
    Some(match rule.retry_after {
        RetryAfter::Seconds(n) => (n.to_string(), None),
        RetryAfter::DateIn(n) => {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            let at = UNIX_EPOCH + Duration::from_secs(now.as_secs() + 1 + n);
            let ts = jiff::Timestamp::try_from(at).unwrap();
            (
                ts.strftime("%a, %d %b %Y %H:%M:%S GMT").to_string(),
                Some(at),
            )
        }
    })
}

fn choose(state: &State, head: &Head) -> Option<Fault> {
    let plan = &state.plan;
    if plan.fail_all_upload_puts && head.is_upload_put() {
        return Some(Fault::UploadPut500);
    }
    if head.is_blob_get() {
        // Counted here, under the lock, so that parallel GETs never trickle more than asked.
        let mut counts = state.counts.lock().unwrap();
        let trickled = counts.entry(Fault::TrickleBlob).or_default();
        if *trickled < plan.trickle_blob_gets {
            *trickled += 1;
            return Some(Fault::TrickleBlob);
        }
    }
    let n = state.requests.fetch_add(1, Ordering::Relaxed);
    if plan.each_kind_once {
        let counts = state.counts.lock().unwrap();
        // The specific kinds first, so a blob GET or an upload PUT gets its own fault.
        for f in [Fault::TruncatedBlob, Fault::UploadPut500]
            .into_iter()
            .chain(ALL)
        {
            if head.applies(f) && !counts.contains_key(&f) {
                return Some(f);
            }
        }
    }
    let r = mix(plan.seed, n);
    if (r >> 11) as f64 / (1u64 << 53) as f64 >= plan.rate {
        return None;
    }
    let kinds: Vec<Fault> = ALL.into_iter().filter(|f| head.applies(*f)).collect();
    Some(kinds[(mix(plan.seed ^ 0x5eed, n) % kinds.len() as u64) as usize])
}

async fn handle(mut client: TcpStream, state: Arc<State>) -> std::io::Result<()> {
    let Some((lines, rest)) = read_head(&mut client).await? else {
        return Ok(());
    };
    let mut words = lines[0].split_whitespace();
    let head = Head {
        method: words.next().unwrap_or_default().to_string(),
        path: words.next().unwrap_or_default().to_string(),
        content_length: header(&lines, "content-length").and_then(|v| v.parse().ok()),
        chunked: header(&lines, "transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked")),
        lines,
    };
    let limited = rate_limit(&state, &head);
    let fault = match limited {
        Some(_) => Some(Fault::RetryAfter429),
        None => choose(&state, &head),
    };
    // Counted before it happens: the client may see the effect before this task goes on. A
    // truncation is counted once the body is known to be worth cutting (below).
    if let Some(f) = fault.filter(|f| !matches!(f, Fault::TruncatedBlob | Fault::TrickleBlob)) {
        *state.counts.lock().unwrap().entry(f).or_default() += 1;
    }
    state
        .log
        .lock()
        .unwrap()
        .push(format!("{} {} -> {fault:?}", head.method, head.path));
    state.seen.lock().unwrap().push(Seen {
        at: Instant::now(),
        wall: SystemTime::now(),
        method: head.method.clone(),
        path: head.path.clone(),
        fault,
        retry_at: limited.as_ref().and_then(|(_, at)| *at),
    });

    match fault {
        Some(Fault::Unavailable503) => {
            drain(&mut client, &head, rest.len()).await?;
            return respond(&mut client, "503 Service Unavailable", "").await;
        }
        Some(Fault::TooMany429) => {
            drain(&mut client, &head, rest.len()).await?;
            return respond(&mut client, "429 Too Many Requests", "Retry-After: 1\r\n").await;
        }
        Some(Fault::RetryAfter429) => {
            let (value, _) = limited.unwrap_or_default();
            drain(&mut client, &head, rest.len()).await?;
            let extra = format!("Retry-After: {value}\r\n");
            return respond(&mut client, "429 Too Many Requests", &extra).await;
        }
        Some(Fault::UploadPut500) => {
            drain(&mut client, &head, rest.len()).await?;
            return respond(&mut client, "500 Internal Server Error", "").await;
        }
        Some(Fault::ResetBeforeResponse) => {
            drain(&mut client, &head, rest.len()).await?;
            #[allow(deprecated)] // a zero linger sends RST at once; nothing blocks
            client.set_linger(Some(Duration::ZERO))?;
            drop(client);
            return Ok(());
        }
        Some(Fault::TruncatedBlob | Fault::TrickleBlob) | None => {}
    }

    let mut truncated = false;
    let mut upstream = TcpStream::connect(state.upstream).await?;
    upstream.write_all(&closing(&head.lines)).await?;
    upstream.write_all(&rest).await?;
    let (mut client_r, mut client_w) = client.split();
    let (mut up_r, mut up_w) = upstream.split();
    // The request body (if any) goes up while the answer comes down; the upstream closes when
    // it has answered, since it was asked to.
    let body_up = async {
        if head.content_length.unwrap_or(0) > rest.len() as u64 || head.chunked {
            let _ = tokio::io::copy(&mut client_r, &mut up_w).await;
        }
    };
    let answer_down = async {
        let Some((resp_lines, resp_rest)) = read_head(&mut up_r).await? else {
            return Ok::<(), std::io::Error>(());
        };
        client_w.write_all(&closing(&resp_lines)).await?;
        let len: u64 = header(&resp_lines, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        // Only layers are cut (mid-blob); a small blob (a config) passes whole, and the fault
        // stays due for the next blob GET.
        if fault == Some(Fault::TruncatedBlob) && len >= TRUNCATE_MIN {
            *state
                .counts
                .lock()
                .unwrap()
                .entry(Fault::TruncatedBlob)
                .or_default() += 1;
            truncated = true;
            let mut budget = (len / 2) as usize;
            let take = resp_rest.len().min(budget);
            client_w.write_all(&resp_rest[..take]).await?;
            budget -= take;
            let mut buf = vec![0u8; 64 * 1024];
            while budget > 0 {
                let n = up_r.read(&mut buf[..budget.min(65536)]).await?;
                if n == 0 {
                    break;
                }
                client_w.write_all(&buf[..n]).await?;
                budget -= n;
            }
            client_w.flush().await?;
            return Ok(());
        }
        if fault == Some(Fault::TrickleBlob) {
            let mut body = resp_rest;
            up_r.read_to_end(&mut body).await?;
            // One byte at a time, never the last: the answer never completes.
            for b in &body[..body.len().saturating_sub(1)] {
                if state.stop.load(Ordering::Relaxed) {
                    break;
                }
                client_w.write_all(std::slice::from_ref(b)).await?;
                client_w.flush().await?;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            return Ok(());
        }
        client_w.write_all(&resp_rest).await?;
        tokio::io::copy(&mut up_r, &mut client_w).await?;
        client_w.shutdown().await?;
        Ok(())
    };
    tokio::select! {
        r = answer_down => r?,
        _ = async { body_up.await; std::future::pending::<()>().await } => {}
    }
    if truncated {
        #[allow(deprecated)]
        client.set_linger(Some(Duration::ZERO))?;
    }
    Ok(())
}
