//! `/pools` (shards and upstream pools as JSON, with seed 002's alerts) and
//! `/dashboard`, a small self-contained HTML page that polls `/pools` and
//! shows shards, pools, utilization and latency at a glance. Both are
//! internal endpoints (the admin listener).

use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use super::EdgeShared;
use crate::runtime::NodeState;

/// The `/pools` document.
pub fn pools<M>(node: &NodeState<M>, shared: &EdgeShared) -> Value {
    let shards: Vec<Value> = node
        .shards
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let m = &s.metrics;
            json!({
                "shard": i,
                "connections": m.connections.load(Ordering::Relaxed),
                "capacity": node.capacity_per_shard,
                "utilization": m.connections.load(Ordering::Relaxed) as f64 / node.capacity_per_shard.max(1) as f64,
                "handshake_p99_us": crate::runtime::metrics::handshake_p99_us(&[m]),
                "mailbox": s.mailbox.len(),
            })
        })
        .collect();
    let (pools, notices) = match &shared.backend {
        Some(b) => {
            let j = b.upstreams.json();
            (j["pools"].clone(), j["notices"].clone())
        }
        None => (json!([]), json!([])),
    };
    let alerts: Vec<Value> = pools
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| {
            let name = p["name"].clone();
            p["alerts"].as_array().cloned().unwrap_or_default().into_iter().map(move |mut a| {
                a["pool"] = name.clone();
                a
            })
        })
        .collect();
    json!({"node": node.node_id, "draining": node.is_draining(), "shards": shards, "pools": pools,
        "notices": notices, "alerts": alerts})
}

/// The dashboard: no external assets, one `fetch('/pools')` a second.
pub const PAGE: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ringside dashboard</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.05em;margin-top:1.5em}
table{border-collapse:collapse}td,th{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:right}
th:first-child,td:first-child{text-align:left}
.bar{display:inline-block;width:8em;height:.8em;background:#eee;vertical-align:middle}
.bar i{display:block;height:100%;background:#4a8}
.warn i{background:#d84}.alert{color:#b22;font-weight:600}
.closed{color:#282}.open{color:#b22}.half_open{color:#c80}
</style></head><body>
<h1>ringside <span id="node"></span></h1>
<div id="status">loading…</div>
<h2>Shards</h2>
<table id="shards"><thead><tr><th>shard</th><th>connections</th><th>capacity</th><th>utilization</th><th>handshake p99</th><th>mailbox</th></tr></thead><tbody></tbody></table>
<h2>Upstream pools</h2>
<table id="pools"><thead><tr><th>pool</th><th>total</th><th>active</th><th>idle</th><th>pending</th><th>max</th><th>utilization</th><th>acquire p95</th><th>latency p50</th><th>latency p99</th><th>breaker</th><th>healthy</th><th>leaks</th></tr></thead><tbody></tbody></table>
<h2>Alerts</h2>
<ul id="alerts"></ul>
<script>
function us(v){return v==null?'-':v<1000?v+' µs':(v/1000).toFixed(1)+' ms'}
function bar(u){var p=Math.min(100,Math.round(u*100));return '<span class="bar'+(u>0.9?' warn':'')+'"><i style="width:'+p+'%"></i></span> '+p+'%'}
function esc(s){return String(s).replace(/[&<>"]/g,function(c){return {'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]})}
function row(cls,cells){return '<tr class="'+cls+'">'+cells.map(function(c){return '<td>'+c+'</td>'}).join('')+'</tr>'}
function render(d){
 document.getElementById('node').textContent=d.node+(d.draining?' (draining)':'');
 document.querySelector('#shards tbody').innerHTML=d.shards.map(function(s){
  return row('shard',[s.shard,s.connections,s.capacity,bar(s.utilization),us(s.handshake_p99_us),s.mailbox])}).join('');
 document.querySelector('#pools tbody').innerHTML=d.pools.map(function(p){
  return row('pool',['<span class="pool-name">'+esc(p.name)+'</span>',p.total,p.active,p.idle,p.pending,p.max,bar(p.utilization),
   us(p.acquire_wait.p95_us),us(p.latency.p50_us),us(p.latency.p99_us),
   '<span class="breaker '+p.breaker+'">'+p.breaker+'</span>',p.healthy?'yes':'<span class="alert">no</span>',p.leaks])}).join('');
 document.getElementById('alerts').innerHTML=d.alerts.length?d.alerts.map(function(a){
  return '<li class="alert">'+esc(a.pool)+': '+esc(a.message)+'</li>'}).join(''):'<li>none</li>';
 document.getElementById('status').textContent='updated '+new Date().toLocaleTimeString()+' · '+d.shards.length+' shard(s), '+d.pools.length+' pool(s)';
}
function poll(){fetch('/pools',{cache:'no-store'}).then(function(r){return r.json()}).then(render)
 .catch(function(e){document.getElementById('status').textContent='error: '+e}).finally(function(){setTimeout(poll,1000)})}
poll();
</script></body></html>
"##;
