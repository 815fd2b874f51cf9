//! The registry actor: every open connection, for the connection limits and the admin endpoints.
//!
//! Sessions report here when they open, authenticate, change rooms and close. The registry never
//! touches sockets: to close one it sends the session a [`Disconnect`], through the
//! `Recipient<Disconnect>` the session handed in with [`Connect`].

use std::collections::HashMap;
use std::net::IpAddr;

use actix::prelude::*;
use serde::Serialize;
use uuid::Uuid;

use crate::auth::Identity;

/// Sent to a session: close the connection (admin disconnects and shutdown).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Disconnect {
    /// Close code.
    pub code: u16,
    /// Close reason.
    pub reason: String,
}

/// A new connection, before authentication. Refused when `max_connections` are open.
#[derive(Message)]
#[rtype(result = "Result<(), LimitReached>")]
pub struct Connect {
    /// The connection's id.
    pub id: Uuid,
    /// Where to send a [`Disconnect`].
    pub session: Recipient<Disconnect>,
    /// Peer address, for the admin listing.
    pub remote: Option<String>,
    /// The peer's IP, for `max_connections_per_ip`.
    pub ip: Option<IpAddr>,
    /// Whether it came without a token in the URL (it counts against
    /// `max_unauthenticated_connections` until it authenticates).
    pub anonymous: bool,
    /// `auto` or `json`.
    pub format: &'static str,
    /// Whether the connection asked for `ack=1`.
    pub ack: bool,
}

/// The connection authenticated. Refused when the user already has `max_connections_per_user`.
#[derive(Message)]
#[rtype(result = "Result<(), LimitReached>")]
pub struct Identify {
    /// The connection's id.
    pub id: Uuid,
    /// Who it is.
    pub identity: Identity,
}

/// The connection's rooms changed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RoomsChanged {
    /// The connection's id.
    pub id: Uuid,
    /// Its rooms now.
    pub rooms: Vec<String>,
}

/// The connection closed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnected {
    /// The connection's id.
    pub id: Uuid,
}

/// List every connection (admin).
#[derive(Message)]
#[rtype(result = "Vec<ConnectionInfo>")]
pub struct ListConnections;

/// Close one connection (admin); answers whether it existed.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct CloseConnection {
    /// The connection to close.
    pub id: Uuid,
    /// Close code.
    pub code: u16,
    /// Close reason.
    pub reason: String,
}

/// Close every connection of a user (admin); answers how many.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CloseUser {
    /// The user.
    pub user_id: String,
    /// Only that user of this tenant (`None`: of every tenant).
    pub tenant: Option<String>,
    /// Close code.
    pub code: u16,
    /// Close reason.
    pub reason: String,
}

/// Close every connection (shutdown); answers how many.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CloseAll {
    /// Close code.
    pub code: u16,
    /// Close reason.
    pub reason: String,
}

/// How many connections are open.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Count;

/// A limit that refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitReached {
    /// `max_connections`.
    Node,
    /// `max_unauthenticated_connections`.
    Unauthenticated,
    /// `max_connections_per_ip`.
    Address,
    /// `max_connections_per_user`.
    User,
}

/// One connection as the admin listing shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionInfo {
    pub connection_id: Uuid,
    pub user_id: Option<String>,
    pub tenant: Option<String>,
    pub connected_at: String,
    pub remote_addr: Option<String>,
    pub format: &'static str,
    pub ack: bool,
    pub rooms: Vec<String>,
}

struct Entry {
    info: ConnectionInfo,
    session: Recipient<Disconnect>,
    /// Counted in `per_ip` under this address.
    ip: Option<IpAddr>,
    /// Counted in `unauthenticated`.
    anonymous: bool,
}

/// The address a connection counts under for `max_per_ip`: an IPv4 address itself, an IPv6 one by
/// its /64 (one host's share of addresses).
fn counted_as(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// The connection limits the registry enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections.
    pub max_connections: usize,
    /// Authenticated connections of one user of one tenant.
    pub max_per_user: usize,
    /// Connections opened without a token that have not authenticated yet.
    pub max_unauthenticated: usize,
    /// Connections from one address.
    pub max_per_ip: usize,
    /// Addresses `max_per_ip` does not apply to (loopback, a reverse proxy in front).
    pub trusted: Vec<IpAddr>,
}

/// The registry actor.
pub struct Registry {
    /// Open connections by id.
    conns: HashMap<Uuid, Entry>,
    /// Authenticated connections per user, keyed by (tenant, user id): `bob` of two tenants are two users.
    per_user: HashMap<(String, String), usize>,
    /// Open connections per address (trusted ones are not counted).
    per_ip: HashMap<IpAddr, usize>,
    /// Anonymous connections not authenticated yet.
    unauthenticated: usize,
    limits: Limits,
}

impl Registry {
    /// An empty registry enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Registry { conns: HashMap::new(), per_user: HashMap::new(), per_ip: HashMap::new(), unauthenticated: 0, limits }
    }

    /// Uncounts an anonymous connection (it authenticated, or closed).
    fn authenticated_or_gone(&mut self, anonymous: &mut bool) {
        if std::mem::take(anonymous) {
            self.unauthenticated = self.unauthenticated.saturating_sub(1);
        }
    }

    fn close_where(&mut self, code: u16, reason: &str, pred: impl Fn(&ConnectionInfo) -> bool) -> usize {
        let mut n = 0;
        for e in self.conns.values().filter(|e| pred(&e.info)) {
            e.session.do_send(Disconnect { code, reason: reason.to_string() });
            n += 1;
        }
        n
    }
}

