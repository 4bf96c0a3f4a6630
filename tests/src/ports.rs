//! Free TCP ports that stay free for the lifetime of a test.
//!
//! Asking the kernel for port 0 gives a free port *now*, but a private
//! RabbitMQ node binds its ports seconds later, and after a `kill -9` it binds
//! the same ports again. Two things can steal a port in between:
//!
//! - another test process (nextest runs each test in its own process) that
//!   picked the same number: every port handed out here is reserved with an
//!   `flock` on a file under `/tmp/warren-testkit-ports/`, which other test
//!   processes respect and which the kernel releases when the holder dies, so a
//!   crashed test never leaks a reservation;
//! - an outgoing connection, whose local port comes from the kernel's
//!   ephemeral range: ports are picked *below* that range
//!   (`/proc/sys/net/ipv4/ip_local_port_range`), where the kernel never
//!   autobinds.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, bail};
use rand::Rng;

/// Lowest port handed out: below this live well-known services and the
/// system broker (5672, 15672, 25672 are also excluded explicitly).
const LOWEST_PORT: u16 = 10_000;

/// Ports that belong to the system RabbitMQ and epmd; never handed out even
/// if they happen to be free at the moment.
const FORBIDDEN: &[u16] = &[4369, 5671, 5672, 15672, 25672, 35672];

/// A port reserved for this process until the value is dropped.
///
/// Holding it keeps other `warren-testkit` processes from choosing the same
/// port; it does not bind the port, so the broker (or the test) can.
#[derive(Debug)]
pub struct PortReservation {
    /// The reserved port.
    port: u16,
    /// Path of the lock file, removed on release so the lock dir stays small.
    path: PathBuf,
    /// Open lock file; the `flock` on it is the cross-process reservation.
    _lock: File,
}

impl PortReservation {
    /// The reserved port number.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PortReservation {
    fn drop(&mut self) {
        // Unlink while still holding the lock (the fd closes after this):
        // whoever opened the old file meanwhile sees an unlinked inode in
        // `same_file` and skips it, and the next opener creates a new file.
        let _ = std::fs::remove_file(&self.path);
        issued()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.port);
    }
}

/// Ports reserved by this process. The `flock` alone would already exclude
/// them (Linux locks belong to open file descriptions, not processes); the
/// set spares reopening lock files and is the source of truth for this process.
fn issued() -> &'static Mutex<HashSet<u16>> {
    static ISSUED: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    ISSUED.get_or_init(|| Mutex::new(HashSet::new()))
}

/// Whether `path` still names the file open as `file`.
fn same_file(file: &File, path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn lock_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join("warren-testkit-ports");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The range ports are drawn from: `[LOWEST_PORT, start of the ephemeral range)`.
fn candidate_range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|p| p.parse::<u16>().ok())
        })
        .unwrap_or(32_768);
    if ephemeral_low > LOWEST_PORT + 1_000 {
        (LOWEST_PORT, ephemeral_low)
    } else {
        // An unusual kernel setting: fall back to the range above the
        // ephemeral ports' usual end.
        (61_000, 65_000)
    }
}

/// Reserve one free port on 127.0.0.1 (see the module doc for why this is
/// safer than binding port 0).
pub fn reserve_port() -> anyhow::Result<PortReservation> {
    let dir = lock_dir()?;
    let (low, high) = candidate_range();
    let mut rng = rand::rng();
    for _ in 0..500 {
        let port = rng.random_range(low..high);
        if FORBIDDEN.contains(&port) {
            continue;
        }
        {
            let mut issued = issued().lock().unwrap_or_else(|e| e.into_inner());
            if issued.contains(&port) {
                continue;
            }
            let path = dir.join(port.to_string());
            let Ok(file) = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
            else {
                continue;
            };
            // SAFETY: flock on a file descriptor we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc != 0 {
                continue; // another test process holds this port
            }
            // A holder that released the port unlinked the file before
            // unlocking it; a lock on such an orphaned inode reserves nothing.
            if !same_file(&file, &path) {
                continue;
            }
            // The lock is ours; the port must also be bindable right now
            // (something outside the testkit may be using it).
            if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err()
                || TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_err()
            {
                let _ = std::fs::remove_file(&path); // still locked: safe to unlink
                continue;
            }
            issued.insert(port);
            return Ok(PortReservation {
                port,
                path,
                _lock: file,
            });
        }
    }
    bail!("no free port found in {low}..{high} after 500 attempts")
}

/// A free TCP port on 127.0.0.1 for a test's own listener (a sidecar's HTTP
/// port, a fake webhook server).
///
/// The port stays reserved against other `warren-testkit` users for the rest
/// of the process, so it can be bound, closed and bound again without another
/// test taking it in between.
///
/// # Panics
/// When no free port can be found, which means the machine is out of ports.
pub fn free_port() -> u16 {
    static KEPT: Mutex<Vec<PortReservation>> = Mutex::new(Vec::new());
    let reservation = reserve_port().expect("reserving a free port");
    let port = reservation.port();
    KEPT.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(reservation);
    port
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_distinct_and_bindable() {
        let a = reserve_port().unwrap();
        let b = reserve_port().unwrap();
        assert_ne!(a.port(), b.port());
        let (_, high) = candidate_range();
        assert!(a.port() < high);
        TcpListener::bind((Ipv4Addr::LOCALHOST, a.port())).unwrap();
    }

    #[test]
    fn a_reserved_port_is_locked_for_other_descriptions() {
        let a = reserve_port().unwrap();
        let path = lock_dir().unwrap().join(a.port().to_string());
        let other = OpenOptions::new().write(true).open(path).unwrap();
        // SAFETY: as above.
        let rc = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_ne!(
            rc, 0,
            "a second open file description must not get the lock"
        );
    }
}
