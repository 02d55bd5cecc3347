//! The `storm` section of a storm run's summary: the trigger, how long until every
//! subscriber was back, how fast they came back (reconnects per 100 ms slot and per
//! sliding second), what closed, and the other node's handshakes during the storm;
//! and the storm's checks, which depend on `--trigger-kind`.

use serde_json::{json, Map, Value};

use crate::params::Params;
use crate::stats::Stats;
use crate::trigger::{handshake_json, TriggerReport};

/// Prefix of the per-slot reconnect counters (see `scenario::resume::SLOT_US`: 100 ms).
const SLOT_PREFIX: &str = "recovery.reconnected_100ms.";

/// Slot width in milliseconds.
const SLOT_MS: u64 = 100;

/// Reconnects per 100 ms slot since the schedule's start, as (slot, count), ascending.
pub fn slots(stats: &Stats) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> =
        stats.counters.iter().filter_map(|(k, n)| Some((k.strip_prefix(SLOT_PREFIX)?.parse().ok()?, *n))).collect();
    v.sort_unstable();
    v
}

/// The largest count in any window of `width` consecutive slots.
pub fn peak(slots: &[(u64, u64)], width: u64) -> u64 {
    let mut best = 0;
    let mut sum = 0;
    let mut lo = 0;
    for (hi, &(s, n)) in slots.iter().enumerate() {
        sum += n;
        while slots[lo].0 + width <= s {
            sum -= slots[lo].1;
            lo += 1;
        }
        debug_assert!(lo <= hi);
        best = best.max(sum);
    }
    best
}

fn ms_between(from: u64, to: u64) -> Value {
    if from == 0 || to == 0 {
        return Value::Null;
    }
    json!(((to as f64 - from as f64) / 1000.0 * 10.0).round() / 10.0)
}

/// The storm section. `subscribers` is the number that joined at the start.
pub fn storm_json(p: &Params, t: Option<&TriggerReport>, stats: &Stats, subscribers: u64) -> Value {
    let g = |k: &str| stats.get(k);
    let empty = TriggerReport::default();
    let t = t.unwrap_or(&empty);
    let fired = t.fired_mono_us.unwrap_or(0);
    let (first, last) = (g("min.first_drop_us"), g("max.last_back_us"));
    let all_back = g("recovery.drops") > 0 && g("recovery.rejoined") == g("recovery.drops");
    let s = slots(stats);
    // Slot k covers [start + k x 100 ms, start + (k + 1) x 100 ms); shown relative to the trigger.
    let series: Vec<Value> = s
        .iter()
        .map(|(k, n)| {
            let at = t.start_mono_us + k * SLOT_MS * 1000;
            json!([(at as f64 - fired as f64) / 1000.0, n])
        })
        .collect();
    let closes = g("recovery.hints") + g("recovery.server_closes") + g("recovery.abrupt_closes");
    json!({
        "trigger_kind": p.trigger_kind,
        "trigger": {
            "command": t.command,
            "at_s": t.at_s,
            "go_mono_us": t.go_mono_us,
            "fired_mono_us": t.fired_mono_us,
            "exit_code": t.exit_code,
            "error": t.error,
        },
        "subscribers": subscribers,
        "closes_seen": closes,
        "hints": g("recovery.hints"),
        "hints_with_url": g("recovery.hints_with_url"),
        "server_closes_without_hint": g("recovery.server_closes"),
        "abrupt_closes": g("recovery.abrupt_closes"),
        "hint_closes_unclean": g("recovery.hint_close_unclean"),
        "reconnects": g("recovery.rejoined"),
        "reconnect_attempts": g("recovery.reconnect_attempts"),
        "reconnect_failed": g("recovery.reconnect_failed"),
        "ended_on_another_node": g("recovery.ended_elsewhere"),
        "first_close_after_trigger_ms": ms_between(fired, first),
        "all_back_after_trigger_ms": if all_back { ms_between(fired, last) } else { Value::Null },
        "peak_reconnects_per_100ms": peak(&s, 1),
        "peak_reconnects_per_second": peak(&s, 1000 / SLOT_MS),
        "reconnects_per_100ms": series,
        "reconnects_per_100ms_note": "[ms from the trigger to the slot's start, reconnects established \
            (101 received) in that 100 ms]; slots count from the schedule's start, peak per second is the \
            largest sum over 10 consecutive slots",
        "server_handshake": handshake_json(t),
    })
}

