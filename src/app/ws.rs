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
            Request::Join(room) => self.join(cx, id, &room, None),
            Request::JoinSince { room, offset, epoch } => self.join(cx, id, &room, Some((offset, &epoch))),
            Request::Leave(room) => self.leave(cx, id, &room),
            Request::Publish { room, data } => self.publish(cx, id, &room, &from, data),
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
            Request::Presence(room) => self.presence_request(cx, id, &room),
            Request::Ping(x) => {
                cx.send_text(id, &protocol::pong(x));
            }
            Request::Refresh(token) => self.refresh(cx, id, &from, &token),
            Request::Rpc { id: rid, method, data } => self.rpc(cx, id, &from, rid, &method, data),
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

    /// Joins `room`. In a room with history the `joined` (with the room's
    /// offset and epoch) comes from the room's home shard, after the
    /// messages after `since`; until then the member is held back from
    /// live delivery. A repeated join of a room answers a plain `joined`.
    pub(super) fn join<C: Conns<Self>>(&self, cx: &C, id: ConnId, room: &str, since: Option<(u64, &str)>) {
        if !self.allowed(cx, id, room, false) {
            return self.send_error(cx, id, ClientError::Forbidden);
        }
        let cfg = &cx.node().config.rooms;
        let max = cfg.max_rooms_per_connection;
        let Some((already, full, pending)) =
            cx.state(id, |s| (s.rooms.iter().any(|r| &**r == room), s.rooms.len() >= max, s.pending_joins))
        else {
            return;
        };
        if already {
            cx.send_text(id, &protocol::room_ack("joined", room));
            return;
        }
        if full {
            return self.send_error(cx, id, ClientError::TooManyRooms);
        }
        let with_history = cfg.history_of(room).0 > 0;
        if with_history && pending as usize >= cfg.max_pending_joins {
            return self.send_error(cx, id, ClientError::RateLimited);
        }
        let (name, first) = self.rooms.borrow_mut().join(room, id);
        let client = cx.state(id, |s| {
            s.rooms.push(name.clone());
            s.client_id.clone()
        });
        if first {
            self.broker().room_interest(self.shard, room, true);
        }
        if let Some(Some(client)) = client {
            self.presence_change(cx, room, &client, true, id, false);
        }
        if !with_history {
            if since.is_some() {
                // No history here: nothing can be recovered.
                self.shared.metrics[self.shard].recoveries[1].inc();
                cx.send_text(id, &protocol::joined_at(room, 0, "none", Some(false)));
            } else {
                cx.send_text(id, &protocol::room_ack("joined", room));
            }
            return;
        }
        cx.state(id, |s| s.pending_joins += 1);
        self.pending.borrow_mut().entry(id).or_default().push(name);
        let room: Arc<str> = Arc::from(room);
        let since = since.map(|(o, e)| (o, Box::from(e)));
        if self.broker().orders_rooms() {
            let ttl_ms = cfg.history_of(&room).1 * 1000;
            return self.broker().recover(room, id, since, ttl_ms);
        }
        let home = self.shared.home_shard(&room, cx.node().shards.len());
        if home == self.shard {
            self.recover(cx, room, id, since);
        } else {
            // Control (never refused): bounded by rooms.max_pending_joins.
            let _ = cx.send_to(home, AppMsg::Recover { room, conn: id, since });
        }
    }

    /// On a room's home shard: answers a join with the room's position and
    /// the messages after `since`.
    pub(super) fn recover<C: Conns<Self>>(&self, cx: &C, room: Arc<str>, conn: ConnId, since: Option<(u64, Box<str>)>) {
        let ttl_ms = cx.node().config.rooms.history_of(&room).1 * 1000;
        let asked = since.is_some();
        let replay =
            self.history.borrow_mut().since(&room, since.as_ref().map(|(o, e)| (*o, &**e)), ttl_ms, cx.now_ms());
        if conn.shard() == self.shard {
            self.replayed(cx, &room, conn, replay, asked);
        } else {
            let _ = cx.send_to(conn.shard(), AppMsg::Replay { room, conn, replay: Box::new(replay), asked });
        }
    }

    /// On the member's shard: the join's answer. Sends the missed messages,
    /// then `joined`, then lets live delivery through.
    pub(super) fn replayed<C: Conns<Self>>(
        &self,
        cx: &C,
        room: &str,
        conn: ConnId,
        replay: super::history::Replay,
        asked: bool,
    ) {
        let was_pending = {
            let mut pending = self.pending.borrow_mut();
            let Some(rooms) = pending.get_mut(&conn) else { return };
            let Some(i) = rooms.iter().position(|r| &**r == room) else { return };
            rooms.swap_remove(i);
            if rooms.is_empty() {
                pending.remove(&conn);
            }
            true
        };
        if !was_pending {
            return;
        }
        cx.state(conn, |s| s.pending_joins = s.pending_joins.saturating_sub(1));
        if self.broker().orders_rooms() {
            // Messages up to the answer's offset may still be on their way.
            let name = cx.state(conn, |s| s.rooms.iter().find(|r| &***r == room).cloned()).flatten();
            if let Some(name) = name {
                let mut positions = self.positions.borrow_mut();
                let p = positions.entry(name.clone()).or_insert_with(|| (Box::from(&*replay.epoch), 0));
                if *p.0 != *replay.epoch {
                    *p = (Box::from(&*replay.epoch), 0);
                }
                self.floors.borrow_mut().entry(conn).or_default().push((name, replay.offset));
            }
        }
        // A replay must fit in the send queue with room to spare: past half
        // of it some of it would be dropped (or the connection closed) by the
        // slow-consumer policy, a gap behind `recovered:true`. It answers
        // `recovered:false` instead (the client resyncs).
        let bytes: usize = replay.frames.iter().map(|f| f.len()).sum();
        let fits = bytes <= cx.node().config.websocket.send_queue_bytes / 2;
        let recovered = replay.recovered && fits;
        if recovered {
            for f in &replay.frames {
                cx.send_frame(conn, f);
            }
        }
        if asked {
            self.shared.metrics[self.shard].recoveries[usize::from(!recovered)].inc();
        }
        let recovered = asked.then_some(recovered);
        cx.send_text(conn, &protocol::joined_at(room, replay.offset, &replay.epoch, recovered));
    }

    /// On a room's home shard: numbers, keeps and fans out one message of a
    /// room with history.
    pub(super) fn sequence<C: Conns<Self>>(&self, cx: &C, room: &str, from: &str, data: &str, origin: ConnId) {
        let cfg = &cx.node().config.rooms;
        let (size, ttl) = cfg.history_of(room);
        let policy = super::history::Policy { size, ttl_ms: ttl * 1000, max_bytes: cfg.history_max_bytes };
        let mut offset = 0;
        let frame = self.history.borrow_mut().append(room, policy, cfg.history_bytes_per_shard, cx.now_ms(), |o| {
            offset = o;
            frame::text(&protocol::room_message_at(room, from, data, o))
        });
        let room_arc: Arc<str> = Arc::from(room);
        for to in (0..cx.node().shards.len()).filter(|s| *s != self.shard) {
            // A full mailbox loses the message for that shard's members; they
            // see the gap in the offsets and can recover it.
            let msg = AppMsg::Room { room: room_arc.clone(), frame: frame.clone(), origin: Some(origin), offset };
            let _ = cx.send_to(to, msg);
        }
        self.deliver_room(cx, room, &frame, Some(origin), offset);
    }

    /// Drops expired history and forgets idle rooms; updates the gauges.
    pub(super) fn sweep_history<C: Conns<Self>>(&self, cx: &C) {
        let cfg = &cx.node().config.rooms;
        if !cfg.any_history() {
            return;
        }
        let mut h = self.history.borrow_mut();
        let idle_ms = cfg.history_ttl_secs.max(cfg.history_rules.iter().map(|r| r.ttl_secs).max().unwrap_or(0)) * 1000;
        h.sweep(cx.now_ms(), idle_ms, |room| cfg.history_of(room).1 * 1000);
        let m = &self.shared.metrics[self.shard];
        m.history_bytes.store(h.bytes() as u64, std::sync::atomic::Ordering::Relaxed);
        m.history_messages.store(h.messages() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Tells `room`'s home shard that `client`'s session `conn` joined (`on`) or left.
    pub(super) fn presence_change<C: Conns<Self>>(
        &self,
        cx: &C,
        room: &str,
        client: &Arc<str>,
        on: bool,
        conn: ConnId,
        quiet: bool,
    ) {
        let room: Arc<str> = Arc::from(room);
        let home = self.shared.home_shard(&room, cx.node().shards.len());
        if home == self.shard {
            self.presence_changed(cx, room, client.clone(), on, conn, quiet);
        } else {
            // Control (never refused): one per join or leave.
            let _ = cx.send_to(home, AppMsg::PresenceChange { room, client: client.clone(), on, conn, quiet });
        }
    }

    /// On a room's home shard: counts `client`'s sessions in the room; when
    /// its first joins or its last leaves, tells the cluster and, with
    /// `rooms.presence_events`, every member (here and on other nodes).
    pub(super) fn presence_changed<C: Conns<Self>>(
        &self,
        cx: &C,
        room: Arc<str>,
        client: Arc<str>,
        on: bool,
        conn: ConnId,
        quiet: bool,
    ) {
        let changed = {
            let mut p = self.presence.borrow_mut();
            let members = p.entry(room.clone()).or_default();
            let n = members.entry(client.clone()).or_insert(0);
            let before = *n;
            *n = if on { before + 1 } else { before.saturating_sub(1) };
            let after = *n;
            if after == 0 {
                members.remove(&client);
                if members.is_empty() {
                    p.remove(&room);
                }
            }
            (before == 0) != (after == 0)
        };
        if !changed {
            return;
        }
        self.broker().presence_changed(&room, &client, on);
        if quiet || !cx.node().config.rooms.presence_events_of(&room) {
            return;
        }
        let payload = protocol::presence_event(on, &room, &client);
        let frame = frame::text(&payload);
        let origin = on.then_some(conn);
        for to in (0..cx.node().shards.len()).filter(|s| *s != self.shard) {
            let msg = AppMsg::Room { room: room.clone(), frame: frame.clone(), origin, offset: 0 };
            let _ = cx.send_to(to, msg);
        }
        self.deliver_room(cx, &room, &frame, origin, 0);
        let _ = self.broker().publish(room, &payload); // presence events: best effort
    }

    /// `{"type":"presence","room":R}`: allowed to whoever may join the room.
    fn presence_request<C: Conns<Self>>(&self, cx: &C, id: ConnId, room: &str) {
        if !self.allowed(cx, id, room, false) {
            return self.send_error(cx, id, ClientError::Forbidden);
        }
        let room: Arc<str> = Arc::from(room);
        if self.broker().presence(room.clone(), id) {
            return; // the cluster answers
        }
        let home = self.shared.home_shard(&room, cx.node().shards.len());
        if home == self.shard {
            self.presence_query(cx, &room, id);
        } else if cx.send_to(home, AppMsg::PresenceQuery { room, conn: id }).is_err() {
            self.send_error(cx, id, ClientError::Overloaded);
        }
    }

    /// On a room's home shard: answers who is in the room on this node.
    pub(super) fn presence_query<C: Conns<Self>>(&self, cx: &C, room: &str, conn: ConnId) {
        let mut clients: Vec<Arc<str>> =
            self.presence.borrow().get(room).map(|m| m.keys().cloned().collect()).unwrap_or_default();
        clients.sort_unstable();
        let frame = frame::text(&protocol::presence(room, &clients));
        if conn.shard() == self.shard {
            cx.send_frame(conn, &frame);
        } else {
            let _ = cx.send_to(conn.shard(), AppMsg::Deliver { conn, frame });
        }
    }

    /// A member left before its join was answered: the answer is ignored.
    fn forget_pending<C: Conns<Self>>(&self, cx: &C, id: ConnId, room: &str) {
        let mut pending = self.pending.borrow_mut();
        let Some(rooms) = pending.get_mut(&id) else { return };
        let Some(i) = rooms.iter().position(|r| &**r == room) else { return };
        rooms.swap_remove(i);
        if rooms.is_empty() {
            pending.remove(&id);
        }
        cx.state(id, |s| s.pending_joins = s.pending_joins.saturating_sub(1));
    }

    fn leave<C: Conns<Self>>(&self, cx: &C, id: ConnId, room: &str) {
        let was_member = cx.state(id, |s| match s.rooms.iter().position(|r| &**r == room) {
            Some(i) => {
                s.rooms.swap_remove(i);
                true
            }
            None => false,
        });
        if was_member == Some(true) {
            if let Some(Some(client)) = cx.state(id, |s| s.client_id.clone()) {
                self.presence_change(cx, room, &client, false, id, false);
            }
            self.forget_pending(cx, id, room);
            let mut floors = self.floors.borrow_mut();
            if let Some(fs) = floors.get_mut(&id) {
                fs.retain(|(r, _)| &**r != room);
                if fs.is_empty() {
                    floors.remove(&id);
                }
            }
        }
        let Some(was_member) = was_member else { return };
        if was_member && self.rooms.borrow_mut().leave(room, id) {
            self.positions.borrow_mut().remove(room);
            self.broker().room_interest(self.shard, room, false);
        }
        cx.send_text(id, &protocol::room_ack("left", room));
    }

    /// Sends one shared frame to every other shard first (so they start
    /// writing while this one does), then delivers to local members, then
    /// hands the payload to the broker for other nodes.
    /// A room with history takes a detour through its home shard, which
    /// numbers the message (see [`super::history`]).
    fn publish<C: Conns<Self>>(&self, cx: &C, id: ConnId, room: &str, from: &Arc<str>, data: &str) {
        if !self.allowed(cx, id, room, true) {
            return self.send_error(cx, id, ClientError::Forbidden);
        }
        if cx.node().config.rooms.publish_requires_join {
            let member = cx.state(id, |s| s.rooms.iter().any(|r| &**r == room)).unwrap_or(false);
            if !member {
                return self.send_error(cx, id, ClientError::NotJoined);
            }
        }
        if self.publish_via_backend(cx, id, room, from, data) {
            return; // delivered (or not) when the backend has answered
        }
        self.publish_now(cx, id, room, from, data);
    }

    /// Delivers a publish that passed every check (the publish backend's
    /// too, with its rewritten data, when a route applies).
    pub(super) fn publish_now<C: Conns<Self>>(&self, cx: &C, id: ConnId, room: &str, from: &Arc<str>, data: &str) {
        let (size, ttl) = cx.node().config.rooms.history_of(room);
        if size > 0 && self.broker().orders_rooms() {
            // The cluster numbers it; every node (this one too) delivers it.
            let prefix = protocol::room_message_prefix(room, from, data);
            if !self.broker().publish_ordered(Arc::from(room), prefix, id, size, ttl * 1000) {
                self.send_error(cx, id, ClientError::Overloaded);
            }
            return;
        }
        if size > 0 {
            let home = self.shared.home_shard(room, cx.node().shards.len());
            if home == self.shard {
                return self.sequence(cx, room, from, data, id);
            }
            let msg = AppMsg::Sequence { room: Arc::from(room), from: from.clone(), data: Box::from(data), origin: id };
            if cx.send_to(home, msg).is_err() {
                self.send_error(cx, id, ClientError::Overloaded);
            }
            return;
        }
        let payload = &protocol::room_message(room, from, data);
        let frame = frame::text(payload);
        let room_arc: Arc<str> = Arc::from(room);
        let mut lost = false;
        for to in (0..cx.node().shards.len()).filter(|s| *s != self.shard) {
            let msg = AppMsg::Room { room: room_arc.clone(), frame: frame.clone(), origin: Some(id), offset: 0 };
            lost |= cx.send_to(to, msg).is_err();
        }
        self.deliver_room(cx, room, &frame, Some(id), 0);
        if !self.broker().publish(room_arc, payload) {
            // Local members got it; other nodes did not.
            self.send_error(cx, id, ClientError::Unavailable);
        } else if lost {
            self.send_error(cx, id, ClientError::Overloaded);
        }
    }
}
