//! systemd's notify protocol (`sd_notify`): READY, STATUS and watchdog pings on the datagram
//! socket named by `NOTIFY_SOCKET`. Outside systemd every call is a silent no-op, and a
//! failed notification is never fatal.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

fn send(msg: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.send_to_addr(msg.as_bytes(), &addr))
    } else {
        sock.send_to(msg.as_bytes(), std::path::Path::new(&path))
    };
    match sent {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!(error = %e, "cannot notify systemd");
            false
        }
    }
}

/// The service is up: config validated, state loaded, sockets bound.
pub fn ready(status: &str) -> bool {
    send(&format!("READY=1\nSTATUS={}", one_line(status)))
}

/// What the service is doing, for `systemctl status`.
pub fn status(status: &str) -> bool {
    send(&format!("STATUS={}", one_line(status)))
}

pub fn stopping() -> bool {
    send("STOPPING=1")
}

pub fn watchdog() -> bool {
    send("WATCHDOG=1")
}

/// How often to ping the watchdog (half of `WATCHDOG_USEC`), if it is enabled for us.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_reach_the_socket_and_absence_is_silent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        // Tests share the environment: set and read in one test only.
        std::env::set_var("NOTIFY_SOCKET", &path);
        assert!(ready("up\nand running"));
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up and running");
        std::env::set_var("WATCHDOG_USEC", "10000000");
        std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
        assert_eq!(watchdog_interval(), Some(Duration::from_secs(5)));
        std::env::remove_var("NOTIFY_SOCKET");
        std::env::remove_var("WATCHDOG_USEC");
        std::env::remove_var("WATCHDOG_PID");
        assert!(!watchdog(), "no socket: skipped, not an error");
        assert_eq!(watchdog_interval(), None);
    }
}
