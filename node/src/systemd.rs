//! systemd's notify protocol (`sd_notify(3)`), implemented here: one datagram of
//! newline-separated `KEY=VALUE` lines to the Unix socket named by `$NOTIFY_SOCKET`
//! (a path, or an abstract socket when it starts with `@`). Without `$NOTIFY_SOCKET`
//! (not run by systemd, or not `Type=notify`) every call is a no-op.
//!
//! What chatd sends: `STATUS=` as it goes, `EXTEND_TIMEOUT_USEC=` while start-up is still
//! running, `READY=1` once `/readyz` would answer 200, `WATCHDOG=1` at half of
//! `$WATCHDOG_USEC`, and `STOPPING=1` when a drain starts.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// The shortest watchdog ping interval, whatever `$WATCHDOG_USEC` says (no busy loop).
pub const WATCHDOG_INTERVAL_MIN: Duration = Duration::from_millis(10);

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` is neither an absolute path nor `@abstract`.
    #[error("NOTIFY_SOCKET {0:?} is not an absolute path or an @abstract socket name")]
    BadAddress(String),
    /// The datagram could not be sent.
    #[error("cannot send to the notify socket {target}: {cause}")]
    Send {
        /// The socket.
        target: String,
        /// The OS error.
        cause: std::io::Error,
    },
}

/// Where notifications go.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    /// A socket file.
    Path(PathBuf),
    /// A socket in the abstract namespace (the name without the leading `@`).
    Abstract(Vec<u8>),
}

impl Target {
    fn parse(value: &OsStr) -> Result<Self, NotifyError> {
        let bytes = value.as_bytes();
        match bytes.first() {
            Some(b'/') => Ok(Target::Path(PathBuf::from(value))),
            Some(b'@') if bytes.len() > 1 => Ok(Target::Abstract(bytes[1..].to_vec())),
            _ => Err(NotifyError::BadAddress(
                value.to_string_lossy().into_owned(),
            )),
        }
    }

    fn describe(&self) -> String {
        match self {
            Target::Path(p) => p.display().to_string(),
            Target::Abstract(name) => format!("@{}", String::from_utf8_lossy(name)),
        }
    }
}

/// A handle on the service manager; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Notifier {
    target: Option<Target>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// A notifier that does nothing.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// From this process's environment: `$NOTIFY_SOCKET`, `$WATCHDOG_USEC`,
    /// `$WATCHDOG_PID`. An unusable `$NOTIFY_SOCKET` is logged and ignored.
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        let (notifier, error) = Self::from_vars(
            socket.as_deref(),
            usec.as_deref(),
            pid.as_deref(),
            std::process::id(),
        );
        if let Some(e) = error {
            tracing::warn!(error = %e, "systemd notifications disabled");
        }
        notifier
    }

    /// From the values of `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID` for the
    /// process `pid` (a pure function: tests never touch the process environment). The
    /// watchdog is on only with a notify socket, a positive `WATCHDOG_USEC`, and a
    /// `WATCHDOG_PID` that is `pid` or unset. Also answers why the socket is unusable.
    pub fn from_vars(
        notify_socket: Option<&OsStr>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        pid: u32,
    ) -> (Self, Option<NotifyError>) {
        let (target, error) = match notify_socket.filter(|s| !s.is_empty()).map(Target::parse) {
            None => (None, None),
            Some(Ok(t)) => (Some(t), None),
            Some(Err(e)) => (None, Some(e)),
        };
        let pid_matches = match watchdog_pid {
            None => true,
            Some(p) => p.trim().parse::<u32>().ok() == Some(pid),
        };
        let watchdog = watchdog_usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|u| *u > 0 && pid_matches && target.is_some())
            .map(|u| Duration::from_micros(u / 2).max(WATCHDOG_INTERVAL_MIN));
        (Self { target, watchdog }, error)
    }

    /// A notifier that sends to `socket` (a path, or `@name` for an abstract socket).
    pub fn to_socket(socket: &str) -> Result<Self, NotifyError> {
        Ok(Self {
            target: Some(Target::parse(OsStr::new(socket))?),
            watchdog: None,
        })
    }

    /// True when notifications go somewhere.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often to send `WATCHDOG=1` (half of `$WATCHDOG_USEC`), if the watchdog is on.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `state` (newline-separated `KEY=VALUE` lines) as one datagram. A no-op
    /// without a socket. Never blocks: a full socket buffer is an error.
    pub fn notify(&self, state: &str) -> Result<(), NotifyError> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let send_error = |cause| NotifyError::Send {
            target: target.describe(),
            cause,
        };
        let socket = UnixDatagram::unbound().map_err(send_error)?;
        socket.set_nonblocking(true).map_err(send_error)?;
        let sent = match target {
            Target::Path(p) => socket.send_to(state.as_bytes(), p),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr =
                    std::os::unix::net::SocketAddr::from_abstract_name(name).map_err(send_error)?;
                socket.send_to_addr(state.as_bytes(), &addr)
            }
        }
        .map_err(send_error)?;
        if sent != state.len() {
            return Err(send_error(std::io::Error::other(format!(
                "sent {sent} of {} bytes",
                state.len()
            ))));
        }
        Ok(())
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) -> Result<(), NotifyError> {
        self.notify(&format!("READY=1\nSTATUS={}", one_line(status)))
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) -> Result<(), NotifyError> {
        self.notify(&format!("STOPPING=1\nSTATUS={}", one_line(status)))
    }

    /// A status line (shown by `systemctl status`).
    pub fn status(&self, status: &str) -> Result<(), NotifyError> {
        self.notify(&format!("STATUS={}", one_line(status)))
    }

    /// `WATCHDOG=1`: the process is alive.
    pub fn watchdog(&self) -> Result<(), NotifyError> {
        self.notify("WATCHDOG=1")
    }

    /// `EXTEND_TIMEOUT_USEC=`: the current start or stop may take `by` longer from now.
    pub fn extend_timeout(&self, by: Duration) -> Result<(), NotifyError> {
        self.notify(&format!("EXTEND_TIMEOUT_USEC={}", by.as_micros()))
    }
}

/// A status value on one line (a newline would start a new `KEY=VALUE` assignment).
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn recv(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn notifications_reach_a_socket_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let (n, error) = Notifier::from_vars(Some(path.as_os_str()), None, None, 1);
        assert!(error.is_none());
        assert!(n.enabled());
        n.ready("ready: serving\nclients").unwrap();
        assert_eq!(recv(&server), "READY=1\nSTATUS=ready: serving clients");
        n.status("recovering").unwrap();
        assert_eq!(recv(&server), "STATUS=recovering");
        n.extend_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(recv(&server), "EXTEND_TIMEOUT_USEC=30000000");
        n.watchdog().unwrap();
        assert_eq!(recv(&server), "WATCHDOG=1");
        n.stopping("draining").unwrap();
        assert_eq!(recv(&server), "STOPPING=1\nSTATUS=draining");
    }

    #[test]
    fn notifications_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "chatd-test-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        );
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::to_socket(&format!("@{name}")).unwrap();
        n.notify("READY=1").unwrap();
        assert_eq!(recv(&server), "READY=1");
    }

    #[test]
    fn without_a_socket_everything_is_a_no_op() {
        let (n, error) = Notifier::from_vars(None, Some("1000000"), None, 1);
        assert!(error.is_none());
        assert!(!n.enabled());
        assert_eq!(n.watchdog_interval(), None);
        n.ready("ready").unwrap();
        n.watchdog().unwrap();
        let (n, _) = Notifier::from_vars(Some(OsStr::new("")), None, None, 1);
        assert!(!n.enabled());
    }

    #[test]
    fn an_unusable_address_is_reported_and_disables() {
        for bad in ["relative/notify.sock", "@", "vsock:2:1234"] {
            let (n, error) = Notifier::from_vars(Some(OsStr::new(bad)), None, None, 1);
            assert!(!n.enabled(), "{bad}");
            assert!(
                matches!(error, Some(NotifyError::BadAddress(ref a)) if a == bad),
                "{bad}: {error:?}"
            );
        }
        assert!(Notifier::to_socket("x").is_err());
    }

    #[test]
    fn a_missing_socket_is_a_send_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let n = Notifier::to_socket(dir.path().join("absent.sock").to_str().unwrap()).unwrap();
        assert!(matches!(n.ready("x"), Err(NotifyError::Send { .. })));
    }

    #[test]
    fn the_watchdog_pings_at_half_the_interval_for_its_own_pid_only() {
        let sock = Some(OsStr::new("/run/systemd/notify"));
        let interval = |usec, pid| {
            Notifier::from_vars(sock, usec, pid, 42)
                .0
                .watchdog_interval()
        };
        assert_eq!(
            interval(Some("20000000"), None),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            interval(Some("20000000"), Some("42")),
            Some(Duration::from_secs(10))
        );
        assert_eq!(interval(Some("20000000"), Some("43")), None);
        assert_eq!(interval(Some("20000000"), Some("x")), None);
        assert_eq!(interval(Some("0"), None), None);
        assert_eq!(interval(Some("soon"), None), None);
        assert_eq!(interval(None, Some("42")), None);
        // Tiny intervals are raised to the minimum, not turned into a busy loop.
        assert_eq!(interval(Some("1"), None), Some(WATCHDOG_INTERVAL_MIN));
        assert_eq!(interval(Some("20000"), None), Some(WATCHDOG_INTERVAL_MIN));
        assert_eq!(
            interval(Some("40000"), None),
            Some(Duration::from_millis(20))
        );
        // No socket, no watchdog.
        let (n, _) = Notifier::from_vars(None, Some("20000000"), None, 42);
        assert_eq!(n.watchdog_interval(), None);
    }
}
