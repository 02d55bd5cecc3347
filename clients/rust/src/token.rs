//! Tokens: how the client gets one ([`Auth`]), and when it must get the next one (from the
//! JWT's `exp`, read without verifying: the node verifies, the client only schedules).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;

/// A future returning a token (`None`: none to be had, e.g. signed out).
pub type TokenFuture = Pin<Box<dyn Future<Output = Option<String>> + Send>>;

/// Called whenever the client needs a (new) token: before connecting, ahead of `exp`,
/// after a close 4003 and after a 401.
pub type TokenCallback = Arc<dyn Fn() -> TokenFuture + Send + Sync>;

/// How the client authenticates.
#[derive(Clone, Default)]
pub enum Auth {
    /// No token (auth mode `none`).
    #[default]
    Anonymous,
    /// One fixed token, never refreshed (a 4003 then stops the client).
    Static(String),
    /// A callback that returns the current token; called again before `exp`.
    Callback(TokenCallback),
}

impl Auth {
    /// An [`Auth::Callback`] from an async closure-like function.
    pub fn callback<F, Fut>(f: F) -> Auth
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Option<String>> + Send + 'static,
    {
        Auth::Callback(Arc::new(move || Box::pin(f())))
    }

    /// A new token: the callback's answer, the static one, or `None`.
    pub(crate) async fn fetch(&self) -> Option<String> {
        match self {
            Auth::Anonymous => None,
            Auth::Static(t) => Some(t.clone()),
            Auth::Callback(f) => f().await,
        }
    }

    /// Whether a new token can be had at all (for 4003 / 401).
    pub(crate) fn can_refresh(&self) -> bool {
        matches!(self, Auth::Callback(_))
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Anonymous => f.write_str("Anonymous"),
            Auth::Static(_) => f.write_str("Static(..)"),
            Auth::Callback(_) => f.write_str("Callback(..)"),
        }
    }
}

/// The `exp` claim of a JWT (Unix seconds), read without verifying.
pub fn jwt_exp(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("exp")?.as_f64().filter(|e| *e >= 0.0).map(|e| e as u64)
}

/// Unix time now, in seconds.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// How long from now until a token expiring at `exp` should be refreshed: `ahead`
/// (0..1) of the time left, e.g. 0.8 refreshes at 80 % of the remaining lifetime. At
/// least 100 ms, so an already expired token does not spin.
pub fn refresh_in(exp: u64, ahead: f64, now: u64) -> Duration {
    let left = exp.saturating_sub(now) as f64;
    Duration::from_secs_f64((left * ahead.clamp(0.0, 1.0)).max(0.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> String {
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!("{}.{}.sig", e.encode(r#"{"alg":"HS256"}"#), e.encode(payload))
    }

    #[test]
    fn exp_is_read() {
        assert_eq!(jwt_exp(&jwt(r#"{"sub":"a","exp":1764600000}"#)), Some(1764600000));
        assert_eq!(jwt_exp(&jwt(r#"{"sub":"a","exp":17.9}"#)), Some(17));
        assert_eq!(jwt_exp(&jwt(r#"{"sub":"a"}"#)), None);
        assert_eq!(jwt_exp("not a jwt"), None);
    }

    #[test]
    fn refresh_is_ahead_of_exp() {
        assert_eq!(refresh_in(1100, 0.8, 1000), Duration::from_secs(80));
        assert_eq!(refresh_in(900, 0.8, 1000), Duration::from_millis(100));
    }
}