impl Actor for Registry {
    type Context = Context<Self>;
}

impl Handler<Connect> for Registry {
    type Result = Result<(), LimitReached>;
    fn handle(&mut self, msg: Connect, _: &mut Context<Self>) -> Self::Result {
        if self.conns.len() >= self.limits.max_connections {
            return Err(LimitReached::Node);
        }
        if msg.anonymous && self.unauthenticated >= self.limits.max_unauthenticated {
            return Err(LimitReached::Unauthenticated);
        }
        let ip = msg.ip.map(|ip| ip.to_canonical()).filter(|ip| !self.limits.trusted.contains(ip)).map(counted_as);
        if let Some(ip) = ip {
            if self.per_ip.get(&ip).copied().unwrap_or(0) >= self.limits.max_per_ip {
                return Err(LimitReached::Address);
            }
            *self.per_ip.entry(ip).or_insert(0) += 1;
        }
        if msg.anonymous {
            self.unauthenticated += 1;
        }
        let info = ConnectionInfo {
            connection_id: msg.id,
            user_id: None,
            tenant: None,
            connected_at: crate::protocol::now_rfc3339(),
            remote_addr: msg.remote,
            format: msg.format,
            ack: msg.ack,
            rooms: Vec::new(),
        };
        self.conns.insert(msg.id, Entry { info, session: msg.session, ip, anonymous: msg.anonymous });
        Ok(())
    }
}

impl Handler<Identify> for Registry {
    type Result = Result<(), LimitReached>;
    fn handle(&mut self, msg: Identify, _: &mut Context<Self>) -> Self::Result {
        let Some(entry) = self.conns.get_mut(&msg.id) else {
            return Ok(());
        };
        let key = (msg.identity.tenant.clone(), msg.identity.user_id.clone());
        let count = self.per_user.entry(key).or_insert(0);
        if *count >= self.limits.max_per_user {
            return Err(LimitReached::User);
        }
        *count += 1;
        if std::mem::take(&mut entry.anonymous) {
            self.unauthenticated = self.unauthenticated.saturating_sub(1);
        }
        entry.info.user_id = Some(msg.identity.user_id);
        entry.info.tenant = Some(msg.identity.tenant);
        Ok(())
    }
}

impl Handler<RoomsChanged> for Registry {
    type Result = ();
    fn handle(&mut self, msg: RoomsChanged, _: &mut Context<Self>) {
        if let Some(e) = self.conns.get_mut(&msg.id) {
            e.info.rooms = msg.rooms;
        }
    }
}

impl Handler<Disconnected> for Registry {
    type Result = ();
    fn handle(&mut self, msg: Disconnected, _: &mut Context<Self>) {
        let Some(mut e) = self.conns.remove(&msg.id) else {
            return;
        };
        self.authenticated_or_gone(&mut e.anonymous);
        if let Some(ip) = e.ip {
            if let Some(n) = self.per_ip.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_ip.remove(&ip);
                }
            }
        }
        if let (Some(user), Some(tenant)) = (e.info.user_id, e.info.tenant) {
            let key = (tenant, user);
            if let Some(n) = self.per_user.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_user.remove(&key);
                }
            }
        }
    }
}

impl Handler<ListConnections> for Registry {
    type Result = Vec<ConnectionInfo>;
    fn handle(&mut self, _: ListConnections, _: &mut Context<Self>) -> Self::Result {
        let mut list: Vec<_> = self.conns.values().map(|e| e.info.clone()).collect();
        list.sort_by(|a, b| a.connected_at.cmp(&b.connected_at));
        list
    }
}

impl Handler<CloseConnection> for Registry {
    type Result = bool;
    fn handle(&mut self, msg: CloseConnection, _: &mut Context<Self>) -> bool {
        self.close_where(msg.code, &msg.reason, |i| i.connection_id == msg.id) > 0
    }
}

impl Handler<CloseUser> for Registry {
    type Result = usize;
    fn handle(&mut self, msg: CloseUser, _: &mut Context<Self>) -> usize {
        self.close_where(msg.code, &msg.reason, |i| {
            i.user_id.as_deref() == Some(msg.user_id.as_str())
                && msg.tenant.as_ref().is_none_or(|t| i.tenant.as_ref() == Some(t))
        })
    }
}

impl Handler<CloseAll> for Registry {
    type Result = usize;
    fn handle(&mut self, msg: CloseAll, _: &mut Context<Self>) -> usize {
        self.close_where(msg.code, &msg.reason, |_| true)
    }
}

impl Handler<Count> for Registry {
    type Result = usize;
    fn handle(&mut self, _: Count, _: &mut Context<Self>) -> usize {
        self.conns.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(counted_as(a), counted_as(b));
        assert_ne!(counted_as(a), counted_as(c));
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(mapped.to_canonical(), "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(counted_as("10.0.0.1".parse().unwrap()), "10.0.0.1".parse::<IpAddr>().unwrap());
    }
}
