//! Tells systemd how the agent is doing (sd_notify(3)): ready once the probes are attached and the
//! sinks are open, reloading, stopping, watchdog keep-alives and a one-line status. Without
//! `$NOTIFY_SOCKET` (not started by systemd with Type=notify) every call does nothing.
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the unix socket named by
//! `$NOTIFY_SOCKET`: a path, or an abstract socket when it starts with `@`. systemd learns the
//! sender from the socket credentials, so any thread of the main process may send.
//!
//! Why not the `sd-notify` crate: its 0.5.0 (the latest) has every message we send (READY,
//! RELOADING with MONOTONIC_USEC, STOPPING, WATCHDOG, STATUS), but it connects to
//! `$NOTIFY_SOCKET` as a file path, so an `@abstract` socket (which sd_notify(3) names and
//! containers use) fails with ENOENT; it sends to an empty `$NOTIFY_SOCKET` (EINVAL) instead of
//! doing nothing, cannot tell the caller whether anything was sent, and its `watchdog_enabled`
//! turns `WATCHDOG_USEC=0` into a zero interval, on which the agent's watchdog timer would panic.
//! What is left here is one `sendto` and the parsing of two variables.

use std::{
    ffi::{OsStr, OsString},
    os::unix::{
        ffi::OsStrExt,
        net::{SocketAddr, UnixDatagram},
    },
    path::PathBuf,
    time::Duration,
};

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(
        "NOTIFY_SOCKET={0:?}: not a unix socket path or @abstract name (vsock is not supported)"
    )]
    Address(OsString),
    #[error("notifying systemd through NOTIFY_SOCKET={socket:?}: {source}")]
    Send {
        socket: OsString,
        source: std::io::Error,
    },
}

/// `READY=1`: startup is finished (probes attached, sinks open), or a reload is done.
pub fn ready() -> Result<bool, NotifyError> {
    notify("READY=1")
}

/// `RELOADING=1` with the `MONOTONIC_USEC` systemd 253+ requires for Type=notify-reload (older
/// systemd ignores it). Send [`ready`] when the reload is finished, whatever its outcome.
pub fn reloading() -> Result<bool, NotifyError> {
    notify(&reloading_message(monotonic_usec()))
}

/// `STOPPING=1`: shutdown has begun (draining what the kernel captured, flushing the sinks).
pub fn stopping() -> Result<bool, NotifyError> {
    notify("STOPPING=1")
}

/// `WATCHDOG=1`: the agent's main loop is alive. Send it at least every
/// [`watchdog_interval`] / 2.
pub fn watchdog() -> Result<bool, NotifyError> {
    notify("WATCHDOG=1")
}

/// `STATUS=...`: one line for `systemctl status` (line breaks become spaces).
pub fn status(text: &str) -> Result<bool, NotifyError> {
    notify(&status_message(text))
}

/// The watchdog interval systemd expects keep-alives within (`WatchdogSec=`), when the
/// watchdog is on for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_interval_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// Sends `message` to `$NOTIFY_SOCKET`; `Ok(false)` when it is not set.
pub fn notify(message: &str) -> Result<bool, NotifyError> {
    notify_to(std::env::var_os("NOTIFY_SOCKET").as_deref(), message)
}

fn notify_to(socket: Option<&OsStr>, message: &str) -> Result<bool, NotifyError> {
    let Some(socket) = socket.filter(|s| !s.is_empty()) else {
        return Ok(false);
    };
    let addr = address(socket).ok_or_else(|| NotifyError::Address(socket.to_owned()))?;
    let send_err = |source| NotifyError::Send {
        socket: socket.to_owned(),
        source,
    };
    let sock = UnixDatagram::unbound().map_err(send_err)?;
    sock.send_to_addr(message.as_bytes(), &addr)
        .map_err(send_err)?;
    Ok(true)
}

fn address(socket: &OsStr) -> Option<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    let bytes = socket.as_bytes();
    match bytes.first()? {
        b'@' => SocketAddr::from_abstract_name(&bytes[1..]).ok(),
        b'/' => SocketAddr::from_pathname(PathBuf::from(socket)).ok(),
        _ => None,
    }
}

fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, my_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != my_pid {
            return None;
        }
    }
    let usec = usec?.trim().parse::<u64>().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec))
}

fn reloading_message(monotonic_usec: u64) -> String {
    format!("RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")
}

fn status_message(text: &str) -> String {
    let line: String = text
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    format!("STATUS={line}")
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares MONOTONIC_USEC against.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a datagram");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn unset_or_empty_socket_is_a_no_op() {
        assert!(!notify_to(None, "READY=1").unwrap());
        assert!(!notify_to(Some(OsStr::new("")), "READY=1").unwrap());
    }

    #[test]
    fn sends_to_a_socket_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        assert!(notify_to(Some(path.as_os_str()), "READY=1").unwrap());
        assert_eq!(recv(&server), "READY=1");
        let msg = status_message("attached 3 probes\nsinks open");
        assert!(notify_to(Some(path.as_os_str()), &msg).unwrap());
        assert_eq!(recv(&server), "STATUS=attached 3 probes sinks open");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("sparbar-notify-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let env = format!("@{name}");
        assert!(notify_to(Some(OsStr::new(&env)), "WATCHDOG=1").unwrap());
        assert_eq!(recv(&server), "WATCHDOG=1");
        assert!(notify_to(Some(OsStr::new(&env)), "STOPPING=1").unwrap());
        assert_eq!(recv(&server), "STOPPING=1");
    }

    #[test]
    fn reloading_carries_the_monotonic_clock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let before = monotonic_usec();
        notify_to(Some(path.as_os_str()), &reloading_message(monotonic_usec())).unwrap();
        let got = recv(&server);
        let (first, second) = got.split_once('\n').expect("two lines");
        assert_eq!(first, "RELOADING=1");
        let usec: u64 = second
            .strip_prefix("MONOTONIC_USEC=")
            .expect("MONOTONIC_USEC")
            .parse()
            .unwrap();
        assert!(usec >= before && before > 0, "{usec} < {before}");
    }

    #[test]
    fn a_missing_socket_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nobody-listens");
        let e = notify_to(Some(path.as_os_str()), "READY=1").unwrap_err();
        assert!(e.to_string().contains("nobody-listens"), "{e}");
        let e = notify_to(Some(OsStr::new("vsock:2:1234")), "READY=1").unwrap_err();
        assert!(matches!(e, NotifyError::Address(_)), "{e}");
    }

    #[test]
    fn watchdog_interval_is_for_this_process_only() {
        let d = watchdog_interval_from(Some("30000000"), None, 7);
        assert_eq!(d, Some(Duration::from_secs(30)));
        assert_eq!(
            watchdog_interval_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval_from(None, Some("7"), 7), None);
    }
}
