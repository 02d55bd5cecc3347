//! Room membership inside one shard.
//!
//! Each shard keeps its own index, room name → local members; no other
//! thread reads it. A publish delivers to local members directly and sends
//! one pre-framed copy to every other shard's mailbox, which delivers to its
//! own members (see docs/design.md for why every shard, not only the ones
//! with members).

use std::collections::HashMap;
use std::rc::Rc;

use crate::runtime::table::ConnId;

/// Room name → members on this shard.
#[derive(Default)]
pub struct Rooms {
    rooms: HashMap<Rc<str>, Vec<ConnId>>,
}

impl Rooms {
    /// Adds `conn` to `room`; returns the shared name (to keep in the
    /// connection's own list) and whether the room was empty on this shard.
    pub fn join(&mut self, room: &str, conn: ConnId) -> (Rc<str>, bool) {
        if let Some((name, _)) = self.rooms.get_key_value(room) {
            let name = name.clone();
            let members = self.rooms.get_mut(room).expect("present");
            // The connection's own room list is the real guard; this keeps
            // the index right even if a caller forgets.
            if !members.contains(&conn) {
                members.push(conn);
            }
            return (name, false);
        }
        let name: Rc<str> = Rc::from(room);
        self.rooms.insert(name.clone(), vec![conn]);
        (name, true)
    }

    /// Removes `conn` from `room`; true when the room became empty here.
    pub fn leave(&mut self, room: &str, conn: ConnId) -> bool {
        let Some(members) = self.rooms.get_mut(room) else { return false };
        if let Some(i) = members.iter().position(|c| *c == conn) {
            members.swap_remove(i);
        }
        if members.is_empty() {
            self.rooms.remove(room);
            return true;
        }
        false
    }

    /// Local members of `room`.
    pub fn members(&self, room: &str) -> &[ConnId] {
        self.rooms.get(room).map(Vec::as_slice).unwrap_or(&[])
    }

    /// True when no room has a local member.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_leave_members() {
        let mut r = Rooms::default();
        let a = ConnId::new(0, 1, 1);
        let b = ConnId::new(0, 2, 2);
        assert!(r.join("x", a).1);
        assert!(!r.join("x", b).1);
        assert!(!r.join("x", b).1, "joining twice keeps one entry");
        assert_eq!(r.members("x").len(), 2);
        assert!(!r.leave("x", a));
        assert!(r.leave("x", b));
        assert!(r.members("x").is_empty());
        assert!(r.is_empty());
        assert!(!r.leave("nope", a));
    }
}
