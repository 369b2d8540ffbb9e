//! The network of a `RUN --network=none|private` step: a namespace of its own with loopback
//! up, and for `private` either slirp4netns (a user-mode TCP/IP stack that gives the namespace
//! outbound access through the helper's, i.e. the runner's, network) or, with `--allow-host`, the
//! filtering proxy and resolver of [`super::egress`] on the namespace's loopback.

use std::fs::{self, File};
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::libc;
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socket,
};

use super::{Network, ProcessSpec, SandboxError};

/// Brings `lo` up in the current network namespace (a new one starts with it down).
pub fn loopback_up() -> Result<(), SandboxError> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| SandboxError::sys("socket for configuring lo", e))?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value for it.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the flags of the interface named in `req` into `req`; the fd
    // is a valid socket and `req` outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(SandboxError::sys(
            "reading the flags of lo",
            nix::errno::Errno::last(),
        ));
    }
    // SAFETY: after SIOCGIFFLAGS the union holds ifru_flags.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(SandboxError::sys(
            "bringing lo up",
            nix::errno::Errno::last(),
        ));
    }
    Ok(())
}

/// The address of the host's loopback as a `--network=private` step sees it (slirp4netns's
/// gateway; the filtering proxy maps it the same way).
pub const HOST_ADDR: &str = "10.0.2.2";
/// slirp4netns's DNS forwarder.
pub const SLIRP_DNS: &str = "10.0.2.3";
/// Pid 1's error when the helper did not bring the network up (the helper's says why).
pub const NOT_SET_UP: &str = "the step's private network could not be set up";
/// The port of the filtering proxy on the step's loopback (`--allow-host`).
pub const PROXY_PORT: u16 = 3128;

/// How to install slirp4netns, for error messages and `shmocker detect`.
pub const SLIRP_INSTALL: &str = "install slirp4netns (Debian/Ubuntu: `apt-get install slirp4netns`; Fedora/RHEL: `dnf install slirp4netns`; Alpine: `apk add slirp4netns`)";

/// slirp4netns on PATH, if any.
pub fn find_slirp4netns() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("slirp4netns"))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Whether this process may open /dev/net/tun, which slirp4netns needs for its tap device;
/// the reason and fix when not.
pub fn tun_usable() -> Result<(), String> {
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(
            "/dev/net/tun does not exist (a container without the tun device): load the tun module, or give the container the device (docker run --device /dev/net/tun)".into(),
        ),
        Err(e) => Err(format!(
            "/dev/net/tun cannot be opened ({e}): let users open it (as root: `chmod 0666 /dev/net/tun`, the usual mode)"
        )),
    }
}

/// Everything `--network private` needs from the machine (slirp4netns, /dev/net/tun), with the
/// fix when something is missing. Not needed with `--allow-host`, which uses no tap device.
pub fn private_stack_ready() -> Result<PathBuf, String> {
    let Some(slirp) = find_slirp4netns() else {
        return Err(format!(
            "--network private needs slirp4netns, which is not on PATH: {SLIRP_INSTALL}"
        ));
    };
    tun_usable()
        .map_err(|e| format!("--network private needs /dev/net/tun for slirp4netns: {e}"))?;
    Ok(slirp)
}

/// The private network's two ends, made before pid 1 is forked: pid 1 keeps [`Link::init`], the
/// helper [`Link::helper`].
pub struct Link {
    pub init: UnixStream,
    pub helper: HelperEnd,
}

/// The helper's side of the private network: slirp4netns waiting for pid 1's pid, or the
/// filtering proxy's process waiting for pid 1's sockets. Dropping it stops either.
pub struct HelperEnd {
    link: Option<UnixStream>,
    slirp: Option<Launcher>,
    egress: Option<nix::unistd::Pid>,
}

