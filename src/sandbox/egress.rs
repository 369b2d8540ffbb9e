//! `--allow-host`: the only way out of a `--network=private` step that has an allow-list.
//!
//! The step's network namespace has loopback only — no interface, no route — so nothing it
//! sends can leave, whatever address it uses. On that loopback pid 1 binds two sockets and
//! passes them to the helper, which stays in the runner's network namespace:
//!
//! - an HTTP proxy on 127.0.0.1:3128 (`HTTP_PROXY`/`HTTPS_PROXY` point at it): `CONNECT
//!   host:port` and absolute `http://` requests to an allowed host and port are relayed, from the
//!   helper, to that host (resolved by the runner); anything else gets `403` and a line in the
//!   step's output naming the host and the allow-list. A plain-HTTP connection carries one
//!   request, sent upstream with `Host` set to the URL's authority and no hop-by-hop fields;
//!   CONNECT relays TLS as it is (SNI and the `Host` inside are not seen);
//! - a resolver on 127.0.0.1:53 (the step's /etc/resolv.conf): allowed names get the runner's
//!   answer, other names NXDOMAIN and the same kind of line.
//!
//! The check is on the name the client asked for, so a raw IP address is refused unless that
//! address itself is listed. `10.0.2.2` is the runner's loopback, as under slirp4netns.
//! docs/adr/0009-private-network-and-allow-list.md says why this design.

use std::collections::HashSet;
use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One `--allow-host NAME[:PORT]`: a host name or IP address, and a port or any port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowHost {
    /// Lower-case, without a trailing dot or IPv6 brackets.
    pub host: String,
    pub port: Option<u16>,
}

impl FromStr for AllowHost {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "--allow-host {s:?}: {why}; write NAME, NAME:PORT, an IP address or [IPv6]:PORT"
            )
        };
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest
                .split_once(']')
                .ok_or_else(|| bad("no closing ] after the IPv6 address"))?;
            match after {
                "" => (h, None),
                _ => (
                    h,
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or_else(|| bad("expected :PORT after ]"))?,
                    ),
                ),
            }
        } else if s.matches(':').count() > 1 {
            (s, None) // a bare IPv6 address
        } else {
            match s.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        let port = port
            .map(|p| {
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad("the port is not a number from 1 to 65535"))
            })
            .transpose()?;
        let host = normalize(host);
        let valid = !host.is_empty()
            && (host.parse::<std::net::IpAddr>().is_ok()
                || host.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                }));
        if !valid {
            return Err(bad("not a host name or IP address"));
        }
        Ok(AllowHost { host, port })
    }
}

impl fmt::Display for AllowHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.port {
            Some(p) => write!(f, "{host}:{p}"),
            None => write!(f, "{host}"),
        }
    }
}

