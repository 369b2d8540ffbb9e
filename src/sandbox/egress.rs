//! `--allow-host`: the only way out of a `--network=private` step that has an allow-list.
//!
//! The step's network namespace has loopback only — no interface, no route — so nothing it
//! sends can leave, whatever address it uses. On that loopback pid 1 binds two sockets and
//! passes them to the helper, which stays in the runner's network namespace:
//!
//! - an HTTP proxy on 127.0.0.1:3128 (`HTTP_PROXY`/`HTTPS_PROXY` point at it): `CONNECT
//!   host:port` and absolute `http://` requests to an allowed host and port are relayed, from the
//!   helper, to that host (resolved by the runner); anything else gets `403` and a line in the
//!   step's output naming the host and the allow-list;
//! - a resolver on 127.0.0.1:53 (the step's /etc/resolv.conf): allowed names get the runner's
//!   answer, other names NXDOMAIN and the same kind of line.
//!
//! The check is on the name the client asked for, so a raw IP address is refused unless that
//! address itself is listed. `10.0.2.2` is the runner's loopback, as under slirp4netns.
//! docs/adr/0009-private-network-and-allow-list.md says why this design.

use std::collections::HashSet;
use std::fmt;
use std::io::{BufRead, BufReader, Write};
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

/// Serves the proxy and the resolver on threads of the helper until the helper exits.
pub fn serve(proxy: TcpListener, dns: UdpSocket, list: Vec<AllowHost>) {
    let list = Arc::new(list);
    let told = Arc::new(Mutex::new(HashSet::new()));
    {
        let (list, told) = (list.clone(), told.clone());
        std::thread::spawn(move || resolver(dns, &list, &told));
    }
    std::thread::spawn(move || {
        for conn in proxy.incoming().flatten() {
            let (list, told) = (list.clone(), told.clone());
            std::thread::spawn(move || {
                let _ = proxy_one(conn, &list, &told);
            });
        }
    });
}

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

fn respond(conn: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
        body.len() + 1
    )
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

fn proxy_one(
    mut conn: TcpStream,
    list: &[AllowHost],
    told: &Mutex<HashSet<String>>,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let end = line == "\r\n" || line == "\n";
        head.push(line);
        if end {
            break;
        }
        if head.len() > 200 {
            return respond(&mut conn, "431 Request Header Fields Too Large", "");
        }
    }
    conn.set_read_timeout(None)?;
    let first: Vec<&str> = head[0].split_whitespace().collect();
    let [method, target, version] = first[..] else {
        return respond(
            &mut conn,
            "400 Bad Request",
            "shmocker proxy: bad request line",
        );
    };
    let connect = method.eq_ignore_ascii_case("CONNECT");
    let (host, port, path) = if connect {
        match split_host_port(target, 443) {
            Some((h, p)) => (h, p, String::new()),
            None => {
                return respond(
                    &mut conn,
                    "400 Bad Request",
                    "shmocker proxy: bad CONNECT target",
                );
            }
        }
    } else {
        let Some(rest) = target
            .strip_prefix("http://")
            .or_else(|| target.strip_prefix("HTTP://"))
        else {
            return respond(
                &mut conn,
                "400 Bad Request",
                "shmocker proxy: only CONNECT and absolute http:// URLs are relayed",
            );
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        let authority = authority.rsplit('@').next().unwrap_or(authority);
        match split_host_port(authority, 80) {
            Some((h, p)) => (h, p, path),
            None => return respond(&mut conn, "400 Bad Request", "shmocker proxy: bad URL"),
        }
    };
    let shown = AllowHost {
        host: normalize(&host),
        port: Some(port),
    }
    .to_string();
    if !allowed(list, &host, Some(port)) {
        let line = tell(told, &shown, list);
        return respond(&mut conn, "403 Forbidden", &line);
    }
    // The runner's loopback, as slirp4netns shows it to a private step.
    let dial = if host == super::net::HOST_ADDR {
        "127.0.0.1".to_string()
    } else {
        host.clone()
    };
    let upstream = match dial_host(&dial, port) {
        Ok(s) => s,
        Err(e) => {
            let line = format!("shmocker: cannot connect to {shown}: {e}");
            eprintln!("{line}");
            return respond(&mut conn, "502 Bad Gateway", &line);
        }
    };
    let mut upstream_w = upstream.try_clone()?;
    if connect {
        conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    } else {
        let mut out = format!("{method} {path} {version}\r\n");
        for h in &head[1..head.len() - 1] {
            let name = h
                .split(':')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if !matches!(
                name.as_str(),
                "proxy-connection" | "proxy-authorization" | "connection" | "keep-alive"
            ) {
                out.push_str(h.trim_end());
                out.push_str("\r\n");
            }
        }
        // One request per connection: the next could name another host.
        out.push_str("Connection: close\r\n\r\n");
        upstream_w.write_all(out.as_bytes())?;
    }
    // Bytes the client sent after the head (a request body, a TLS hello) go first.
    let buffered = reader.buffer().to_vec();
    upstream_w.write_all(&buffered)?;
    let mut client_r = reader.into_inner();
    let mut upstream_r = upstream;
    let mut client_w = conn;
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut client_r, &mut upstream_w);
        let _ = upstream_w.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut upstream_r, &mut client_w);
    let _ = client_w.shutdown(Shutdown::Write);
    let _ = up.join();
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
        );

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
}