impl Link {
    /// Call while single-threaded, before `unshare(CLONE_NEWPID)`: both are forked here so that
    /// they are no processes of the step's pid namespace (the step could see them, and they
    /// would hold up its teardown), and the proxy may start threads, which the kernel refuses
    /// to a process whose children go to another pid namespace.
    pub fn new(process: &ProcessSpec, scratch: &Path) -> Result<Link, SandboxError> {
        if process.allow_hosts.is_empty() {
            // The launcher first: the socketpair made after it is never in its hands (it closes
            // what it does not need anyway), so pid 1's end has one holder and its exit is seen.
            let slirp = Launcher::fork(scratch)?;
            let (init, helper) = UnixStream::pair()
                .map_err(|e| SandboxError::io("socketpair for the network", e))?;
            return Ok(Link {
                init,
                helper: HelperEnd {
                    link: Some(helper),
                    slirp: Some(slirp),
                    egress: None,
                },
            });
        }
        let (init, helper) =
            UnixStream::pair().map_err(|e| SandboxError::io("socketpair for the network", e))?;
        let list = process.allow_hosts.clone();
        // SAFETY: the helper is single-threaded (a fresh exec that never starts threads), so
        // the child may allocate and use the standard library freely.
        match unsafe { nix::unistd::fork() }.map_err(|e| SandboxError::sys("fork", e))? {
            nix::unistd::ForkResult::Child => {
                // Only stderr (the step's output, for refusals) and its end of the link: no
                // store or rootfs descriptor of the helper's, and not pid 1's end.
                close_other_fds(&[helper.as_raw_fd()]);
                std::mem::forget(init); // closed just above
                let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
                let code = match egress_process(helper, list) {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("shmocker: the --allow-host proxy failed: {e}");
                        1
                    }
                };
                std::process::exit(code);
            }
            nix::unistd::ForkResult::Parent { child } => Ok(Link {
                init,
                helper: HelperEnd {
                    link: None,
                    slirp: None,
                    egress: Some(child),
                },
            }),
        }
    }
}

/// Closes every descriptor of this process from 3 up except those in `keep`: for a child just
/// forked from the helper, which must hold nothing it does not use. A socket end held by a
/// child that waits (the slirp4netns launcher waits for a pid) would keep its peer from ever
/// seeing EOF: the helper would wait forever for a pid 1 that had already failed.
fn close_other_fds(keep: &[RawFd]) {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|fd| u32::try_from(*fd).ok())
        .filter(|fd| *fd > 2)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from = 3u32;
    let mut ranges = Vec::new();
    for fd in keep {
        if fd > from {
            ranges.push((from, fd - 1));
        }
        from = fd + 1;
    }
    ranges.push((from, u32::MAX));
    for (first, last) in ranges {
        // SAFETY: close_range(2) only closes descriptors; none in this range is used again
        // (the callers own nothing there but what `keep` names).
        let done = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) } == 0;
        if !done {
            // Before Linux 5.9: close what /proc/self/fd lists in the range.
            let open: Vec<u32> = fs::read_dir("/proc/self/fd")
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| e.file_name().to_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            for fd in open.into_iter().filter(|fd| (first..=last).contains(fd)) {
                // SAFETY: as above; EBADF (the directory's own descriptor, already closed) is
                // harmless.
                unsafe { libc::close(fd as RawFd) };
            }
        }
    }
}

/// Takes from the proxy's process everything it does not need once it holds its sockets: it
/// parses what the step sends, so a flaw in it must not hand the step the build's user
/// namespace. All capabilities go (bounding, ambient, inheritable, effective, permitted: it
/// only accepts, connects and resolves, none of which needs one), `no_new_privs` is set, it
/// becomes undumpable (no ptrace, no /proc/PID/mem by a process of the same user) and it gets
/// the steps' seccomp filter ([`super::harden::install_seccomp`]: no namespaces, mounts,
/// keyrings, BPF...). Named `shmocker-egress` for `ps`.
fn lock_down_proxy() -> Result<(), SandboxError> {
    use caps::CapSet;
    let _ = nix::sys::prctl::set_name(c"shmocker-egress");
    for cap in caps::all() {
        // A capability the kernel does not know is in no set; nothing to drop.
        if let Err(e) = caps::drop(None, CapSet::Bounding, cap)
            && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false)
        {
            return Err(SandboxError::Setup(format!(
                "dropping {cap} from the proxy's bounding set: {e}"
            )));
        }
    }
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(|e| {
            SandboxError::Setup(format!("clearing the proxy's {set:?} capabilities: {e}"))
        })?;
    }
    nix::sys::prctl::set_no_new_privs()
        .map_err(|e| SandboxError::sys("setting no_new_privs for the proxy", e))?;
    nix::sys::prctl::set_dumpable(false)
        .map_err(|e| SandboxError::sys("making the proxy undumpable", e))?;
    super::harden::install_seccomp()
}

