//! One clock for every process of a run: `CLOCK_MONOTONIC` in microseconds.
//!
//! `std::time::Instant` cannot be sent to another process, but the raw
//! `CLOCK_MONOTONIC` value is the same system-wide on Linux, so the parent can
//! hand workers a start time and a publisher can put its send time in a payload
//! that a subscriber in another worker process subtracts from its own clock.

use std::time::Duration;

/// Microseconds on the system-wide monotonic clock.
pub fn mono_us() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// The tokio instant that corresponds to monotonic time `t_us` (past times map to now).
pub fn to_instant(t_us: u64) -> tokio::time::Instant {
    let now = mono_us();
    tokio::time::Instant::now() + Duration::from_micros(t_us.saturating_sub(now))
}

/// Sleeps until monotonic time `t_us`; returns at once if it has passed.
pub async fn sleep_until_us(t_us: u64) {
    if t_us > mono_us() {
        tokio::time::sleep_until(to_instant(t_us)).await;
    }
}

/// Seconds as microseconds, for flag values given in (fractional) seconds.
pub fn secs_us(s: f64) -> u64 {
    (s.max(0.0) * 1e6) as u64
}

/// Today's UTC date as `YYYY-MM-DD` (civil-from-days, H. Hinnant's algorithm).
pub fn utc_date() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Current UTC time as RFC 3339 (`YYYY-MM-DDTHH:MM:SSZ`).
pub fn utc_timestamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", s / 3600, (s / 60) % 60, s % 60)
}

/// Converts days since 1970-01-01 to (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
    }

    #[test]
    fn mono_advances() {
        let a = mono_us();
        std::thread::sleep(Duration::from_millis(2));
        assert!(mono_us() >= a + 2_000);
    }
}
