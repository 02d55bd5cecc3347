//! A minimal rooms server speaking ringside's `/ws` JSON protocol (welcome,
//! join/joined, leave/left, publish -> message to other members, ping/pong,
//! echo), in memory on one tokio thread. It exists so the fanout scenario and
//! its tests can run without a ringside build; it is not a reference for
//! ringside's behaviour beyond these frames. Prints `listening ADDR` on stdout.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::rc::Rc;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

type Rooms = Rc<RefCell<HashMap<String, HashSet<u64>>>>;
type Clients = Rc<RefCell<HashMap<u64, mpsc::UnboundedSender<String>>>>;

/// Entry point of the hidden `__fake-rooms` subcommand.
pub fn main(listen: &str) -> i32 {
    crate::net::raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    tokio::task::LocalSet::new().block_on(&rt, async {
        let l = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("fake-rooms: bind {listen}: {e}");
                return 2;
            }
        };
        println!("listening {}", l.local_addr().expect("bound"));
        let _ = std::io::stdout().flush();
        let rooms: Rooms = Rc::default();
        let clients: Clients = Rc::default();
        let mut next_id = 0;
        while let Ok((s, _)) = l.accept().await {
            next_id += 1;
            tokio::task::spawn_local(serve(s, next_id, rooms.clone(), clients.clone()));
        }
        0
    })
}

async fn serve(s: tokio::net::TcpStream, id: u64, rooms: Rooms, clients: Clients) {
    let Ok(ws) = tokio_tungstenite::accept_async(s).await else {
        return;
    };
    let (mut tx, mut rx) = ws.split();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<String>();
    clients.borrow_mut().insert(id, out_tx.clone());
    let _ = out_tx.send(json!({"type":"welcome","client_id":id,"node":"fake","shard":0}).to_string());
    let writer = tokio::task::spawn_local(async move {
        while let Some(m) = out_rx.recv().await {
            if tx.send(Message::text(m)).await.is_err() {
                break;
            }
        }
        let _ = tx.close().await;
    });
    while let Some(Ok(m)) = rx.next().await {
        match m {
            Message::Text(t) => handle(id, t.as_str(), &rooms, &clients, &out_tx),
            Message::Close(_) => break,
            _ => {}
        }
    }
    clients.borrow_mut().remove(&id);
    rooms.borrow_mut().values_mut().for_each(|m| {
        m.remove(&id);
    });
    drop(out_tx);
    let _ = writer.await;
}

fn handle(id: u64, text: &str, rooms: &Rooms, clients: &Clients, out: &mpsc::UnboundedSender<String>) {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        let _ = out.send(json!({"type":"error","code":"bad_json","message":"bad json"}).to_string());
        return;
    };
    let room = v["room"].as_str().unwrap_or_default().to_string();
    let reply = match v["type"].as_str().unwrap_or_default() {
        "join" => {
            rooms.borrow_mut().entry(room.clone()).or_default().insert(id);
            json!({"type":"joined","room":room})
        }
        "leave" => {
            if let Some(m) = rooms.borrow_mut().get_mut(&room) {
                m.remove(&id);
            }
            json!({"type":"left","room":room})
        }
        "publish" => {
            let msg = json!({"type":"message","room":room,"from":id,"data":v["data"]}).to_string();
            let members = rooms.borrow().get(&room).cloned().unwrap_or_default();
            let cl = clients.borrow();
            for m in members.iter().filter(|m| **m != id) {
                if let Some(c) = cl.get(m) {
                    let _ = c.send(msg.clone());
                }
            }
            return;
        }
        "ping" => json!({"type":"pong","id":v["id"]}),
        "echo" => json!({"type":"echo","data":v["data"]}),
        _ => json!({"type":"error","code":"unknown_type","message":"unknown type"}),
    };
    let _ = out.send(reply.to_string());
}
