//! Zero-disconnect upgrade, the application's part: what a `/ws` session
//! is (client id, token grants, rooms) as bytes for the new process, and how
//! the new process restores it without anyone noticing (no `welcome`, no
//! presence events); room histories move with their sequencers.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::history::Exported;
use super::http::Route;
use super::{auth, protocol, AppMsg, Edge, EdgeShared, Grants, HINT_JITTER_MS};
use crate::runtime::table::ConnId;
use crate::runtime::Conns;

/// A session on its way to the new process.
#[derive(Debug, Serialize, Deserialize)]
struct Moved {
    /// `/ws` (true) or `/echo`.
    rooms_route: bool,
    client_id: Option<String>,
    named: bool,
    rooms: Vec<String>,
    /// (rooms it may join, rooms it may publish to, token expiry).
    grants: Option<(Vec<String>, Vec<String>, u64)>,
    /// Its connection id in the old process (its session in the cluster's
    /// sessions set is named by it: the new process renames it).
    #[serde(default)]
    conn: u64,
    /// Rooms ordered by the cluster: (room, epoch, last offset it got).
    #[serde(default)]
    positions: Vec<(String, String, u64)>,
}

/// Where a handed-over session stands in the rooms the cluster orders:
/// (room, epoch, last offset it got), read from its state (new process,
/// before any session resumes: the cluster fetches what came after the
/// lowest of them).
pub fn positions(bytes: &[u8]) -> Vec<(String, String, u64)> {
    serde_json::from_slice::<Moved>(bytes).map(|m| m.positions).unwrap_or_default()
}

/// Shard state on its way: a room's history.
#[derive(Debug, Serialize, Deserialize)]
struct SharedState {
    history: Exported,
}

impl Edge {
    pub(super) fn handover_state<C: Conns<Self>>(&self, cx: &C, id: ConnId) -> Option<Vec<u8>> {
        let mut moved = cx.state(id, |s| {
            // Not while a join waits for its history answer, or a backend
            // call (rpc, proxied publish) for its answer: a moment later.
            (s.pending_joins == 0 && s.in_flight == 0).then(|| Moved {
                rooms_route: s.route == Route::Rooms,
                client_id: s.client_id.as_deref().map(str::to_string),
                named: s.named,
                rooms: s.rooms.iter().map(|r| r.to_string()).collect(),
                grants: s.grants.as_ref().map(|g| (g.rooms.to_list(), g.publish.to_list(), g.exp)),
                conn: id.raw(),
                positions: Vec::new(),
            })
        })??;
        if self.broker().orders_rooms() {
            // Its own floor (a recovery answer it has not passed yet), else
            // what this shard delivered live.
            let positions = self.positions.borrow();
            let floors = self.floors.borrow();
            let own = floors.get(&id);
            for room in &moved.rooms {
                let Some((epoch, live)) = positions.get(room.as_str()) else { continue };
                let floor = own.and_then(|fs| fs.iter().find(|(r, _)| &**r == room.as_str())).map(|(_, o)| *o);
                moved.positions.push((room.clone(), epoch.to_string(), floor.unwrap_or(*live)));
            }
        }
        serde_json::to_vec(&moved).ok()
    }

    pub(super) fn resume_state<C: Conns<Self>>(&self, cx: &C, id: ConnId, bytes: &[u8]) {
        let Ok(m) = serde_json::from_slice::<Moved>(bytes) else {
            tracing::warn!(shard = self.shard, "a handed-over session's state is unreadable; closing it");
            return cx.close(id, crate::transport::close::INTERNAL, "internal error");
        };
        let grants = m.grants.and_then(|(rooms, publish, exp)| {
            Some(Box::new(Grants {
                rooms: auth::Patterns::parse(rooms)?,
                publish: auth::Patterns::parse(publish)?,
                exp,
                refresh_ms: 0,
            }))
        });
        if let Some(g) = &grants {
            self.expiries.borrow_mut().insert((g.exp, id));
        }
        let client: Option<Arc<str>> = m.client_id.map(|c| Arc::from(c.as_str()));
        cx.state(id, |s| {
            s.route = if m.rooms_route { Route::Rooms } else { Route::Echo };
            s.client_id = client.clone();
            s.named = m.named;
            s.grants = grants;
        });
        let Some(client) = client else { return };
        if m.conn != 0 {
            // The broker knew the session as the old process's connection
            // (the cluster's sessions set names it): that one goes, this one
            // comes (through the home shard, after). A single node's broker
            // keeps no sessions: nothing to rename.
            self.broker().conn_closed(&client, ConnId::from_raw(m.conn));
        }
        let home = self.shared.home_shard(&client, cx.node().shards.len());
        let _ = cx.send_to(home, AppMsg::Register { client_id: client.clone(), conn: id, named: m.named });
        for room in m.rooms {
            if !protocol::valid_room(&room) {
                continue;
            }
            let (name, first) = self.rooms.borrow_mut().join(&room, id);
            cx.state(id, |s| s.rooms.push(name.clone()));
            if let Some((_, epoch, offset)) = m.positions.iter().find(|(r, _, _)| *r == room) {
                // Live messages up to where it stood are dropped: the
                // cluster fetches from the lowest position of all.
                self.floors.borrow_mut().entry(id).or_default().push((name.clone(), *offset));
                // The shard's live position starts from what arrives next.
                self.positions.borrow_mut().entry(name).or_insert_with(|| (epoch.as_str().into(), 0));
            }
            if first {
                self.broker().room_interest(self.shard, &room, true);
            }
            self.presence_change(cx, &room, &client, true, id, true);
        }
    }

    pub(super) fn handover_histories<C: Conns<Self>>(&self, cx: &C) -> Vec<Vec<u8>> {
        let now = cx.now_ms();
        let logs = self.history.borrow().export(now);
        logs.into_iter().filter_map(|history| serde_json::to_vec(&SharedState { history }).ok()).collect()
    }

    pub(super) fn restore_history<C: Conns<Self>>(&self, cx: &C, x: Exported) {
        self.history.borrow_mut().import(x, cx.now_ms());
    }

    /// Tells a session that cannot move to reconnect (same address: the
    /// new process serves it).
    pub(super) fn upgrade_hint<C: Conns<Self>>(&self, cx: &C, id: ConnId) {
        if cx.state(id, |s| s.client_id.is_some()) == Some(true) {
            let after_ms = fastrand::u64(0..=HINT_JITTER_MS);
            cx.send_text(id, &protocol::reconnect("", after_ms, protocol::HintReason::Upgrade));
        }
    }
}

/// In the new process: where shard state from the old one goes (the room's
/// home shard) and the message that restores it.
pub fn restore_message(shared: &EdgeShared, shards: usize, bytes: &[u8]) -> Option<(usize, AppMsg)> {
    let s: SharedState = serde_json::from_slice(bytes).ok()?;
    let home = shared.home_shard(&s.history.room, shards);
    Some((home, AppMsg::RestoreHistory { history: Box::new(s.history) }))
}