fn normalize(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether `host:port` is allowed (`port` `None`: any port of an allowed name, for DNS).
pub fn allowed(list: &[AllowHost], host: &str, port: Option<u16>) -> bool {
    let host = normalize(host.trim_start_matches('[').trim_end_matches(']'));
    list.iter().any(|a| {
        a.host == host
            && match (a.port, port) {
                (Some(want), Some(got)) => want == got,
                _ => true,
            }
    })
}

fn list_text(list: &[AllowHost]) -> String {
    list.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Serves the proxy and the resolver on threads of the calling process until it exits.
pub fn serve(proxy: TcpListener, dns: UdpSocket, list: Vec<AllowHost>) -> std::io::Result<()> {
    let list = Arc::new(list);
    let told = Arc::new(Mutex::new(HashSet::new()));
    {
        let (list, told) = (list.clone(), told.clone());
        std::thread::Builder::new()
            .name("resolver".into())
            .spawn(move || resolver(dns, &list, &told))?;
    }
    std::thread::Builder::new()
        .name("proxy".into())
        .spawn(move || {
            loop {
                let conn = match proxy.accept() {
                    Ok((conn, _)) => conn,
                    // Out of descriptors or memory (EMFILE, ENOBUFS...): wait instead of spinning.
                    Err(_) => {
                        std::thread::sleep(BACK_OFF);
                        continue;
                    }
                };
                let (list, told) = (list.clone(), told.clone());
                // A thread that cannot be made drops its connection (the client sees it close).
                let _ = std::thread::Builder::new().spawn(move || {
                    let _ = proxy_one(conn, &list, &told);
                });
            }
        })?;
    Ok(())
}

/// How long the accept and receive loops wait after an error (EMFILE and the like).
const BACK_OFF: Duration = Duration::from_millis(50);

/// The most a request line and its header fields may take together (and a chunked body's
/// trailer section).
pub const MAX_HEAD: usize = 64 * 1024;
/// The most one chunk-size line of a chunked request body may take.
const MAX_CHUNK_LINE: usize = 4096;

/// Prints the refusal once per destination, on the step's output (the helper's stderr).
fn tell(told: &Mutex<HashSet<String>>, what: &str, list: &[AllowHost]) -> String {
    let line = format!(
        "shmocker: {what} is blocked: not in --allow-host (allowed: {})",
        list_text(list)
    );
    if told
        .lock()
        .map(|mut t| t.insert(what.to_string()))
        .unwrap_or(true)
    {
        eprintln!("{line}");
    }
    line
}

/// Answers with `status` and closes the connection.
fn respond(conn: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
        body.len() + 1
    )?;
    linger(conn);
    Ok(())
}

/// Ends a connection whose answer is sent: what the client still sends (a body, a pipelined
/// request) is read and dropped for a moment, since closing with unread bytes resets the
/// connection, which can cut off the answer on the client's side.
fn linger(conn: &TcpStream) {
    let _ = conn.shutdown(Shutdown::Write);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = std::io::copy(&mut conn.take(1 << 20), &mut std::io::sink());
}

/// Splits `host:port`, `[v6]:port`, or a bare host with `default` as its port.
fn split_host_port(s: &str, default: u16) -> Option<(String, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default,
            None => return None,
        };
        return Some((h.to_string(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((s.to_string(), default)),
    }
}

/// One line read with at most `*budget` bytes (which it uses up), without its line ending.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Text(String),
    /// The connection ended before a whole line.
    Eof,
    TooLong,
    NotText,
}

fn read_line_capped(r: &mut impl BufRead, budget: &mut usize) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    let n = r
        .by_ref()
        .take(*budget as u64)
        .read_until(b'\n', &mut buf)?;
    *budget -= n;
    if !buf.ends_with(b"\n") {
        return Ok(if *budget == 0 {
            Line::TooLong
        } else {
            Line::Eof
        });
    }
    buf.pop();
    if buf.ends_with(b"\r") {
        buf.pop();
    }
    Ok(String::from_utf8(buf).map_or(Line::NotText, Line::Text))
}

/// The request line and header fields of one request (at most [`MAX_HEAD`] bytes), without
/// the empty line that ends them.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    Lines(Vec<String>),
    Closed,
    TooLarge,
    Bad,
}

fn read_head(r: &mut impl BufRead) -> std::io::Result<Head> {
    let mut budget = MAX_HEAD;
    let mut lines = Vec::new();
    loop {
        match read_line_capped(r, &mut budget)? {
            Line::Text(l) if l.is_empty() && lines.is_empty() => {} // RFC 9112 §2.2: a stray CRLF
            Line::Text(l) if l.is_empty() => return Ok(Head::Lines(lines)),
            Line::Text(l) => lines.push(l),
            Line::Eof => return Ok(Head::Closed),
            Line::TooLong => return Ok(Head::TooLarge),
            Line::NotText => return Ok(Head::Bad),
        }
    }
}

/// How a plain-HTTP request's body is framed (RFC 9112 §6.3).
#[derive(Debug, PartialEq, Eq)]
enum Body {
    Length(u64),
    Chunked,
}

/// A request the proxy may relay, once its host and port are checked.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Connect {
        host: String,
        port: u16,
    },
    /// An absolute `http://` request, with the head to send upstream: origin-form target, `Host`
    /// set to the URL's authority, hop-by-hop and proxy fields removed, `Connection: close`.
    Http {
        host: String,
        port: u16,
        head: String,
        body: Body,
    },
}

/// Fields that concern only this hop (RFC 9110 §7.6.1) or the proxy, never sent upstream;
/// `host` is replaced by the URL's authority and the framing fields are re-checked.
const DROPPED_FIELDS: [&str; 9] = [
    "connection",
    "proxy-connection",
    "proxy-authorization",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "host",
    "http2-settings",
];

