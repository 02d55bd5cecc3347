//! The `/ws` JSON protocol's handlers: join, leave, publish, direct, echo
//! and ping, on top of the shard's room index and directory.

use std::sync::Arc;

use super::protocol::{self, ClientError, Request};
use super::{AppMsg, Edge};
use crate::runtime::table::ConnId;
use crate::runtime::Conns;
use crate::transport::frame;

impl Edge {
    /// One JSON message on `/ws`.
    pub(super) fn rooms_message<C: Conns<Self>>(&self, cx: &C, id: ConnId, text: &str) {
        let cfg = &cx.node().config.rooms;
        let req = match protocol::parse(text, cfg.max_payload_bytes) {
            Ok(r) => r,
            Err(e) => return self.send_error(cx, id, e),
        };
        let Some(Some(from)) = cx.state(id, |s| s.client_id.clone()) else { return };
        match req {
            Request::Join(room) => self.join(cx, id, &room),
            Request::Leave(room) => self.leave(cx, id, &room),
            Request::Publish { room, data } => {
                self.publish(cx, id, &room, &protocol::room_message(&room, &from, data));
            }
            Request::Direct { to, data } => {
                let frame = frame::text(&protocol::direct_message(&from, data));
                let to: Arc<str> = Arc::from(&*to);
                let home = self.shared.home_shard(&to, cx.node().shards.len());
                if cx.send_to(home, AppMsg::DirectRoute { to, frame, reply_to: Some(id) }).is_err() {
                    self.send_error(cx, id, ClientError::Overloaded);
                }
            }
            Request::Echo(data) => {
                cx.send_text(id, &protocol::echo(data));
            }
            Request::Ping(x) => {
                cx.send_text(id, &protocol::pong(x));
            }
            Request::Refresh(token) => self.refresh(cx, id, &from, &token),
        }
    }

    /// `{"type":"refresh","token":T}`: a new token for the same client
    /// extends the connection's life and replaces its grants.
    fn refresh<C: Conns<Self>>(&self, cx: &C, id: ConnId, me: &str, token: &str) {
        let Some(verifier) = &self.shared.verifier else { return self.send_error(cx, id, ClientError::UnknownType) };
        let (now, gap) = (cx.now_ms(), cx.node().config.auth.min_refresh_interval_ms);
        let too_soon = cx.state(id, |s| match s.grants.as_mut() {
            Some(g) if g.refresh_ms != 0 && now < g.refresh_ms + gap => true,
            Some(g) => {
                g.refresh_ms = now.max(1);
                false
            }
            None => false,
        });
        if too_soon == Some(true) {
            return self.send_error(cx, id, ClientError::RateLimited);
        }
        let claims = match verifier.verify(token, super::unix_now()) {
            Ok(c) => c,
            Err(_) => return self.send_error(cx, id, ClientError::InvalidToken),
        };
        if &*claims.sub != me {
            return self.send_error(cx, id, ClientError::Forbidden);
        }
        // One expiry entry per connection: the old one goes (a refresh flood
        // cannot grow the set).
        let mut grants = super::Grants::of(&claims);
        grants.refresh_ms = now.max(1);
        let old = cx.state(id, |s| s.grants.replace(grants)).flatten();
        let mut ex = self.expiries.borrow_mut();
        if let Some(g) = old {
            ex.remove(&(g.exp, id));
        }
        ex.insert((claims.exp, id));
        drop(ex);
        self.shared.metrics[self.shard].tokens_refreshed.inc();
        cx.send_text(id, &protocol::refreshed(claims.exp));
        // Rooms the new token no longer allows are left (the client is told).
        let joined = cx.state(id, |s| s.rooms.clone()).unwrap_or_default();
        for room in joined.iter().filter(|r| !claims.rooms.allows(r)) {
            self.leave(cx, id, room);
        }
    }

    /// True if the connection's grants allow `room` (`publish` picks which list).
    fn allowed<C: Conns<Self>>(&self, cx: &C, id: ConnId, room: &str, publish: bool) -> bool {
        cx.state(id, |s| match &s.grants {
            None => true,
            Some(g) if publish => g.publish.allows(room),
            Some(g) => g.rooms.allows(room),
        })
        .unwrap_or(false)
    }

    fn join<C: Conns<Self>>(&self, cx: &C, id: ConnId, room: &str) {
        if !self.allowed(cx, id, room, false) {
            return self.send_error(cx, id, ClientError::Forbidden);
        }
        let max = cx.node().config.rooms.max_rooms_per_connection;
        let Some((already, full)) = cx.state(id, |s| (s.rooms.iter().any(|r| &**r == room), s.rooms.len() >= max))
        else {
            return;
        };
        if !already {
            if full {
                return self.send_error(cx, id, ClientError::TooManyRooms);
            }
            let (name, first) = self.rooms.borrow_mut().join(room, id);
            cx.state(id, |s| s.rooms.push(name));
            if first {
                self.broker().room_interest(self.shard, room, true);
            }
        }
        cx.send_text(id, &protocol::room_ack("joined", room));
    }

    fn leave<C: Conns<Self>>(&self, cx: &C, id: ConnId, room: &str) {
        let was_member = cx.state(id, |s| match s.rooms.iter().position(|r| &**r == room) {
            Some(i) => {
                s.rooms.swap_remove(i);
                true
            }
            None => false,
        });
        let Some(was_member) = was_member else { return };
        if was_member && self.rooms.borrow_mut().leave(room, id) {
            self.broker().room_interest(self.shard, room, false);
        }
        cx.send_text(id, &protocol::room_ack("left", room));
    }

    /// Sends one shared frame to every other shard first (so they start
    /// writing while this one does), then delivers to local members, then
    /// hands the payload to the broker for other nodes.
    fn publish<C: Conns<Self>>(&self, cx: &C, id: ConnId, room: &str, payload: &str) {
        if !self.allowed(cx, id, room, true) {
            return self.send_error(cx, id, ClientError::Forbidden);
        }
        if cx.node().config.rooms.publish_requires_join {
            let member = cx.state(id, |s| s.rooms.iter().any(|r| &**r == room)).unwrap_or(false);
            if !member {
                return self.send_error(cx, id, ClientError::NotJoined);
            }
        }
        let frame = frame::text(payload);
        let room_arc: Arc<str> = Arc::from(room);
        let mut lost = false;
        for to in (0..cx.node().shards.len()).filter(|s| *s != self.shard) {
            let msg = AppMsg::Room { room: room_arc.clone(), frame: frame.clone(), origin: Some(id) };
            lost |= cx.send_to(to, msg).is_err();
        }
        self.deliver_room(cx, room, &frame, Some(id));
        self.broker().publish(room_arc, payload);
        if lost {
            self.send_error(cx, id, ClientError::Overloaded);
        }
    }
}
