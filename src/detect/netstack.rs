//! Whether `--network private` can run here: slirp4netns on PATH (and its version), and a
//! /dev/net/tun this user may open. pasta (from passt) is reported too, but not used (see
//! docs/adr/0009-private-network-and-allow-list.md). `--allow-host` needs neither.

use std::path::Path;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::sandbox::net;

/// A user-mode network stack found on PATH.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tool {
    pub path: String,
    /// The first line of `--version`, e.g. `slirp4netns version 1.2.0`.
    pub version: Option<String>,
}

/// The `network` key of `shmocker detect --format json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NetworkStack {
    /// Whether `--network private` without `--allow-host` can run.
    pub private: bool,
    pub slirp4netns: Option<Tool>,
    /// Found but unused by this version.
    pub pasta: Option<Tool>,
    pub dev_net_tun: TunState,
    /// What to do when `private` is false.
    pub fix: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TunState {
    pub ok: bool,
    pub detail: String,
}

fn tool(name: &str) -> Option<Tool> {
    let path = std::env::var_os("PATH")?;
    let found = std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())?;
    Some(Tool {
        version: version(&found),
        path: found.display().to_string(),
    })
}

fn version(program: &Path) -> Option<String> {
    let out = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
}

/// Looks for the stacks and tries /dev/net/tun. Runs no namespace code.
pub fn probe() -> NetworkStack {
    let slirp4netns = net::find_slirp4netns().map(|p| Tool {
        version: version(&p),
        path: p.display().to_string(),
    });
    let tun = net::tun_usable();
    let dev_net_tun = TunState {
        ok: tun.is_ok(),
        detail: match &tun {
            Ok(()) => "/dev/net/tun can be opened".into(),
            Err(e) => e.clone(),
        },
    };
    let fix = match (&slirp4netns, &tun) {
        (None, _) => Some(net::SLIRP_INSTALL.to_string()),
        (Some(_), Err(e)) => Some(e.clone()),
        _ => None,
    };
    NetworkStack {
        private: fix.is_none(),
        slirp4netns,
        pasta: tool("pasta"),
        dev_net_tun,
        fix,
    }
}

/// The lines `shmocker detect` prints about it.
pub fn describe(n: &NetworkStack) -> String {
    let mut out = String::from("network: ");
    match &n.slirp4netns {
        Some(t) => out.push_str(&format!(
            "slirp4netns at {} ({})",
            t.path,
            t.version.as_deref().unwrap_or("version unknown")
        )),
        None => out.push_str("slirp4netns not found"),
    }
    out.push_str(&format!("; {}", n.dev_net_tun.detail));
    if let Some(p) = &n.pasta {
        out.push_str(&format!("; pasta at {} (not used)", p.path));
    }
    out.push_str(if n.private {
        "\n  --network private: available (also --allow-host, which needs neither)\n"
    } else {
        "\n  --network private: unavailable (--network private --allow-host still works)\n"
    });
    if let Some(fix) = &n.fix {
        out.push_str(&format!("  fix: {fix}\n"));
    }
    out
}