/// Parses a request head; the error is the status line and the reason to answer with.
fn parse_request(head: &[String]) -> Result<Request, (&'static str, &'static str)> {
    const BAD: &str = "400 Bad Request";
    let first: Vec<&str> = head[0].split(' ').collect();
    let [method, target, version] = first[..] else {
        return Err((BAD, "shmocker proxy: bad request line"));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_graphic()) {
        return Err((BAD, "shmocker proxy: bad request line"));
    }
    if method.eq_ignore_ascii_case("CONNECT") {
        return match split_host_port(target, 443) {
            Some((host, port)) => Ok(Request::Connect { host, port }),
            None => Err((BAD, "shmocker proxy: bad CONNECT target")),
        };
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err((
            "505 HTTP Version Not Supported",
            "shmocker proxy: only HTTP/1.0 and HTTP/1.1 are relayed",
        ));
    }
    let rest = match target.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case("http://") => &target[7..],
        _ => {
            return Err((
                BAD,
                "shmocker proxy: only CONNECT and absolute http:// URLs are relayed",
            ));
        }
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let path = match path.split('#').next().unwrap_or("") {
        "" => "/".to_string(),
        p if p.starts_with('?') => format!("/{p}"),
        p => p.to_string(),
    };
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let Some((host, port)) = split_host_port(authority, 80).filter(|(h, _)| !h.is_empty()) else {
        return Err((BAD, "shmocker proxy: bad URL"));
    };

    let mut fields = Vec::new();
    for line in &head[1..] {
        let Some((name, value)) = line.split_once(':') else {
            return Err((BAD, "shmocker proxy: a header field without a colon"));
        };
        // No folded lines and no space before the colon (RFC 9112 §5.1, §5.2).
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err((BAD, "shmocker proxy: a malformed header field name"));
        }
        fields.push((name.to_ascii_lowercase(), name, value.trim()));
    }
    let listed: Vec<String> = fields
        .iter()
        .filter(|(n, _, _)| n == "connection")
        .flat_map(|(_, _, v)| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut length: Option<&str> = None;
    let mut codings = Vec::new();
    let mut out = format!("{method} {path} {version}\r\nHost: {authority}\r\n");
    for (name, original, value) in &fields {
        match name.as_str() {
            "content-length" => {
                if length.is_some_and(|l| l != *value) {
                    return Err((BAD, "shmocker proxy: conflicting Content-Length fields"));
                }
                length = Some(value);
            }
            "transfer-encoding" => codings.extend(
                value
                    .split(',')
                    .map(|c| c.trim().to_ascii_lowercase())
                    .filter(|c| !c.is_empty()),
            ),
            _ => {}
        }
        if DROPPED_FIELDS.contains(&name.as_str()) || listed.contains(name) {
            continue;
        }
        out.push_str(&format!("{original}: {value}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    let body = match (length, codings.last()) {
        (Some(_), Some(_)) => {
            return Err((
                BAD,
                "shmocker proxy: both Content-Length and Transfer-Encoding",
            ));
        }
        (Some(l), None) => match l.parse::<u64>() {
            Ok(n) if l.bytes().all(|b| b.is_ascii_digit()) => Body::Length(n),
            _ => return Err((BAD, "shmocker proxy: bad Content-Length")),
        },
        (None, Some(last)) if last == "chunked" => Body::Chunked,
        (None, Some(_)) => {
            return Err((
                BAD,
                "shmocker proxy: a request body must be framed by Content-Length or chunked",
            ));
        }
        (None, None) => Body::Length(0),
    };
    Ok(Request::Http {
        host,
        port,
        head: out,
        body,
    })
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

/// Copies exactly one request body from `r` to `w`, as framed by `body`, and nothing after it.
/// A chunked body is sent on re-chunked, without chunk extensions or trailer fields.
fn relay_body(r: &mut impl BufRead, w: &mut impl Write, body: &Body) -> std::io::Result<()> {
    fn exact(r: &mut impl BufRead, w: &mut impl Write, n: u64) -> std::io::Result<()> {
        if std::io::copy(&mut r.take(n), w)? != n {
            return Err(invalid("the request body ended early"));
        }
        Ok(())
    }
    match body {
        Body::Length(n) => exact(r, w, *n),
        Body::Chunked => loop {
            let mut budget = MAX_CHUNK_LINE;
            let Line::Text(line) = read_line_capped(r, &mut budget)? else {
                return Err(invalid("a bad chunk-size line"));
            };
            let hex = line.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(hex, 16)
                .ok()
                .filter(|_| hex.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| invalid("a bad chunk size"))?;
            if size == 0 {
                let mut budget = MAX_HEAD;
                loop {
                    match read_line_capped(r, &mut budget)? {
                        Line::Text(l) if l.is_empty() => break,
                        Line::Text(_) => {}
                        _ => return Err(invalid("a bad trailer section")),
                    }
                }
                return w.write_all(b"0\r\n\r\n");
            }
            write!(w, "{size:x}\r\n")?;
            exact(r, w, size)?;
            let mut budget = 2;
            if read_line_capped(r, &mut budget)? != Line::Text(String::new()) {
                return Err(invalid("no CRLF after a chunk"));
            }
            w.write_all(b"\r\n")?;
        },
    }
}

fn proxy_one(
    mut conn: TcpStream,
    list: &[AllowHost],
    told: &Mutex<HashSet<String>>,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let head = match read_head(&mut reader)? {
        Head::Lines(lines) => lines,
        Head::Closed => return Ok(()),
        Head::TooLarge => {
            return respond(
                &mut conn,
                "431 Request Header Fields Too Large",
                "shmocker proxy: the request line and header fields exceed 64 KiB",
            );
        }
        Head::Bad => {
            return respond(
                &mut conn,
                "400 Bad Request",
                "shmocker proxy: the request head is not text",
            );
        }
    };
    let request = match parse_request(&head) {
        Ok(r) => r,
        Err((status, why)) => return respond(&mut conn, status, why),
    };
    let (host, port) = match &request {
        Request::Connect { host, port } | Request::Http { host, port, .. } => (host, *port),
    };
    let shown = AllowHost {
        host: normalize(host),
        port: Some(port),
    }
    .to_string();
    if !allowed(list, host, Some(port)) {
        let line = tell(told, &shown, list);
        return respond(&mut conn, "403 Forbidden", &line);
    }
    // The runner's loopback, as slirp4netns shows it to a private step.
    let dial = if host == super::net::HOST_ADDR {
        "127.0.0.1"
    } else {
        host.as_str()
    };
    let upstream = match dial_host(dial, port) {
        Ok(s) => s,
        Err(e) => {
            let line = format!("shmocker: cannot connect to {shown}: {e}");
            eprintln!("{line}");
            return respond(&mut conn, "502 Bad Gateway", &line);
        }
    };
    conn.set_read_timeout(None)?;
    let mut upstream_w = upstream.try_clone()?;
    let mut upstream_r = upstream;
    let mut client_w = conn.try_clone()?;
    let plain = matches!(request, Request::Http { .. });
    let up = match request {
        Request::Connect { .. } => {
            conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
            // Bytes the client sent after the head (a TLS hello) go first.
            let buffered = reader.buffer().to_vec();
            upstream_w.write_all(&buffered)?;
            let mut client_r = reader.into_inner();
            std::thread::Builder::new().spawn(move || {
                let _ = std::io::copy(&mut client_r, &mut upstream_w);
                let _ = upstream_w.shutdown(Shutdown::Write);
            })?
        }
        // Exactly one request per connection: anything the client sends after its body (a
        // pipelined request, which could name another host) is never relayed.
        Request::Http { head, body, .. } => std::thread::Builder::new().spawn(move || {
            let sent = upstream_w
                .write_all(head.as_bytes())
                .and_then(|()| relay_body(&mut reader, &mut upstream_w, &body));
            if sent.is_err() {
                let _ = upstream_w.shutdown(Shutdown::Both);
            }
        })?,
    };
    let _ = std::io::copy(&mut upstream_r, &mut client_w);
    let _ = client_w.shutdown(Shutdown::Write);
    if plain {
        // The response is complete: a body still on its way ends at its next pause of 2 s,
        // and nothing the client sent after it is relayed.
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = up.join();
        linger(&conn);
    } else {
        let _ = up.join();
    }
    Ok(())
}

fn dial_host(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(15)) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_NXDOMAIN: u8 = 3;

fn resolver(sock: UdpSocket, list: &[AllowHost], told: &Mutex<HashSet<String>>) {
    let mut buf = [0u8; 1500];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            std::thread::sleep(BACK_OFF);
            continue;
        };
        if let Some(reply) = answer(&buf[..n], list, told) {
            let _ = sock.send_to(&reply, from);
        }
    }
}

/// The reply to one DNS query (RFC 1035), or `None` for something that is not one.
fn answer(q: &[u8], list: &[AllowHost], told: &Mutex<HashSet<String>>) -> Option<Vec<u8>> {
    if q.len() < 12 || q[2] & 0x80 != 0 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).into_owned());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let question_end = i + 4;
    q.get(..question_end)?;
    let name = labels.join(".");
    let mut reply = q[..question_end].to_vec();
    reply[2] = 0x80 | (q[2] & 0x79); // QR, the query's opcode and RD
    reply[3] = 0x80; // RA
    reply[6..12].copy_from_slice(&[0, 0, 0, 0, 0, 0]);
    if !allowed(list, &name, None) {
        tell(told, &format!("the DNS lookup of {name}"), list);
        reply[3] |= RCODE_NXDOMAIN;
        return Some(reply);
    }
    let addrs = match (name.as_str(), 0).to_socket_addrs() {
        Ok(a) => a.map(|a| a.ip()).collect::<Vec<_>>(),
        Err(_) => {
            reply[3] |= RCODE_SERVFAIL;
            return Some(reply);
        }
    };
    let mut count = 0u16;
    for ip in addrs {
        let data = match (ip, qtype) {
            (std::net::IpAddr::V4(v4), TYPE_A) => v4.octets().to_vec(),
            (std::net::IpAddr::V6(v6), TYPE_AAAA) => v6.octets().to_vec(),
            _ => continue,
        };
        reply.extend_from_slice(&[0xc0, 0x0c]); // the name in the question
        reply.extend_from_slice(&qtype.to_be_bytes());
        reply.extend_from_slice(&[0, 1, 0, 0, 0, 60]); // IN, TTL 60 s
        reply.extend_from_slice(&(data.len() as u16).to_be_bytes());
        reply.extend_from_slice(&data);
        count += 1;
    }
    reply[6..8].copy_from_slice(&count.to_be_bytes());
    Some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_allow_hosts() {
        let a: AllowHost = "Deb.Debian.org.:443".parse().unwrap();
        assert_eq!(a.host, "deb.debian.org");
        assert_eq!(a.port, Some(443));
        assert_eq!(a.to_string(), "deb.debian.org:443");
        let b: AllowHost = "[::1]:80".parse().unwrap();
        assert_eq!((b.host.as_str(), b.port), ("::1", Some(80)));
        assert_eq!("10.0.2.2".parse::<AllowHost>().unwrap().port, None);
        for bad in ["", "a:0", "a:x", "a b", "[::1", "host:99999"] {
            assert!(bad.parse::<AllowHost>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn matches_name_and_port() {
        let list: Vec<AllowHost> = ["pypi.org:443", "10.0.2.2", "files.example"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert!(allowed(&list, "PyPI.org", Some(443)));
        assert!(!allowed(&list, "pypi.org", Some(80)));
        assert!(allowed(&list, "pypi.org", None));
        assert!(allowed(&list, "10.0.2.2", Some(8080)));
        assert!(!allowed(&list, "151.101.0.223", Some(443)));
        assert!(!allowed(&list, "evil.pypi.org", Some(443)));
    }

    fn ask(port: u16, request: &str) -> (TcpStream, String) {
        use std::io::Read;
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(request.as_bytes()).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && c.read(&mut byte).unwrap() == 1 {
            head.push(byte[0]);
        }
        (c, String::from_utf8_lossy(&head).into_owned())
    }

    #[test]
    fn relays_allowed_connects_and_refuses_the_rest() {
        use std::io::Read;
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let echo_port = echo.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut s in echo.incoming().flatten().take(2) {
                let mut buf = [0u8; 5];
                if s.read_exact(&mut buf).is_ok() {
                    let _ = s.write_all(&buf);
                }
            }
        });
        let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = proxy.local_addr().unwrap().port();
        let dns = UdpSocket::bind("127.0.0.1:0").unwrap();
        serve(
            proxy,
            dns,
            vec![format!("127.0.0.1:{echo_port}").parse().unwrap()],
        )
        .unwrap();

        let (mut c, head) = ask(
            port,
            &format!("CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\n\r\n"),
        );
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        c.write_all(b"hello").unwrap();
        let mut back = [0u8; 5];
        c.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"hello");

        let other = if echo_port == 65535 { 1 } else { echo_port + 1 };
        let (mut c, head) = ask(port, &format!("CONNECT 127.0.0.1:{other} HTTP/1.1\r\n\r\n"));
        assert!(head.starts_with("HTTP/1.1 403"), "{head}");
        let mut body = String::new();
        c.read_to_string(&mut body).unwrap();
        assert!(
            body.contains(&format!(
                "127.0.0.1:{other} is blocked: not in --allow-host (allowed: 127.0.0.1:{echo_port})"
            )),
            "{body}"
        );

        let (_, head) = ask(
            port,
            "GET http://blocked.test/x HTTP/1.1\r\nHost: blocked.test\r\n\r\n",
        );
        assert!(head.starts_with("HTTP/1.1 403"), "{head}");
        let (_, head) = ask(port, "GET /x HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    }

    #[test]
    fn refuses_names_not_listed() {
        let list = vec!["localhost".parse().unwrap()];
        let told = Mutex::new(HashSet::new());
        // id 0x1234, RD, one question: example.com A IN
        let mut q = vec![0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x07example\x03com\x00\x00\x01\x00\x01");
        let r = answer(&q, &list, &told).unwrap();
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(r[3] & 0x0f, RCODE_NXDOMAIN);
        assert!(
            told.lock()
                .unwrap()
                .contains("the DNS lookup of example.com")
        );
        let mut q = vec![0x12, 0x35, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x09localhost\x00\x00\x01\x00\x01");
        let r = answer(&q, &list, &told).unwrap();
        assert_eq!(r[3] & 0x0f, 0);
        assert!(
            u16::from_be_bytes([r[6], r[7]]) >= 1,
            "no A record for localhost"
        );
        assert_eq!(&r[r.len() - 4..], &[127, 0, 0, 1]);
    }
    /// A loopback server that answers one request per connection and sends everything it
    /// received on each connection (read until the proxy closes it) down the channel.
    fn recording_server() -> (u16, std::sync::mpsc::Receiver<String>) {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for mut s in server.incoming().flatten() {
                let mut got = Vec::new();
                let mut byte = [0u8; 1];
                while !got.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                    got.push(byte[0]);
                }
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
                let _ = s.shutdown(Shutdown::Write);
                let _ = s.read_to_end(&mut got);
                let _ = tx.send(String::from_utf8_lossy(&got).into_owned());
            }
        });
        (port, rx)
    }

    fn proxy_for(list: &[String]) -> u16 {
        let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = proxy.local_addr().unwrap().port();
        let dns = UdpSocket::bind("127.0.0.1:0").unwrap();
        serve(
            proxy,
            dns,
            list.iter().map(|a| a.parse().unwrap()).collect(),
        )
        .unwrap();
        port
    }

    #[test]
    fn sends_the_urls_authority_as_host_and_one_request_per_connection() {
        use std::io::Read;
        let (server, received) = recording_server();
        let allowed = format!("127.0.0.1:{server}");
        let port = proxy_for(std::slice::from_ref(&allowed));
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(
            format!(
                "GET http://{allowed}/a?b HTTP/1.1\r\nHost: other.example\r\nProxy-Authorization: Basic eA==\r\n\
                 Proxy-Connection: keep-alive\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nAccept: */*\r\n\r\n\
                 GET http://evil.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n\
                 GET /c HTTP/1.1\r\nHost: other.example\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with("ok"),
            "{answer}"
        );
        drop(c);
        let got = received.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(
            got,
            format!(
                "GET /a?b HTTP/1.1\r\nHost: {allowed}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
            ),
            "what the server received"
        );
        assert!(
            received.recv_timeout(Duration::from_millis(200)).is_err(),
            "a second connection reached the server"
        );
    }

    #[test]
    fn relays_exactly_one_request_body() {
        let mut out = Vec::new();
        let mut input =
            std::io::Cursor::new(b"helloGET http://evil.test/ HTTP/1.1\r\n\r\n".to_vec());
        relay_body(&mut input, &mut out, &Body::Length(5)).unwrap();
        assert_eq!(out, b"hello");

        let mut out = Vec::new();
        let mut input = std::io::Cursor::new(
            b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\nGET / HTTP/1.1\r\n\r\n"
                .to_vec(),
        );
        relay_body(&mut input, &mut out, &Body::Chunked).unwrap();
        assert_eq!(out, b"5\r\nhello\r\na\r\n0123456789\r\n0\r\n\r\n");

        for bad in [
            &b"5\r\nhel"[..],
            b"zz\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"1\r\nx\r\n",
        ] {
            let mut input = std::io::Cursor::new(bad.to_vec());
            assert!(
                relay_body(&mut input, &mut Vec::new(), &Body::Chunked).is_err(),
                "{:?} relayed",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn refuses_requests_it_cannot_frame_or_parse() {
        let req = |lines: &[&str]| {
            parse_request(&lines.iter().map(ToString::to_string).collect::<Vec<_>>())
        };
        let get = "POST http://a.test/ HTTP/1.1";
        for (lines, status) in [
            (&[get, "Transfer-Encoding: gzip"][..], "400 Bad Request"),
            (
                &[get, "Transfer-Encoding: chunked", "Content-Length: 3"],
                "400 Bad Request",
            ),
            (
                &[get, "Content-Length: 3", "Content-Length: 4"],
                "400 Bad Request",
            ),
            (&[get, "Content-Length: +3"], "400 Bad Request"),
            (&[get, "X-A: 1", " folded"], "400 Bad Request"),
            (&[get, "Host : a.test"], "400 Bad Request"),
            (
                &["GET http://a.test/ HTTP/2.0"],
                "505 HTTP Version Not Supported",
            ),
            (&["GET /x HTTP/1.1"], "400 Bad Request"),
        ] {
            match req(lines) {
                Err((got, _)) => assert_eq!(got, status, "{lines:?}"),
                Ok(r) => panic!("{lines:?} accepted: {r:?}"),
            }
        }
        let Ok(Request::Http {
            host,
            port,
            head,
            body,
        }) = req(&[get, "transfer-encoding: gzip, chunked", "host: b.test"])
        else {
            panic!("chunked refused");
        };
        assert_eq!((host.as_str(), port, body), ("a.test", 80, Body::Chunked));
        assert!(
            head.starts_with("POST / HTTP/1.1\r\nHost: a.test\r\n"),
            "{head}"
        );
        assert!(!head.contains("b.test"), "{head}");
    }

    #[test]
    fn caps_the_request_head() {
        let mut r = std::io::Cursor::new(format!("GET {} HTTP/1.1\r\n\r\n", "a".repeat(MAX_HEAD)));
        assert_eq!(read_head(&mut r).unwrap(), Head::TooLarge);
        let fields = "X-A: 1\r\n".repeat(MAX_HEAD / 8);
        let mut r = std::io::Cursor::new(format!("GET / HTTP/1.1\r\n{fields}\r\n"));
        assert_eq!(read_head(&mut r).unwrap(), Head::TooLarge);
        let mut r = std::io::Cursor::new(b"GET / HTTP/1.1\r\nX: \xff\r\n\r\n".to_vec());
        assert_eq!(read_head(&mut r).unwrap(), Head::Bad);
        let mut r = std::io::Cursor::new("\r\nGET / HTTP/1.1\r\nA: b\r\n\r\nrest");
        assert_eq!(
            read_head(&mut r).unwrap(),
            Head::Lines(vec!["GET / HTTP/1.1".into(), "A: b".into()])
        );
        let mut r = std::io::Cursor::new("GET / HTTP/1.1\r\nA: b");
        assert_eq!(read_head(&mut r).unwrap(), Head::Closed);

        // And through the proxy: a 431 for a head that never ends.
        let port = proxy_for(&["127.0.0.1:1".to_string()]);
        let (_, head) = ask(
            port,
            &format!(
                "GET http://127.0.0.1:1/ HTTP/1.1\r\nX-A: {}\r\n",
                "a".repeat(MAX_HEAD)
            ),
        );
        assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    }
}