/// The storm's own checks, added to the rooms scenarios' ones.
pub fn checks(v: &Value, c: &mut Map<String, Value>) {
    let n = |path: &str| v.pointer(path).and_then(Value::as_u64).unwrap_or(0);
    let st = &v["storm"];
    c.insert("trigger_ran".into(), json!(st["trigger"]["exit_code"] == json!(0) && st["trigger"]["error"].is_null()));
    match st["trigger_kind"].as_str() {
        Some("upgrade") => {
            c.insert("no_reconnects".into(), json!(n("/storm/reconnects") == 0 && n("/recovery/drops") == 0));
            c.insert("no_closes".into(), json!(n("/storm/closes_seen") == 0));
        }
        _ => {
            let subs = n("/storm/subscribers");
            c.insert("every_close_hinted".into(), json!(n("/storm/hints") == n("/storm/closes_seen")));
            c.insert(
                "all_moved".into(),
                json!(subs > 0 && n("/storm/hints") == subs && n("/storm/ended_on_another_node") == subs),
            );
            if !st["server_handshake"].is_null() {
                let hs = &st["server_handshake"];
                c.insert(
                    "handshakes_scraped".into(),
                    json!(hs["error"].is_null() && n("/storm/server_handshake/count") >= n("/storm/reconnects")),
                );
            }
        }
    }
}

/// Rows for the per-run README's table.
pub fn readme_rows(v: &Value) -> String {
    let st = &v["storm"];
    let hs = &st["server_handshake"];
    let handshake = if hs.is_null() {
        "not scraped".to_string()
    } else if !hs["error"].is_null() {
        format!("no figure: {}", hs["error"])
    } else {
        format!("{} handshakes, p50 <= {} s, p99 <= {} s (bucket bounds)", hs["count"], hs["p50_le_s"], hs["p99_le_s"])
    };
    format!(
        "| storm: trigger ({}) at / exit | {} s / {} |\n\
         | storm: closes seen (hints / closes without hint / abrupt) | {} ({} / {} / {}) |\n\
         | storm: reconnects / ended on another node | {} / {} |\n\
         | storm: first close / all back after the trigger (ms) | {} / {} |\n\
         | storm: peak reconnects per 100 ms / per second | {} / {} |\n\
         | storm: other node's handshakes during the storm | {handshake} |\n",
        st["trigger_kind"].as_str().unwrap_or_default(),
        st["trigger"]["at_s"],
        st["trigger"]["exit_code"],
        st["closes_seen"],
        st["hints"],
        st["server_closes_without_hint"],
        st["abrupt_closes"],
        st["reconnects"],
        st["ended_on_another_node"],
        st["first_close_after_trigger_ms"],
        st["all_back_after_trigger_ms"],
        st["peak_reconnects_per_100ms"],
        st["peak_reconnects_per_second"],
    )
}

/// The index's headline of a storm run.
pub fn headline(v: &Value) -> String {
    let (st, m) = (&v["storm"], &v["messages"]);
    let lost = format!("lost {} dup {}", m["lost"], m["duplicates"]);
    if st["trigger_kind"] == "upgrade" {
        return format!("upgrade: {} closes, {} reconnects; {lost}", st["closes_seen"], st["reconnects"]);
    }
    let p99 = match st["server_handshake"]["p99_le_s"].as_f64() {
        Some(s) => format!("<= {} ms", s * 1000.0),
        None => "-".into(),
    };
    format!(
        "drain: {} reconnects, all back {} ms after the trigger, peak {}/100 ms; {lost}; B handshake p99 {p99}",
        st["reconnects"], st["all_back_after_trigger_ms"], st["peak_reconnects_per_100ms"],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_over_sliding_windows_of_slots() {
        let s = vec![(3, 5), (4, 7), (12, 1), (13, 10), (20, 2)];
        assert_eq!(peak(&s, 1), 10);
        // Slots 4..=13 hold 7 + 1 + 10; 3..=12 hold 5 + 7 + 1.
        assert_eq!(peak(&s, 10), 18);
        assert_eq!(peak(&[], 10), 0);
    }

    #[test]
    fn slots_parse_from_counters_in_numeric_order() {
        let mut st = Stats::default();
        st.add("recovery.reconnected_100ms.10", 2);
        st.add("recovery.reconnected_100ms.9", 3);
        st.add("recovery.rejoined", 5);
        assert_eq!(slots(&st), vec![(9, 3), (10, 2)]);
    }
}