/// The filtering proxy's process: takes pid 1's sockets, locks itself down, serves them on
/// threads, lets pid 1 go on, and exits when pid 1 closes its end (or the helper kills it).
fn egress_process(
    link: UnixStream,
    list: Vec<super::egress::AllowHost>,
) -> Result<(), SandboxError> {
    let (byte, fds) = receive(&link)?;
    if byte.is_none() {
        return Ok(()); // pid 1 failed before its sockets were made, and says why
    }
    let Ok([proxy, dns]) = <[OwnedFd; 2]>::try_from(fds) else {
        return Err(SandboxError::Setup(format!(
            "pid 1 sent no sockets for the proxy ({byte:?})"
        )));
    };
    // Before the first thread: threads inherit the filter and the capability sets.
    lock_down_proxy()?;
    super::egress::serve(
        std::net::TcpListener::from(proxy),
        std::net::UdpSocket::from(dns),
        list,
    )
    .map_err(|e| SandboxError::io("starting the proxy's threads", e))?;
    (&link)
        .write_all(b"G")
        .map_err(|e| SandboxError::io("letting pid 1 go on", e))?;
    let mut rest = [0u8; 1];
    let _ = (&link).read(&mut rest);
    Ok(())
}

/// One byte from pid 1, and the descriptors that came with it.
fn receive(link: &UnixStream) -> Result<(Option<u8>, Vec<OwnedFd>), SandboxError> {
    let mut byte = [0u8; 1];
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let mut iov = [IoSliceMut::new(&mut byte)];
    let msg = recvmsg::<()>(
        link.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| SandboxError::sys("waiting for the step's network namespace", e))?;
    let mut raw = Vec::new();
    let cmsgs = msg
        .cmsgs()
        .map_err(|e| SandboxError::sys("reading the sockets pid 1 sent", e))?;
    for c in cmsgs {
        if let ControlMessageOwned::ScmRights(received) = c {
            raw.extend(received);
        }
    }
    let n = msg.bytes;
    // SAFETY: each fd was just received with SCM_RIGHTS and belongs to no one else.
    let fds = raw
        .into_iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    Ok(((n == 1).then_some(byte[0]), fds))
}

/// The step's copy of `process` for a private network: the resolver and, with an allow-list,
/// the proxy variables. `None` for the other networks. The image's config never sees these.
pub fn private_process(
    process: &ProcessSpec,
    scratch: &Path,
) -> Result<Option<ProcessSpec>, SandboxError> {
    if process.network != Network::Private {
        return Ok(None);
    }
    let mut p = process.clone();
    let resolver = if p.allow_hosts.is_empty() {
        SLIRP_DNS
    } else {
        "127.0.0.1"
    };
    let resolv = scratch.join("resolv.conf");
    fs::write(&resolv, format!("nameserver {resolver}\n"))
        .map_err(|e| SandboxError::io(&resolv, e))?;
    p.resolv_conf = resolv;
    if !p.allow_hosts.is_empty() {
        let proxy = format!("http://127.0.0.1:{PROXY_PORT}");
        let set = [
            ("HTTP_PROXY", proxy.as_str()),
            ("HTTPS_PROXY", proxy.as_str()),
            ("http_proxy", proxy.as_str()),
            ("https_proxy", proxy.as_str()),
            ("NO_PROXY", "localhost,127.0.0.1,::1"),
            ("no_proxy", "localhost,127.0.0.1,::1"),
        ];
        p.env
            .retain(|e| !set.iter().any(|(k, _)| e.split('=').next() == Some(*k)));
        p.env.extend(set.iter().map(|(k, v)| format!("{k}={v}")));
    }
    Ok(Some(p))
}

