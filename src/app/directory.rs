//! The client directory of one shard: the live sessions of each client id
//! whose home is this shard, oldest first, at most `auth.sessions_per_client`
//! of them (the oldest is replaced past that).
//!
//! One session (the default) is stored inline; only clients allowed several
//! sessions pay for a vector.

use std::collections::HashMap;
use std::sync::Arc;

use crate::runtime::table::ConnId;

/// A client's live sessions, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sessions {
    One(ConnId),
    Many(Vec<ConnId>),
}

impl Sessions {
    fn as_slice(&self) -> &[ConnId] {
        match self {
            Sessions::One(c) => std::slice::from_ref(c),
            Sessions::Many(v) => v,
        }
    }
}

/// Client id → its live sessions.
#[derive(Debug, Default)]
pub struct Directory {
    map: HashMap<Arc<str>, Sessions>,
}

impl Directory {
    /// An empty directory with room for `capacity` clients.
    pub fn with_capacity(capacity: usize) -> Self {
        Directory { map: HashMap::with_capacity(capacity) }
    }

    /// Registers `conn` for `client_id`; returns the sessions it replaces
    /// (the oldest ones past `max`), to be closed with 4000.
    pub fn register(&mut self, client_id: Arc<str>, conn: ConnId, max: usize) -> Vec<ConnId> {
        let max = max.max(1);
        let entry = self.map.entry(client_id).or_insert(Sessions::Many(Vec::new()));
        if entry.as_slice().contains(&conn) {
            return Vec::new();
        }
        let mut all = match std::mem::replace(entry, Sessions::Many(Vec::new())) {
            Sessions::One(c) => vec![c],
            Sessions::Many(v) => v,
        };
        all.push(conn);
        let replaced: Vec<ConnId> = all.drain(..all.len().saturating_sub(max)).collect();
        *entry = if all.len() == 1 { Sessions::One(all[0]) } else { Sessions::Many(all) };
        replaced
    }

    /// Forgets `conn` (a stale unregistration, of a replaced session, is ignored).
    pub fn unregister(&mut self, client_id: &str, conn: ConnId) {
        let Some(entry) = self.map.get_mut(client_id) else { return };
        let rest: Vec<ConnId> = entry.as_slice().iter().copied().filter(|c| *c != conn).collect();
        match rest.len() {
            0 => drop(self.map.remove(client_id)),
            1 => *entry = Sessions::One(rest[0]),
            _ => *entry = Sessions::Many(rest),
        }
    }

    /// `client_id`'s live sessions (empty if none).
    pub fn sessions(&self, client_id: &str) -> Vec<ConnId> {
        self.map.get(client_id).map(|s| s.as_slice().to_vec()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(n: usize) -> ConnId {
        ConnId::new(0, n, 1)
    }

    #[test]
    fn one_session_replaces_the_previous() {
        let mut d = Directory::default();
        assert!(d.register("a".into(), c(1), 1).is_empty());
        assert_eq!(d.register("a".into(), c(2), 1), vec![c(1)]);
        d.unregister("a", c(1));
        assert_eq!(d.sessions("a"), vec![c(2)], "a stale unregistration is ignored");
        d.unregister("a", c(2));
        assert!(d.sessions("a").is_empty());
    }

    #[test]
    fn several_sessions_keep_the_newest_and_replace_the_oldest() {
        let mut d = Directory::default();
        for n in 1..=3 {
            assert!(d.register("tabs".into(), c(n), 3).is_empty());
        }
        assert_eq!(d.register("tabs".into(), c(4), 3), vec![c(1)]);
        assert_eq!(d.sessions("tabs"), vec![c(2), c(3), c(4)]);
        assert!(d.register("tabs".into(), c(4), 3).is_empty(), "registering twice changes nothing");
        d.unregister("tabs", c(3));
        assert_eq!(d.sessions("tabs"), vec![c(2), c(4)]);
    }
}
