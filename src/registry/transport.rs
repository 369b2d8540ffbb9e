//! How a registry host is reached: plain HTTP or HTTPS, and which extra CA certificates to trust.
//!
//! Docker's rules, kept: loopback registries (`localhost`, `127.0.0.0/8`, `[::1]`) and the hosts
//! given as insecure are spoken to over plain HTTP; everything else over HTTPS, trusting the
//! system roots plus any `*.crt` in `<certs.d>/<host:port>/`. One exception for loopback: a host
//! that has a certs.d directory with certificates is taken to speak TLS (someone put a CA there
//! for it), which is what lets a local TLS registry be used at all.

use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};

use oci_client::client::{Certificate, CertificateEncoding};

use super::RegistryError;

/// The default certs.d roots, as docker and podman read them.
pub(crate) fn default_certs_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![
        PathBuf::from("/etc/docker/certs.d"),
        PathBuf::from("/etc/containers/certs.d"),
    ];
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(cfg) = env("XDG_CONFIG_HOME").or_else(|| env("HOME").map(|h| h.join(".config"))) {
        dirs.push(cfg.join("containers/certs.d"));
    }
    dirs
}

/// Splits `host[:port]` (with `[v6]` brackets) into the host part without brackets.
pub(crate) fn host_part(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match registry.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => registry,
    }
}

pub(crate) fn is_loopback(registry: &str) -> bool {
    let host = host_part(registry);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.is_loopback(),
        Ok(IpAddr::V6(v6)) => v6 == Ipv6Addr::LOCALHOST,
        Err(_) => false,
    }
}

/// Whether `registry` (`host[:port]`) is named by one of the insecure hosts, either exactly or
/// by its host part (an entry without a port covers every port of that host).
pub(crate) fn is_insecure(registry: &str, insecure_hosts: &[String]) -> bool {
    insecure_hosts.iter().any(|h| {
        let h = h.trim().trim_start_matches("http://").trim_end_matches('/');
        h.eq_ignore_ascii_case(registry) || h.eq_ignore_ascii_case(host_part(registry))
    })
}

/// The CA certificates configured for `registry` under the certs.d roots, one entry per PEM
/// block, each checked so that a broken file is named rather than silently ignored.
pub(crate) fn load_certs(
    registry: &str,
    roots: &[PathBuf],
) -> Result<Vec<Certificate>, RegistryError> {
    let mut certs = Vec::new();
    for root in roots {
        let dir = root.join(registry);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "crt"))
            .collect();
        files.sort();
        for file in files {
            certs.extend(read_pem_file(registry, &file)?);
        }
    }
    Ok(certs)
}

fn read_pem_file(registry: &str, file: &Path) -> Result<Vec<Certificate>, RegistryError> {
    let err = |detail: String| RegistryError::TlsConfig {
        host: registry.to_string(),
        path: file.display().to_string(),
        detail,
    };
    let text = std::fs::read_to_string(file).map_err(|e| err(e.to_string()))?;
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else {
            return Err(err("a certificate has no END line".to_string()));
        };
        let block = &rest[start..start + len + END.len()];
        reqwest::Certificate::from_pem(block.as_bytes()).map_err(|e| err(e.to_string()))?;
        out.push(Certificate {
            encoding: CertificateEncoding::Pem,
            data: format!("{block}\n").into_bytes(),
        });
        rest = &rest[start + len + END.len()..];
    }
    if out.is_empty() {
        return Err(err("no PEM certificate in it".to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_insecure_hosts() {
        for r in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
        ] {
            assert!(is_loopback(r), "{r}");
        }
        for r in [
            "docker.io",
            "10.0.0.1:5000",
            "[::2]:5000",
            "localhost.example",
        ] {
            assert!(!is_loopback(r), "{r}");
        }
        let insecure = vec!["reg.lan:5000".to_string(), "other.lan".to_string()];
        assert!(is_insecure("reg.lan:5000", &insecure));
        assert!(!is_insecure("reg.lan:5001", &insecure));
        assert!(is_insecure("other.lan:443", &insecure));
        assert!(!is_insecure("docker.io", &insecure));
    }

    #[test]
    fn broken_certificate_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("reg:5000")).unwrap();
        std::fs::write(dir.path().join("reg:5000/ca.crt"), "garbage").unwrap();
        let err = load_certs("reg:5000", &[dir.path().to_path_buf()]).unwrap_err();
        assert!(err.to_string().contains("ca.crt"), "{err}");
        assert!(
            load_certs("other:5000", &[dir.path().to_path_buf()])
                .unwrap()
                .is_empty()
        );
    }
}
