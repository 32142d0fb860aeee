//! Connection limits: at most MAX_CONNECTIONS open at once (fewer when the process may open fewer
//! files), at most MAX_CONNECTIONS_PER_IP from one address. A newcomer over a limit takes the
//! place of the oldest connection that has not authenticated a request (from its own address
//! when that address is over its limit), so clients that hold connections open without a key
//! cannot keep `/health` or a signed upload out; authenticated connections are never evicted.
//! Only when every connection in the way has authenticated is the newcomer closed at once.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

/// File descriptors kept for what is not a client connection (package and journal files, the
/// Docker socket, the event outbox) when the connection limit follows the descriptor limit.
const RESERVED_FDS: u64 = 64;

/// The local address a connection came in on (a request extension).
#[derive(Debug, Clone, Copy)]
pub struct Local(pub SocketAddr);

/// Whether a connection has carried an authenticated request (a request extension).
#[derive(Debug, Clone, Default)]
pub struct Mark(Arc<AtomicBool>);

impl Mark {
    /// The connection carried an authenticated request: it is no longer evicted.
    pub fn authenticated(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn is_authenticated(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

struct Entry {
    ip: IpAddr,
    mark: Mark,
    evict: Arc<Notify>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    /// By id, which grows with age: the first entries are the oldest.
    open: BTreeMap<u64, Entry>,
    per_ip: HashMap<IpAddr, usize>,
}

impl Table {
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.open.remove(&id)?;
        if let Some(n) = self.per_ip.get_mut(&entry.ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&entry.ip);
            }
        }
        Some(entry)
    }

    /// Evicts the oldest unauthenticated connection (from `ip` only, if given).
    fn evict_oldest(&mut self, ip: Option<IpAddr>) -> bool {
        let victim = self
            .open
            .iter()
            .find(|(_, e)| ip.is_none_or(|ip| e.ip == ip) && !e.mark.is_authenticated())
            .map(|(id, _)| *id);
        match victim.and_then(|id| self.remove(id)) {
            Some(entry) => {
                entry.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// The open connections and their limits.
pub struct Connections {
    table: Mutex<Table>,
    max_total: usize,
    max_per_ip: usize,
}

/// An admitted connection: its mark, and the signal that it was evicted. Dropping it frees its
/// place.
pub struct Admitted {
    id: u64,
    connections: Arc<Connections>,
    /// Its authentication mark (put on each of its requests).
    pub mark: Mark,
    /// Notified when a newcomer took its place: the connection is to be closed.
    pub evicted: Arc<Notify>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.connections.lock().remove(self.id);
    }
}

impl Connections {
    /// Limits of `max_total` (lowered to what the descriptor limit allows) and `max_per_ip`.
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        let by_fds = open_files_limit()
            .map(|n| n.saturating_sub(RESERVED_FDS).max(8) as usize)
            .unwrap_or(usize::MAX);
        Arc::new(Self {
            table: Mutex::new(Table::default()),
            max_total: max_total.min(by_fds).max(1),
            max_per_ip: max_per_ip.max(1),
        })
    }

    /// The limit on open connections in force.
    pub fn max_total(&self) -> usize {
        self.max_total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a connection from `ip`, evicting the oldest unauthenticated one in the way; `None`
    /// when there is none to evict (the newcomer is to be closed).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Admitted> {
        let ip = peer(ip);
        let mut table = self.lock();
        if table.per_ip.get(&ip).copied().unwrap_or(0) >= self.max_per_ip
            && !table.evict_oldest(Some(ip))
        {
            return None;
        }
        if table.open.len() >= self.max_total && !table.evict_oldest(None) {
            return None;
        }
        let id = table.next_id;
        table.next_id += 1;
        let mark = Mark::default();
        let evict = Arc::new(Notify::new());
        table.open.insert(
            id,
            Entry {
                ip,
                mark: mark.clone(),
                evict: Arc::clone(&evict),
            },
        );
        *table.per_ip.entry(ip).or_default() += 1;
        Some(Admitted {
            id,
            connections: Arc::clone(self),
            mark,
            evicted: evict,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock().open.len()
    }
}

/// Whose connection it is, for the per-address limit: an IPv4 address (also written as an
/// IPv4-mapped IPv6 one), or an IPv6 address's /64, the smallest block a host is usually given,
/// so that a host cannot step around the limit by using more of its own addresses.
fn peer(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// The soft limit on open files of this process (Linux: `/proc/self/limits`).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn a_newcomer_over_the_limit_evicts_the_oldest_unauthenticated() {
        let c = Arc::new(Connections {
            table: Mutex::new(Table::default()),
            max_total: 3,
            max_per_ip: 2,
        });
        let a = c.admit(ip("10.0.0.1")).expect("a");
        let b = c.admit(ip("10.0.0.1")).expect("b");
        a.mark.authenticated();
        // Over the per-address limit: b (a is authenticated) goes.
        let c1 = c.admit(ip("10.0.0.1")).expect("c1");
        assert_eq!(c.open(), 2);
        let third = c.admit(ip("10.0.0.2")).expect("third");
        assert_eq!(c.open(), 3);
        // Over the total: the oldest unauthenticated is c1.
        let fourth = c.admit(ip("10.0.0.3")).expect("fourth");
        assert_eq!(c.open(), 3);
        c1.mark.authenticated();
        third.mark.authenticated();
        fourth.mark.authenticated();
        assert!(c.admit(ip("10.0.0.4")).is_none(), "all authenticated");
        drop((a, b, c1, third, fourth));
        assert_eq!(c.open(), 0);
    }

    #[test]
    fn an_ipv6_host_is_limited_by_its_64_block() {
        let c = Arc::new(Connections {
            table: Mutex::new(Table::default()),
            max_total: 10,
            max_per_ip: 2,
        });
        let a = c.admit(ip("2001:db8:1:2::1")).expect("a");
        let b = c.admit(ip("2001:db8:1:2::ffff:7")).expect("b");
        a.mark.authenticated();
        b.mark.authenticated();
        assert!(
            c.admit(ip("2001:db8:1:2:aaaa::9")).is_none(),
            "a third address of the same /64 is over the limit"
        );
        let other = c.admit(ip("2001:db8:1:3::1")).expect("another /64");
        let v4 = c.admit(ip("::ffff:10.0.0.1")).expect("mapped IPv4");
        let same_v4 = c.admit(ip("10.0.0.1")).expect("the same IPv4 address");
        v4.mark.authenticated();
        same_v4.mark.authenticated();
        assert!(c.admit(ip("10.0.0.1")).is_none(), "counted as one address");
        assert!(
            c.admit(ip("10.0.0.2")).is_some(),
            "IPv4 addresses are their own"
        );
        drop((a, b, other, v4, same_v4));
    }

    #[test]
    fn reads_the_descriptor_limit() {
        assert!(open_files_limit().is_some_and(|n| n > 0));
    }
}