/// Pid 1's part, right after it has its own network namespace: hands the helper what it needs
/// (a byte for slirp4netns, or the proxy's and resolver's sockets bound on this namespace's
/// loopback for `--allow-host`) and waits until the helper says the network is up. Pid 1 keeps
/// the returned end until it exits: the proxy's process stops when it closes.
pub fn init_side(process: &ProcessSpec, link: UnixStream) -> Result<UnixStream, SandboxError> {
    loopback_up()?;
    if process.allow_hosts.is_empty() {
        (&link).write_all(b"N").map_err(|e| {
            SandboxError::io("telling the helper the network namespace is ready", e)
        })?;
    } else {
        let proxy = std::net::TcpListener::bind(("127.0.0.1", PROXY_PORT)).map_err(|e| {
            SandboxError::io(format!("binding the proxy on 127.0.0.1:{PROXY_PORT}"), e)
        })?;
        let dns = std::net::UdpSocket::bind(("127.0.0.1", 53))
            .map_err(|e| SandboxError::io("binding the resolver on 127.0.0.1:53", e))?;
        let fds = [proxy.as_raw_fd(), dns.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(
            link.as_raw_fd(),
            &[IoSlice::new(b"E")],
            &cmsg,
            MsgFlags::empty(),
            None,
        )
        .map_err(|e| SandboxError::sys("passing the proxy's sockets to the helper", e))?;
    }
    let mut go = [0u8; 1];
    match (&link).read(&mut go) {
        Ok(1) => Ok(link),
        _ => Err(SandboxError::Setup(NOT_SET_UP.into())),
    }
}

/// How long slirp4netns may take to configure the step's tap device before the step fails.
const SLIRP_READY_TIMEOUT_MS: i32 = 60_000;

/// slirp4netns, forked before the step's pid namespace exists so that it is no process of
/// the step's (the step could otherwise see it, and it would hold the namespace's teardown).
/// It waits for pid 1's pid, then execs slirp4netns on that pid's network namespace; dropped
/// without a pid, it exits.
pub struct Launcher {
    pid: nix::unistd::Pid,
    target: Option<OwnedFd>,
    ready: Option<OwnedFd>,
    exit: Option<OwnedFd>,
    log: PathBuf,
}

impl Launcher {
    /// Forks the launcher; call while single-threaded, before `unshare(CLONE_NEWPID)`.
    pub fn fork(scratch: &Path) -> Result<Launcher, SandboxError> {
        let slirp = private_stack_ready().map_err(SandboxError::Setup)?;
        let log = scratch.join("slirp4netns.log");
        let cloexec = |fd: &OwnedFd| {
            nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .map_err(|e| SandboxError::sys("fcntl(FD_CLOEXEC)", e))
        };
        // slirp4netns keeps the write end of `ready` and the read end of `exit` across exec.
        let (target_r, target_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| SandboxError::sys("pipe", e))?;
        let (ready_r, ready_w) = nix::unistd::pipe().map_err(|e| SandboxError::sys("pipe", e))?;
        let (exit_r, exit_w) = nix::unistd::pipe().map_err(|e| SandboxError::sys("pipe", e))?;
        cloexec(&ready_r)?;
        cloexec(&exit_w)?;
        let out = File::create(&log).map_err(|e| SandboxError::io(&log, e))?;
        let args: Vec<std::ffi::CString> = [
            slirp.display().to_string(),
            "--configure".into(),
            "--mtu=65520".into(),
            "--enable-sandbox".into(),
            "--enable-seccomp".into(),
            format!("--ready-fd={}", ready_w.as_raw_fd()),
            format!("--exit-fd={}", exit_r.as_raw_fd()),
        ]
        .into_iter()
        .map(|a| std::ffi::CString::new(a).map_err(|_| SandboxError::Setup("NUL in a path".into())))
        .collect::<Result<_, _>>()?;
        // SAFETY: the helper is single-threaded (a fresh exec that never starts threads before
        // this point), so the child may allocate and use the standard library freely.
        match unsafe { nix::unistd::fork() }.map_err(|e| SandboxError::sys("fork", e))? {
            nix::unistd::ForkResult::Child => {
                close_other_fds(&[
                    target_r.as_raw_fd(),
                    ready_w.as_raw_fd(),
                    exit_r.as_raw_fd(),
                    out.as_raw_fd(),
                ]);
                // Closed just above.
                std::mem::forget((ready_r, exit_w, target_w));
                let mut text = String::new();
                let _ = File::from(target_r).read_to_string(&mut text);
                if text.is_empty() {
                    std::process::exit(0);
                }
                // SAFETY: dup2 onto stdout and stderr, both open; `out` is a valid open file.
                unsafe {
                    libc::dup2(out.as_raw_fd(), 1);
                    libc::dup2(out.as_raw_fd(), 2);
                }
                let mut argv = args;
                for a in [text, "tap0".to_string()] {
                    if let Ok(c) = std::ffi::CString::new(a) {
                        argv.push(c);
                    }
                }
                let err = nix::unistd::execv(&argv[0], &argv).unwrap_err();
                eprintln!("cannot run {}: {err}", slirp.display());
                std::process::exit(127);
            }
            nix::unistd::ForkResult::Parent { child } => Ok(Launcher {
                pid: child,
                target: Some(target_w),
                ready: Some(ready_r),
                exit: Some(exit_w),
                log,
            }),
        }
    }

    /// Starts slirp4netns on the network namespace of `target` and waits until it has set up
    /// `tap0` (10.0.2.100/24, gateway and runner's loopback 10.0.2.2, DNS 10.0.2.3).
    fn start(&mut self, target: nix::unistd::Pid) -> Result<(), SandboxError> {
        if let Some(w) = self.target.take() {
            File::from(w)
                .write_all(target.as_raw().to_string().as_bytes())
                .map_err(|e| SandboxError::io("starting slirp4netns", e))?;
        }
        let mut ready = String::new();
        let mut late = false;
        if let Some(r) = self.ready.take() {
            // slirp4netns writes "1" when ready, or exits (closing the pipe) when it fails; one
            // that does neither must not hold the step forever.
            let mut pfd = libc::pollfd {
                fd: r.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let waited = loop {
                // SAFETY: one valid pollfd, alive for the call.
                let n = unsafe { libc::poll(&mut pfd, 1, SLIRP_READY_TIMEOUT_MS) };
                if n >= 0 || nix::errno::Errno::last() != nix::errno::Errno::EINTR {
                    break n;
                }
            };
            if waited == 0 {
                late = true;
                let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
            } else {
                let _ = File::from(r).read_to_string(&mut ready);
            }
        }
        if ready.starts_with('1') {
            return Ok(());
        }
        self.stop();
        let said = fs::read_to_string(&self.log).unwrap_or_default();
        let when = if late {
            format!(" within {} s", SLIRP_READY_TIMEOUT_MS / 1000)
        } else {
            String::new()
        };
        Err(SandboxError::Setup(format!(
            "slirp4netns did not set up the step's network{when}: {}",
            said.trim()
        )))
    }

    fn stop(&mut self) {
        // Closing the exit fd is slirp4netns's signal to quit (an unused launcher quits when
        // the target pipe closes); wait so that nothing is left behind.
        self.target.take();
        self.ready.take();
        if self.exit.take().is_some() {
            let _ = nix::sys::wait::waitpid(self.pid, None);
        }
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        self.stop();
    }
}

impl HelperEnd {
    /// With pid 1 forked as `pid`: starts slirp4netns on pid 1's network namespace and lets
    /// pid 1 go on (the proxy's process does its part by itself).
    pub fn start(mut self, pid: nix::unistd::Pid) -> Result<HelperEnd, SandboxError> {
        if let (Some(link), Some(slirp)) = (&self.link, &mut self.slirp) {
            match receive(link)? {
                (Some(b'N'), _) => slirp.start(pid)?,
                _ => {
                    return Err(SandboxError::Setup(
                        "pid 1 could not make the step's network namespace".into(),
                    ));
                }
            }
            (&*link)
                .write_all(b"G")
                .map_err(|e| SandboxError::io("letting pid 1 go on", e))?;
        }
        Ok(self)
    }
}

impl HelperEnd {
    /// In pid 1: closes this end's descriptors and nothing else (what they serve is the
    /// helper's to stop, and pid numbers mean other processes in pid 1's namespace).
    pub fn close_in_child(mut self) {
        self.egress = None;
        if let Some(slirp) = &mut self.slirp {
            slirp.exit.take();
        }
    }
}

impl Drop for HelperEnd {
    fn drop(&mut self) {
        self.link.take();
        self.slirp.take();
        if let Some(pid) = self.egress.take() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slirp4netns launcher waits (for pid 1's pid) while holding descriptors; if it held a
    /// socket end it does not use, that socket's peer would never see EOF: the helper's wait for
    /// a pid 1 that failed early hung forever that way.
    #[test]
    fn the_launcher_holds_nothing_but_its_pipes() {
        let scratch = tempfile::tempdir().unwrap();
        let (mine, theirs) = UnixStream::pair().unwrap();
        let launcher = Launcher::fork(scratch.path()).unwrap_or_else(|e| {
            panic!(
                "this test needs slirp4netns and a usable /dev/net/tun (tests/env/setup.sh): {e}"
            )
        });
        drop(theirs);
        mine.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let got = (&mine).read(&mut [0u8; 1]);
        // The child closes in a few calls, so the set may still shrink for a moment.
        let mut fds = Vec::new();
        for _ in 0..1000 {
            fds = fs::read_dir(format!("/proc/{}/fd", launcher.pid))
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>();
            if fds.len() <= 7 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // A launcher holding its target pipe's write end too would never exit by itself.
        let _ = nix::sys::signal::kill(launcher.pid, nix::sys::signal::Signal::SIGKILL);
        drop(launcher);
        assert!(
            matches!(got, Ok(0)),
            "the launcher kept the other end of a socketpair open: {got:?}"
        );
        assert_eq!(fds.len(), 7, "stdio and its four descriptors: {fds:?}");
    }
}
