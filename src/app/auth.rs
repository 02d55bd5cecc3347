//! Tokens (`auth.mode = "token"`): which signed JWTs the node accepts and
//! what they grant, and where an upgrade request carries one.
//!
//! * [`Verifier`] is built once per node from `[auth]` and shared by every
//!   shard (`Arc<Verifier>`): it holds the key (HS256 from `auth.hmac_secret`
//!   or `auth.hmac_secret_file`; RS256 or ES256 from the PEM in
//!   `auth.public_key_file`), the required issuer and audience and the leeway.
//! * [`Verifier::verify`] checks a token's size, shape and signature with
//!   `jsonwebtoken`, then its claims itself, against the caller's clock (so the
//!   time checks are exact and testable), and gives back [`Claims`]: the client
//!   id (`sub`), the rooms it may join and publish to ([`Patterns`]) and its
//!   priority [`Class`]; or a [`TokenError`] with a stable metrics label.
//! * [`token_from`] finds the token in a request head ([`TokenSource`]):
//!   `Authorization: Bearer`, then a `ringside.bearer.<token>` WebSocket
//!   subprotocol (the only way a browser can send one without putting it in
//!   the URL), then `?token=`. [`selected_protocol`] is the
//!   `Sec-WebSocket-Protocol` answer the 101 must carry.

use std::sync::Arc;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, Validation};
use serde_json::{Map, Value};

use crate::app::protocol::{valid_client_id, valid_room};
use crate::config::{AuthConfig, Class};
use crate::transport::http::Head;

/// Tokens longer than this are refused as [`TokenError::Malformed`] before
/// any decoding.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// At most this many entries in each of `rooms` and `publish`; more is
/// [`TokenError::BadClaims`].
pub const MAX_PATTERNS: usize = 256;

/// The subprotocol the server selects when the client offers it.
pub const PROTOCOL: &str = "ringside";

/// A subprotocol entry starting with this carries the token after it.
pub const BEARER_PREFIX: &str = "ringside.bearer.";

/// HS256 secrets shorter than this are refused (the hash's length).
const MIN_SECRET_BYTES: usize = 32;

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenError {
    /// No token (or an empty one).
    Missing,
    /// Too long, not three base64url parts, or an unreadable header or payload.
    Malformed,
    /// The signature does not verify, or the header names an algorithm this
    /// node's key does not sign with.
    BadSignature,
    /// `exp` (plus the leeway) is in the past.
    Expired,
    /// `nbf` (minus the leeway) is in the future.
    NotYetValid,
    /// `auth.issuer` is set and `iss` is missing or different.
    BadIssuer,
    /// `auth.audience` is set and `aud` is missing or does not name it.
    BadAudience,
    /// A claim is missing or invalid: `exp`, `nbf`, `sub`, `rooms`,
    /// `publish` or `class`.
    BadClaims,
}

impl TokenError {
    /// Every reason, in [`TokenError::index`] order.
    pub const ALL: [TokenError; 8] = [
        TokenError::Missing,
        TokenError::Malformed,
        TokenError::BadSignature,
        TokenError::Expired,
        TokenError::NotYetValid,
        TokenError::BadIssuer,
        TokenError::BadAudience,
        TokenError::BadClaims,
    ];

    /// The stable snake_case label (metrics, logs).
    pub fn reason(self) -> &'static str {
        match self {
            TokenError::Missing => "missing",
            TokenError::Malformed => "malformed",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::BadIssuer => "bad_issuer",
            TokenError::BadAudience => "bad_audience",
            TokenError::BadClaims => "bad_claims",
        }
    }

    /// Index into per-reason arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// A one-line text for people (refusal bodies).
    pub fn text(self) -> &'static str {
        match self {
            TokenError::Missing => {
                "a token is required (Authorization: Bearer, subprotocol ringside.bearer.<token>, or ?token=)"
            }
            TokenError::Malformed => "the token is not a well-formed JWT",
            TokenError::BadSignature => "the token's signature does not verify",
            TokenError::Expired => "the token has expired",
            TokenError::NotYetValid => "the token is not valid yet",
            TokenError::BadIssuer => "the token's issuer is not accepted",
            TokenError::BadAudience => "the token is not meant for this service",
            TokenError::BadClaims => "the token's claims are missing or invalid (exp, nbf, sub, rooms, publish, class)",
        }
    }
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.text())
    }
}

impl std::error::Error for TokenError {}

/// Room patterns from a token: exact room names, and prefixes written with a
/// trailing `*` (`chat.*` allows every room starting with `chat.`, `chat.`
/// itself included; `*` alone allows every room).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patterns {
    /// `*` was given.
    all: bool,
    /// Exact names, sorted and deduplicated.
    exact: Vec<Box<str>>,
    /// Prefixes (without the `*`), deduplicated.
    prefixes: Vec<Box<str>>,
}

impl Patterns {
    /// Allows no room.
    pub fn none() -> Patterns {
        Patterns::default()
    }

    /// Allows every room.
    pub fn all() -> Patterns {
        Patterns { all: true, ..Patterns::default() }
    }

    /// Back to a list that [`Patterns::parse`] reads as the same patterns.
    pub fn to_list(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        if self.all {
            out.push("*".into());
        }
        out.extend(self.exact.iter().map(|e| e.to_string()));
        out.extend(self.prefixes.iter().map(|p| format!("{p}*")));
        out
    }

    /// From a list of patterns; `None` if one is invalid (neither a room name
    /// nor a room-name prefix followed by a single trailing `*`) or there are
    /// more than [`MAX_PATTERNS`].
    pub fn parse<I, S>(items: I) -> Option<Patterns>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut p = Patterns::default();
        for (i, item) in items.into_iter().enumerate() {
            if i >= MAX_PATTERNS {
                return None;
            }
            p.add(item.as_ref())?;
        }
        p.exact.sort_unstable();
        p.exact.dedup();
        p.exact.shrink_to_fit();
        p.prefixes.shrink_to_fit();
        Some(p)
    }

    fn add(&mut self, s: &str) -> Option<()> {
        match s.strip_suffix('*') {
            Some("") => self.all = true,
            // A prefix shorter than the longest room name, so that something can match.
            Some(prefix) if prefix.len() < 128 && valid_room(prefix) => {
                if !self.prefixes.iter().any(|p| **p == *prefix) {
                    self.prefixes.push(prefix.into());
                }
            }
            Some(_) => return None,
            None if valid_room(s) => self.exact.push(s.into()),
            None => return None,
        }
        Some(())
    }

    /// Whether `room` is allowed.
    pub fn allows(&self, room: &str) -> bool {
        self.all
            || self.exact.binary_search_by(|e| (**e).cmp(room)).is_ok()
            || self.prefixes.iter().any(|p| room.starts_with(&**p))
    }

    /// Whether no room is allowed.
    pub fn is_empty(&self) -> bool {
        !self.all && self.exact.is_empty() && self.prefixes.is_empty()
    }
}

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The client id (`sub`): 1-64 of `[A-Za-z0-9_-]`.
    pub sub: Arc<str>,
    /// Expiry (`exp`), seconds since the Unix epoch.
    pub exp: u64,
    /// Rooms it may join (`rooms`; absent = none).
    pub rooms: Patterns,
    /// Rooms it may publish to (`publish`; absent = the same as `rooms`).
    pub publish: Patterns,
    /// Priority class (`class`: `low`, `normal`, `high`, `critical`; absent = `normal`).
    pub class: Class,
}

/// Checks tokens against one node's `[auth]` key and rules. Build it once
/// ([`Verifier::new`]) and share it (`Arc<Verifier>`, it is `Send + Sync`).
pub struct Verifier {
    key: DecodingKey,
    /// Signature and algorithm only: the claims are checked by [`Verifier::verify`].
    validation: Validation,
    issuer: Option<Box<str>>,
    audience: Option<Box<str>>,
    leeway: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// The verifier for `cfg`. Exactly one of `auth.hmac_secret`,
    /// `auth.hmac_secret_file` (one trailing newline ignored; at least 32
    /// bytes) and `auth.public_key_file` (PEM public key: RSA → RS256, RS384,
    /// RS512, PS256, PS384, PS512; EC P-256 → ES256) must be set. The error
    /// names the config key at fault.
    pub fn new(cfg: &AuthConfig) -> Result<Verifier, String> {
        let set =
            [&cfg.hmac_secret, &cfg.hmac_secret_file, &cfg.public_key_file].iter().filter(|s| !s.is_empty()).count();
        if set != 1 {
            return Err(format!(
                "auth.hmac_secret: set exactly one of auth.hmac_secret, auth.hmac_secret_file and auth.public_key_file \
                 ({set} set)"
            ));
        }
        let (key, algorithms) = if !cfg.hmac_secret.is_empty() {
            (hmac_key(cfg.hmac_secret.as_bytes(), "auth.hmac_secret")?, vec![Algorithm::HS256])
        } else if !cfg.hmac_secret_file.is_empty() {
            let path = &cfg.hmac_secret_file;
            let raw = std::fs::read(path).map_err(|e| format!("auth.hmac_secret_file: cannot read {path}: {e}"))?;
            let secret = raw.strip_suffix(b"\n").unwrap_or(&raw);
            let secret = secret.strip_suffix(b"\r").unwrap_or(secret);
            (hmac_key(secret, "auth.hmac_secret_file")?, vec![Algorithm::HS256])
        } else {
            public_key(&cfg.public_key_file)?
        };
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.leeway = 0;
        let opt = |s: &str| (!s.is_empty()).then(|| Box::<str>::from(s));
        Ok(Verifier {
            key,
            validation,
            issuer: opt(&cfg.issuer),
            audience: opt(&cfg.audience),
            leeway: cfg.leeway_secs,
        })
    }

    /// The algorithms a token's header may name.
    pub fn algorithms(&self) -> &[Algorithm] {
        &self.validation.algorithms
    }

    /// Checks `token` at `now_secs` (seconds since the Unix epoch). In order:
    /// empty → `Missing`; over [`MAX_TOKEN_BYTES`] or not a JWT → `Malformed`;
    /// signature or algorithm → `BadSignature`; `exp` required (an integer or
    /// a number, seconds) and `nbf` optional, else `BadClaims`; expired when
    /// `exp + leeway < now`, not yet valid when `nbf > now + leeway`;
    /// `iss` must equal `auth.issuer` and `aud` (a string or an array) must
    /// contain `auth.audience` when those are set (an `aud` is ignored when
    /// `auth.audience` is not); then `sub`, `rooms`, `publish` and `class`
    /// (`BadClaims`). Other claims are ignored.
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<Claims, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed);
        }
        // Shape and header first, so that what fails later is the signature or the claims.
        jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let data = jsonwebtoken::decode::<Value>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature
            | ErrorKind::InvalidAlgorithm
            | ErrorKind::MissingAlgorithm
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidKeyFormat
            | ErrorKind::UnsupportedAlgorithm => TokenError::BadSignature,
            _ => TokenError::Malformed,
        })?;
        let Value::Object(c) = data.claims else { return Err(TokenError::BadClaims) };
        self.check(&c, now_secs)
    }

    fn check(&self, c: &Map<String, Value>, now: u64) -> Result<Claims, TokenError> {
        let exp = c.get("exp").and_then(seconds).ok_or(TokenError::BadClaims)?;
        let nbf = match c.get("nbf") {
            None | Some(Value::Null) => None,
            Some(v) => Some(seconds(v).ok_or(TokenError::BadClaims)?),
        };
        if exp.saturating_add(self.leeway) < now {
            return Err(TokenError::Expired);
        }
        if nbf.is_some_and(|nbf| nbf > now.saturating_add(self.leeway)) {
            return Err(TokenError::NotYetValid);
        }
        if let Some(want) = &self.issuer {
            if c.get("iss").and_then(Value::as_str) != Some(&**want) {
                return Err(TokenError::BadIssuer);
            }
        }
        if let Some(want) = &self.audience {
            let ok = match c.get("aud") {
                Some(Value::String(a)) => **a == **want,
                Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(&**want)),
                _ => false,
            };
            if !ok {
                return Err(TokenError::BadAudience);
            }
        }
        let sub = match c.get("sub") {
            Some(Value::String(s)) if valid_client_id(s) => Arc::<str>::from(s.as_str()),
            _ => return Err(TokenError::BadClaims),
        };
        let rooms = patterns(c.get("rooms"))?.unwrap_or_default();
        let publish = match patterns(c.get("publish"))? {
            Some(p) => p,
            None => rooms.clone(),
        };
        let class = match c.get("class") {
            None | Some(Value::Null) => Class::Normal,
            Some(Value::String(s)) => Class::parse(s).ok_or(TokenError::BadClaims)?,
            Some(_) => return Err(TokenError::BadClaims),
        };
        Ok(Claims { sub, exp, rooms, publish, class })
    }
}

/// A NumericDate: a non-negative integer, or a non-negative finite number
/// (truncated to whole seconds).
fn seconds(v: &Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let f = v.as_f64()?;
    // Rejects NaN, infinities, negatives and floats past u64 (which `as` would saturate).
    (0.0..1.8e19).contains(&f).then_some(f as u64)
}

/// `rooms` / `publish`: absent or null → `None`; an array of patterns →
/// `Some`; anything else → `BadClaims`.
fn patterns(v: Option<&Value>) -> Result<Option<Patterns>, TokenError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(list)) if list.len() <= MAX_PATTERNS => {
            let mut names = Vec::with_capacity(list.len());
            for item in list {
                names.push(item.as_str().ok_or(TokenError::BadClaims)?);
            }
            Patterns::parse(names).map(Some).ok_or(TokenError::BadClaims)
        }
        Some(_) => Err(TokenError::BadClaims),
    }
}

fn hmac_key(secret: &[u8], key: &str) -> Result<DecodingKey, String> {
    if secret.is_empty() {
        return Err(format!("{key}: the secret is empty"));
    }
    if secret.len() < MIN_SECRET_BYTES {
        return Err(format!("{key}: the secret is {} bytes; HS256 needs at least {MIN_SECRET_BYTES}", secret.len()));
    }
    DecodingKey::from_secret(secret).map_err(|e| format!("{key}: {e}"))
}

/// The key in the PEM at `path` and the algorithms it verifies.
fn public_key(path: &str) -> Result<(DecodingKey, Vec<Algorithm>), String> {
    let pem = std::fs::read(path).map_err(|e| format!("auth.public_key_file: cannot read {path}: {e}"))?;
    if pem.windows(11).any(|w| w == b"PRIVATE KEY") {
        return Err(format!("auth.public_key_file: {path} holds a private key; give the public key"));
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((key, AlgorithmFamily::Rsa.algorithms().to_vec()));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        // An uncompressed P-256 point: 0x04, x, y (32 bytes each).
        let p256 = matches!(key.kind(), DecodingKeyKind::SecretOrDer(point) if point.len() == 65 && point[0] == 4);
        if !p256 {
            return Err(format!("auth.public_key_file: {path} is an EC key but not P-256 (ES256 needs prime256v1)"));
        }
        return Ok((key, vec![Algorithm::ES256]));
    }
    Err(format!("auth.public_key_file: {path} is not a PEM RSA or EC (P-256) public key"))
}

/// Where a request carries its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource<'a> {
    /// Nowhere.
    None,
    /// `?token=`, percent-decoded. A value that is not valid percent-encoding
    /// of UTF-8 comes back undecoded (cut to [`MAX_TOKEN_BYTES`] + 1 bytes),
    /// which [`Verifier::verify`] refuses as `Malformed`.
    Query(String),
    /// `Authorization: Bearer <token>` (scheme case-insensitive).
    Bearer(&'a str),
    /// A `ringside.bearer.<token>` entry in `Sec-WebSocket-Protocol`.
    Protocol {
        /// The token (after the prefix).
        token: String,
        /// The subprotocol to answer: `ringside` if the client offered it,
        /// else empty (then send no `Sec-WebSocket-Protocol`; browsers will
        /// fail such a handshake, so clients must offer `ringside` too). The
        /// same as [`selected_protocol`].
        echo: String,
    },
}

/// The token in `head`: `Authorization: Bearer` first, then a
/// `Sec-WebSocket-Protocol` entry `ringside.bearer.<token>` (the first such
/// entry), then the first `token` query parameter. Browsers use the second:
/// `new WebSocket(url, ["ringside.bearer." + jwt, "ringside"])`. The 101 must
/// then answer `Sec-WebSocket-Protocol: ringside` (see
/// [`selected_protocol`]); the token is never echoed back.
pub fn token_from(head: &Head) -> TokenSource<'_> {
    if let Some(token) = head.header("authorization").and_then(bearer) {
        return TokenSource::Bearer(token);
    }
    if let Some(token) = offered(head).find_map(|p| p.strip_prefix(BEARER_PREFIX)) {
        let echo = selected_protocol(head).unwrap_or("").to_string();
        return TokenSource::Protocol { token: token.to_string(), echo };
    }
    match query_param(head.query(), "token") {
        Some(raw) => TokenSource::Query(percent_decode(raw).unwrap_or_else(|| cut(raw))),
        None => TokenSource::None,
    }
}

/// The `Sec-WebSocket-Protocol` value the 101 response must carry:
/// `Some("ringside")` when the client offered `ringside` (whatever carried
/// its token), else `None` (send no such header). Bearer entries are never
/// selected.
pub fn selected_protocol(head: &Head) -> Option<&'static str> {
    offered(head).any(|p| p == PROTOCOL).then_some(PROTOCOL)
}

/// The subprotocols offered, across every `Sec-WebSocket-Protocol` header.
fn offered(head: &Head) -> impl Iterator<Item = &str> {
    head.request
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

/// The credentials of an `Authorization: Bearer <token>` value.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// The raw value of the first `name=` parameter of a query (`name` alone counts as empty).
fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| match pair.split_once('=') {
        Some((k, v)) if k == name => Some(v),
        None if pair == name => Some(""),
        _ => None,
    })
}

/// Strict percent-decoding: every `%` followed by two hex digits, the result
/// UTF-8 and at most [`MAX_TOKEN_BYTES`] bytes; `+` stays `+`.
fn percent_decode(s: &str) -> Option<String> {
    if s.len() > 3 * MAX_TOKEN_BYTES {
        return None;
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len().min(MAX_TOKEN_BYTES));
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = hex(*b.get(i + 1)?)?;
            let lo = hex(*b.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
        if out.len() > MAX_TOKEN_BYTES {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// At most [`MAX_TOKEN_BYTES`] + 1 bytes of `s`, on a character boundary.
fn cut(s: &str) -> String {
    let mut end = s.len().min(MAX_TOKEN_BYTES + 1);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";
    const NOW: u64 = 1_700_000_000;

    /// `openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt` (test only).
    const EC_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg6G0tR7fqnaDrKibx
40ybQxFdwR6SxMp5wa4TSqbwl3ChRANCAAR+Kdrh1o4sSm46oIRYlxhTSIu7Bwua
jtKnXQ+PagB00/BHyOiqyeIJz1mb9abnT8p3c3QJxkPdzhWMAXUB28HR
-----END PRIVATE KEY-----
";
    const EC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEfina4daOLEpuOqCEWJcYU0iLuwcL
mo7Sp10Pj2oAdNPwR8joqsniCc9Zm/Wm50/Kd3N0CcZD3c4VjAF1AdvB0Q==
-----END PUBLIC KEY-----
";
    /// `openssl genrsa 2048 | openssl pkcs8 -topk8 -nocrypt` (test only).
    const RSA_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCdoauMrqeFo01e
Jx8DDNzGL+nCakAU7J53zM3UUn454oiBZQGotCwtT1bPK51Er5Hh7SFZ9ET5ulhK
rJNiuuHx67/pEROBfVY13j9sk9tE2WhnDO5DrJ5ZDY1EzRBe9Ssp5rn8lsdaYuw9
YGnzqaww8NUO47GqCNNnDhV9WjuBBr+WkXcJFJL+Df5/nefiq0MCnkha7BsgIIfV
2c4aoaXgNV3dKQ/PKrL1tj3o8s4A5Hw3AZgMmedpNcXkVRl5dxqAiA9I+4ODFi2H
rVHYluffo+DGpQfVp+llFdNHq5EahttPe4/qv53lIQ82Uvl7WM6ey9xs6//cdb/O
cb/IlIs9AgMBAAECggEAJR4UjyPxPn6dkTYVD1rQAbr2iFkMjeDJz9vh+8URBABb
tFxcb6U9Yc302wOiHLJa36A+4jeqpkNC1xKcAfuPiK/CmNb0iOFCk5ypwp9uWl/3
PYzF7hmPj9ipEzJWUIXajBtQYDIA7z+r8Sfqyv2BFmUfRkpHY4qAfRvL46CDsnXN
tOhSqixKgLC0AIlwpiX8mTx/zWe8yhn+XGVVFoq6dcb0I+oHVM+cVmPyJysmgCRC
f/zVA9c1v5+94MFV0EP5dSPBRs++8CgpBvL+bSjWwFJXuazxaHH3JsN39kqMUQ5y
r2KBPoiL2THQMewODe6FHhx8zFXFGjtk+GGgDuGa4QKBgQDN+k8a/32lA50TrEpZ
4bIah0u3kXYR7Vmro8nWevbqzizkLjziZfdby23asdWYdrCF33G7Ykp08YsbnEKu
w7wj8VeOObgHJtA2ZvMLyCPv9XTTe5AoaBEnv2FWRs8fG7MbcQ7i2msg7z8iyF5e
5VjRh5q1AzHly77iZ42W4rJsPwKBgQDD6amdsCjVnAe7bVBZlvWpfW19HTWicwd7
m8Wf1ljUztuWTSUOgir168VkfaDluczvPOXomR7ZNI5waUNHP9pjGUFiflNyzo16
IO0lSDMzv5C6BETc8yxUJf5MAPPCW8/WuyuBHoAcUVv+roPusSE/ooMfCd3o9kvp
rnInTAsZgwKBgD0wiAGANsYnrakjfK744l0JJlAxMT8gIIxhytshimq0txdOOR4U
pogphcf7HnX9hHEwsOu2xmG5Q9b+87xRP3n5/0WsFeRh/ma67KbqXOqzI3KT+X5X
dAk3zGXCAVO/edTEIGT59+s/x6TAm3Bbd6g/PZFakp8uiNVfZ+uUCucnAoGBAK+n
aTTBJVugsi4SLOCmwUxd8TUkY1pr2GGzoNVW0f68GZYBRSBlBS/JXQpkuUY/+Mbn
yxtpbodA4BVZy8CuN5hypHUy3o8pMyA1NWsf+QiE0bZ27WdNgIlSJ1bt46B3wTm+
R5tVRXgeWmVXA2OX3T+47ed+aUDe0+GJT0B8pdcRAoGAax2caoafF/mUQBf1HyBv
Sd+4wHf5Q8Oo9fOgCWPzeUSjCb7qmWhPTrNLFvFIngp6DoyW/yfzBEiOEd/9IR/4
zYBv3ofxKAtqz47JHHSeplbxyR5411HUeO2atpCKPE0prSYYbrsVo95lN2nmu95i
a0Rx2E9x3mHiSb5SUs/kQKc=
-----END PRIVATE KEY-----
";
    const RSA_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAnaGrjK6nhaNNXicfAwzc
xi/pwmpAFOyed8zN1FJ+OeKIgWUBqLQsLU9WzyudRK+R4e0hWfRE+bpYSqyTYrrh
8eu/6RETgX1WNd4/bJPbRNloZwzuQ6yeWQ2NRM0QXvUrKea5/JbHWmLsPWBp86ms
MPDVDuOxqgjTZw4VfVo7gQa/lpF3CRSS/g3+f53n4qtDAp5IWuwbICCH1dnOGqGl
4DVd3SkPzyqy9bY96PLOAOR8NwGYDJnnaTXF5FUZeXcagIgPSPuDgxYth61R2Jbn
36PgxqUH1afpZRXTR6uRGobbT3uP6r+d5SEPNlL5e1jOnsvcbOv/3HW/znG/yJSL
PQIDAQAB
-----END PUBLIC KEY-----
";

    /// A file under the temp dir with `contents`, removed on drop.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(contents: &[u8]) -> TempFile {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("ringside-auth-{}-{n}", std::process::id()));
            std::fs::write(&path, contents).unwrap();
            TempFile(path)
        }

        fn path(&self) -> String {
            self.0.to_string_lossy().into_owned()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn hs_cfg() -> AuthConfig {
        AuthConfig { hmac_secret: SECRET.into(), leeway_secs: 5, ..AuthConfig::default() }
    }

    fn hs(claims: &Value) -> String {
        encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(SECRET.as_bytes()).unwrap()).unwrap()
    }

    fn es(claims: &Value) -> String {
        let key = EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap();
        encode(&Header::new(Algorithm::ES256), claims, &key).unwrap()
    }

    fn verifier(cfg: &AuthConfig) -> Verifier {
        Verifier::new(cfg).unwrap()
    }

    fn check(claims: Value) -> Result<Claims, TokenError> {
        verifier(&hs_cfg()).verify(&hs(&claims), NOW)
    }

    fn head(req: &str) -> Head {
        match crate::transport::http::parse(req.as_bytes(), 256 * 1024) {
            crate::transport::http::Parsed::Complete(h) => *h,
            other => panic!("not a complete head: {other:?}"),
        }
    }

    #[test]
    fn labels_are_stable_and_indexed() {
        let labels: Vec<_> = TokenError::ALL.iter().map(|e| e.reason()).collect();
        assert_eq!(
            labels,
            [
                "missing",
                "malformed",
                "bad_signature",
                "expired",
                "not_yet_valid",
                "bad_issuer",
                "bad_audience",
                "bad_claims"
            ]
        );
        for (i, e) in TokenError::ALL.iter().enumerate() {
            assert_eq!(e.index(), i);
            assert!(!e.text().is_empty() && !e.text().contains('\n'));
            assert_eq!(e.to_string(), e.text());
        }
    }

    #[test]
    fn verifier_is_send_sync() {
        fn shared<T: Send + Sync>() {}
        shared::<Verifier>();
        shared::<Claims>();
    }

    #[test]
    fn hs256_round_trip_and_defaults() {
        let c = check(json!({"sub": "alice", "exp": NOW + 60, "rooms": ["lobby", "chat.*"]})).unwrap();
        assert_eq!(&*c.sub, "alice");
        assert_eq!(c.exp, NOW + 60);
        assert_eq!(c.class, Class::Normal);
        assert!(c.rooms.allows("lobby") && c.rooms.allows("chat.x") && !c.rooms.allows("other"));
        assert_eq!(c.publish, c.rooms, "publish defaults to rooms");
        // No rooms at all: nothing allowed.
        let c = check(json!({"sub": "bob", "exp": NOW + 60})).unwrap();
        assert!(c.rooms.is_empty() && c.publish.is_empty() && !c.rooms.allows("lobby"));
        // Unknown claims are ignored.
        assert!(check(json!({"sub": "bob", "exp": NOW + 60, "whatever": {"x": [1, 2]}, "jti": "q"})).is_ok());
    }

    #[test]
    fn missing_malformed_and_oversized() {
        let v = verifier(&hs_cfg());
        assert_eq!(v.verify("", NOW), Err(TokenError::Missing));
        for bad in ["x", "a.b", "a.b.c", "...", "%%%.%%%.%%%", "a.b.c.d", "\u{e9}.\u{e9}.\u{e9}"] {
            assert_eq!(v.verify(bad, NOW), Err(TokenError::Malformed), "{bad}");
        }
        // A valid token padded past the bound is refused before parsing.
        let big = json!({"sub": "a", "exp": NOW + 60, "pad": "x".repeat(MAX_TOKEN_BYTES)});
        assert_eq!(v.verify(&hs(&big), NOW), Err(TokenError::Malformed));
        assert_eq!(v.verify(&"a".repeat(MAX_TOKEN_BYTES + 1), NOW), Err(TokenError::Malformed));
        // `alg: none` (unsigned) never passes.
        let unsigned = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhIiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        assert!(v.verify(unsigned, NOW).is_err());
        // A signed payload that is not an object.
        let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
        let t = encode(&Header::new(Algorithm::HS256), &json!([1, 2]), &key).unwrap();
        assert!(matches!(v.verify(&t, NOW), Err(TokenError::BadClaims | TokenError::Malformed)));
    }

    #[test]
    fn bad_signature() {
        let v = verifier(&hs_cfg());
        let t = hs(&json!({"sub": "a", "exp": NOW + 60}));
        // Another secret.
        let other = EncodingKey::from_secret(b"another-secret-another-secret-another").unwrap();
        let forged = encode(&Header::new(Algorithm::HS256), &json!({"sub": "a", "exp": NOW + 60}), &other).unwrap();
        assert_eq!(v.verify(&forged, NOW), Err(TokenError::BadSignature));
        // A tampered payload under the original signature.
        let parts: Vec<&str> = t.split('.').collect();
        let evil = hs(&json!({"sub": "admin", "exp": NOW + 60}));
        let evil_payload = evil.split('.').nth(1).unwrap();
        let spliced = format!("{}.{}.{}", parts[0], evil_payload, parts[2]);
        assert_eq!(v.verify(&spliced, NOW), Err(TokenError::BadSignature));
        // A garbled signature.
        let garbled = format!("{}.{}.{}", parts[0], parts[1], "AAAA");
        assert_eq!(v.verify(&garbled, NOW), Err(TokenError::BadSignature));
        // An algorithm the key does not sign with (ES256 token, HS256 node).
        assert_eq!(v.verify(&es(&json!({"sub": "a", "exp": NOW + 60})), NOW), Err(TokenError::BadSignature));
    }

    #[test]
    fn expiry_and_leeway_edges() {
        let v = verifier(&hs_cfg()); // leeway 5
        let at = |exp: u64| v.verify(&hs(&json!({"sub": "a", "exp": exp})), NOW);
        assert!(at(NOW).is_ok());
        assert!(at(NOW - 5).is_ok(), "exp == now - leeway is still valid");
        assert_eq!(at(NOW - 6), Err(TokenError::Expired), "exp == now - leeway - 1");
        assert_eq!(at(0), Err(TokenError::Expired));
        // exp is required and must be a non-negative number.
        assert_eq!(check(json!({"sub": "a"})), Err(TokenError::BadClaims));
        assert_eq!(check(json!({"sub": "a", "exp": "soon"})), Err(TokenError::BadClaims));
        assert_eq!(check(json!({"sub": "a", "exp": -1})), Err(TokenError::BadClaims));
        assert_eq!(check(json!({"sub": "a", "exp": (NOW + 60) as f64 + 0.5})).unwrap().exp, NOW + 60);
        // No leeway: exp == now is the last valid second.
        let strict = verifier(&AuthConfig { leeway_secs: 0, ..hs_cfg() });
        assert!(strict.verify(&hs(&json!({"sub": "a", "exp": NOW})), NOW).is_ok());
        assert_eq!(strict.verify(&hs(&json!({"sub": "a", "exp": NOW - 1})), NOW), Err(TokenError::Expired));
        // Huge values do not overflow.
        assert!(v.verify(&hs(&json!({"sub": "a", "exp": u64::MAX})), u64::MAX).is_ok());
    }

    #[test]
    fn not_before() {
        let v = verifier(&hs_cfg()); // leeway 5
        let at = |nbf: Value| v.verify(&hs(&json!({"sub": "a", "exp": NOW + 600, "nbf": nbf})), NOW);
        assert!(at(json!(NOW)).is_ok());
        assert!(at(json!(NOW + 5)).is_ok(), "nbf == now + leeway is valid");
        assert_eq!(at(json!(NOW + 6)), Err(TokenError::NotYetValid));
        assert!(at(json!(null)).is_ok(), "null nbf counts as absent");
        assert_eq!(at(json!("later")), Err(TokenError::BadClaims));
    }

    #[test]
    fn issuer_and_audience() {
        let cfg = AuthConfig { issuer: "https://id.example".into(), audience: "ringside".into(), ..hs_cfg() };
        let v = verifier(&cfg);
        let t = |c: Value| v.verify(&hs(&c), NOW);
        let exp = NOW + 60;
        assert!(t(json!({"sub": "a", "exp": exp, "iss": "https://id.example", "aud": "ringside"})).is_ok());
        assert!(t(json!({"sub": "a", "exp": exp, "iss": "https://id.example", "aud": ["x", "ringside"]})).is_ok());
        assert_eq!(
            t(json!({"sub": "a", "exp": exp, "iss": "https://evil.example", "aud": "ringside"})),
            Err(TokenError::BadIssuer)
        );
        assert_eq!(t(json!({"sub": "a", "exp": exp, "aud": "ringside"})), Err(TokenError::BadIssuer));
        assert_eq!(t(json!({"sub": "a", "exp": exp, "iss": 5, "aud": "ringside"})), Err(TokenError::BadIssuer));
        assert_eq!(
            t(json!({"sub": "a", "exp": exp, "iss": "https://id.example", "aud": "other"})),
            Err(TokenError::BadAudience)
        );
        assert_eq!(
            t(json!({"sub": "a", "exp": exp, "iss": "https://id.example", "aud": ["x", "y"]})),
            Err(TokenError::BadAudience)
        );
        assert_eq!(t(json!({"sub": "a", "exp": exp, "iss": "https://id.example"})), Err(TokenError::BadAudience));
        // Not configured: iss and aud are not checked.
        assert!(check(json!({"sub": "a", "exp": exp, "iss": "anyone", "aud": "anything"})).is_ok());
    }

    #[test]
    fn subject_validation() {
        let exp = NOW + 60;
        assert!(check(json!({"sub": "A-z_09", "exp": exp})).is_ok());
        assert!(check(json!({"sub": "x".repeat(64), "exp": exp})).is_ok());
        for bad in [json!(""), json!("x".repeat(65)), json!("a b"), json!("a\"b"), json!("é"), json!(7), json!(null)] {
            assert_eq!(check(json!({"sub": bad, "exp": exp})), Err(TokenError::BadClaims), "{bad}");
        }
        assert_eq!(check(json!({"exp": exp})), Err(TokenError::BadClaims));
    }

    #[test]
    fn rooms_and_publish() {
        let exp = NOW + 60;
        let c = check(json!({"sub": "a", "exp": exp, "rooms": ["*"], "publish": ["news", "chat.*"]})).unwrap();
        assert!(c.rooms.allows("anything") && c.rooms.allows("x"));
        assert!(c.publish.allows("news") && c.publish.allows("chat.") && c.publish.allows("chat.room-1"));
        assert!(!c.publish.allows("chat") && !c.publish.allows("news2") && !c.publish.allows("other"));
        // An explicit empty publish list: may join, may not publish.
        let c = check(json!({"sub": "a", "exp": exp, "rooms": ["lobby"], "publish": []})).unwrap();
        assert!(c.rooms.allows("lobby") && !c.publish.allows("lobby"));
        // Invalid patterns, wrong types, too many.
        for bad in [
            json!(["a*b"]),
            json!(["**"]),
            json!(["chat.**"]),
            json!(["has space"]),
            json!([""]),
            json!(["x".repeat(129)]),
            json!([format!("{}*", "x".repeat(128))]),
            json!([1]),
            json!("lobby"),
            json!({"lobby": true}),
        ] {
            assert_eq!(check(json!({"sub": "a", "exp": exp, "rooms": bad})), Err(TokenError::BadClaims), "{bad}");
            assert_eq!(check(json!({"sub": "a", "exp": exp, "publish": bad})), Err(TokenError::BadClaims), "{bad}");
        }
        let many: Vec<String> = (0..=MAX_PATTERNS).map(|i| format!("r{i}")).collect();
        assert_eq!(check(json!({"sub": "a", "exp": exp, "rooms": many})), Err(TokenError::BadClaims));
        let most: Vec<String> = (0..MAX_PATTERNS).map(|i| format!("r{i}")).collect();
        let c = check(json!({"sub": "a", "exp": exp, "rooms": most})).unwrap();
        assert!(c.rooms.allows("r0") && c.rooms.allows("r255") && !c.rooms.allows("r256"));
        // Null counts as absent.
        let c = check(json!({"sub": "a", "exp": exp, "rooms": ["x"], "publish": null})).unwrap();
        assert!(c.publish.allows("x"));
    }

    #[test]
    fn patterns_direct() {
        let p = Patterns::parse(["b", "a", "b", "p.*", "p.*", "q*"]).unwrap();
        assert!(p.allows("a") && p.allows("b") && p.allows("p.1") && p.allows("qq") && p.allows("q"));
        assert!(!p.allows("c") && !p.allows("p") && !p.allows(""));
        assert!(Patterns::all().allows("z") && !Patterns::none().allows("z"));
        assert!(Patterns::parse(["*x"]).is_none());
    }

    #[test]
    fn class_claim() {
        let exp = NOW + 60;
        assert_eq!(check(json!({"sub": "a", "exp": exp})).unwrap().class, Class::Normal);
        for c in Class::ALL {
            assert_eq!(check(json!({"sub": "a", "exp": exp, "class": c.name()})).unwrap().class, c);
        }
        for bad in [json!("urgent"), json!("HIGH"), json!(3)] {
            assert_eq!(check(json!({"sub": "a", "exp": exp, "class": bad})), Err(TokenError::BadClaims));
        }
    }

    #[test]
    fn es256_from_public_key_file() {
        let file = TempFile::new(EC_PUBLIC.as_bytes());
        let cfg = AuthConfig { public_key_file: file.path(), ..AuthConfig::default() };
        let v = verifier(&cfg);
        assert_eq!(v.algorithms(), [Algorithm::ES256]);
        let c = v.verify(&es(&json!({"sub": "eve", "exp": NOW + 60, "class": "critical"})), NOW).unwrap();
        assert_eq!((&*c.sub, c.class), ("eve", Class::Critical));
        // An HS256 token "signed" with the public key's bytes (algorithm confusion).
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "eve", "exp": NOW + 60}),
            &EncodingKey::from_secret(EC_PUBLIC.as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(v.verify(&confused, NOW), Err(TokenError::BadSignature));
        assert_eq!(v.verify(&hs(&json!({"sub": "eve", "exp": NOW + 60})), NOW), Err(TokenError::BadSignature));
    }

    #[test]
    fn rs256_from_public_key_file() {
        let file = TempFile::new(RSA_PUBLIC.as_bytes());
        let v = verifier(&AuthConfig { public_key_file: file.path(), ..AuthConfig::default() });
        assert!(v.algorithms().contains(&Algorithm::RS256));
        let key = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
        let t = encode(&Header::new(Algorithm::RS256), &json!({"sub": "r", "exp": NOW + 60}), &key).unwrap();
        assert_eq!(&*v.verify(&t, NOW).unwrap().sub, "r");
        assert_eq!(v.verify(&es(&json!({"sub": "r", "exp": NOW + 60})), NOW), Err(TokenError::BadSignature));
    }

    #[test]
    fn secret_file() {
        let file = TempFile::new(format!("{SECRET}\n").as_bytes());
        let v = verifier(&AuthConfig { hmac_secret_file: file.path(), ..AuthConfig::default() });
        assert!(v.verify(&hs(&json!({"sub": "a", "exp": NOW + 60})), NOW).is_ok(), "trailing newline ignored");
        let crlf = TempFile::new(format!("{SECRET}\r\n").as_bytes());
        let v = verifier(&AuthConfig { hmac_secret_file: crlf.path(), ..AuthConfig::default() });
        assert!(v.verify(&hs(&json!({"sub": "a", "exp": NOW + 60})), NOW).is_ok());
    }

    #[test]
    fn new_errors_name_the_key() {
        let err = |cfg: AuthConfig| Verifier::new(&cfg).unwrap_err();
        let e = err(AuthConfig::default());
        assert!(e.starts_with("auth.hmac_secret:") && e.contains("auth.public_key_file"), "{e}");
        let e = err(AuthConfig { hmac_secret_file: "/x".into(), ..hs_cfg() });
        assert!(e.contains("exactly one"), "{e}");
        let e = err(AuthConfig { hmac_secret: "short".into(), ..AuthConfig::default() });
        assert!(e.starts_with("auth.hmac_secret:"), "{e}");
        let missing = "/nonexistent/ringside/secret";
        let e = err(AuthConfig { hmac_secret_file: missing.into(), ..AuthConfig::default() });
        assert!(e.starts_with("auth.hmac_secret_file:") && e.contains(missing), "{e}");
        for empty in [&b""[..], b"\n", b"\r\n"] {
            let f = TempFile::new(empty);
            let e = err(AuthConfig { hmac_secret_file: f.path(), ..AuthConfig::default() });
            assert!(e.starts_with("auth.hmac_secret_file:") && e.contains("empty"), "{e}");
        }
        let f = TempFile::new(b"too-short\n");
        let e = err(AuthConfig { hmac_secret_file: f.path(), ..AuthConfig::default() });
        assert!(e.starts_with("auth.hmac_secret_file:") && e.contains("32"), "{e}");
        let e = err(AuthConfig { public_key_file: missing.into(), ..AuthConfig::default() });
        assert!(e.starts_with("auth.public_key_file:") && e.contains(missing), "{e}");
        for junk in [&b"not a pem"[..], b"", EC_PRIVATE.as_bytes(), RSA_PRIVATE.as_bytes()] {
            let f = TempFile::new(junk);
            let e = err(AuthConfig { public_key_file: f.path(), ..AuthConfig::default() });
            assert!(e.starts_with("auth.public_key_file:"), "{e}");
        }
    }

    #[test]
    fn token_sources() {
        let base = "GET /ws HTTP/1.1\r\nHost: x\r\n";
        let h = head(&format!("{base}\r\n"));
        assert_eq!(token_from(&h), TokenSource::None);
        assert_eq!(selected_protocol(&h), None);

        let h = head(&format!("{base}Authorization: Bearer  abc.def.ghi \r\n\r\n"));
        assert_eq!(token_from(&h), TokenSource::Bearer("abc.def.ghi"));
        let h = head(&format!("{base}authorization: bEaReR t1\r\n\r\n"));
        assert_eq!(token_from(&h), TokenSource::Bearer("t1"));
        let h = head(&format!("{base}Authorization: Basic dXNlcjpwdw==\r\n\r\n"));
        assert_eq!(token_from(&h), TokenSource::None, "other schemes are not tokens");

        let h = head("GET /ws?room=a&token=a.b%2Ec&x=1 HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(token_from(&h), TokenSource::Query("a.b.c".into()));
        let h = head("GET /ws?token=first&token=second HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(token_from(&h), TokenSource::Query("first".into()));
        let h = head("GET /ws?mytoken=x&token HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(token_from(&h), TokenSource::Query(String::new()));
        let h = head("GET /ws?token=a+b%7e HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(token_from(&h), TokenSource::Query("a+b~".into()));
    }

    #[test]
    fn strict_percent_decoding() {
        assert_eq!(percent_decode("%41%62c").as_deref(), Some("Abc"));
        assert_eq!(percent_decode("%C3%A9").as_deref(), Some("é"));
        for bad in ["%", "%4", "%zz", "%4g", "a%", "%FF", "%C3"] {
            assert_eq!(percent_decode(bad), None, "{bad}");
        }
        assert_eq!(percent_decode(&"a".repeat(MAX_TOKEN_BYTES)).map(|s| s.len()), Some(MAX_TOKEN_BYTES));
        assert_eq!(percent_decode(&"a".repeat(MAX_TOKEN_BYTES + 1)), None);
        assert_eq!(percent_decode(&"%41".repeat(MAX_TOKEN_BYTES + 1)), None);
        // Undecodable values come back raw and fail as malformed; long ones are cut.
        let v = verifier(&hs_cfg());
        let h = head("GET /ws?token=ab%zz.cd.ef HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(token_from(&h), TokenSource::Query("ab%zz.cd.ef".into()));
        assert_eq!(v.verify("ab%zz.cd.ef", NOW), Err(TokenError::Malformed));
        let long = format!("GET /ws?token={} HTTP/1.1\r\nHost: x\r\n\r\n", "%41".repeat(MAX_TOKEN_BYTES + 100));
        let TokenSource::Query(q) = token_from(&head(&long)) else { panic!("expected a query token") };
        assert_eq!(q.len(), MAX_TOKEN_BYTES + 1);
        assert_eq!(v.verify(&q, NOW), Err(TokenError::Malformed));
        assert_eq!(cut("é"), "é");
    }

    #[test]
    fn subprotocol_token_and_selection() {
        let base = "GET /ws HTTP/1.1\r\nHost: x\r\n";
        let t = hs(&json!({"sub": "web", "exp": NOW + 60}));
        let h = head(&format!("{base}Sec-WebSocket-Protocol: ringside.bearer.{t}, ringside\r\n\r\n"));
        assert_eq!(token_from(&h), TokenSource::Protocol { token: t.clone(), echo: "ringside".into() });
        assert_eq!(selected_protocol(&h), Some("ringside"));
        assert!(verifier(&hs_cfg()).verify(&t, NOW).is_ok());
        // Without "ringside" offered there is nothing to select.
        let h = head(&format!("{base}Sec-WebSocket-Protocol: ringside.bearer.{t}\r\n\r\n"));
        assert_eq!(token_from(&h), TokenSource::Protocol { token: t.clone(), echo: String::new() });
        assert_eq!(selected_protocol(&h), None);
        // Offered over several headers, in any order, with odd spacing.
        let h = head(&format!(
            "{base}Sec-WebSocket-Protocol: ringside ,chat\r\nSec-WebSocket-Protocol: ringside.bearer.t2\r\n\r\n"
        ));
        assert_eq!(token_from(&h), TokenSource::Protocol { token: "t2".into(), echo: "ringside".into() });
        // "ringside" alone (token elsewhere) is still selected.
        let h = head(&format!("{base}Sec-WebSocket-Protocol: chat, ringside\r\n\r\n"));
        assert_eq!(token_from(&h), TokenSource::None);
        assert_eq!(selected_protocol(&h), Some("ringside"));
        let h = head(&format!("{base}Sec-WebSocket-Protocol: ringsidex, ringside.bearer\r\n\r\n"));
        assert_eq!((token_from(&h), selected_protocol(&h)), (TokenSource::None, None));
    }

    #[test]
    fn source_priority() {
        let all = "GET /ws?token=q HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer h\r\n\
                   Sec-WebSocket-Protocol: ringside.bearer.p, ringside\r\n\r\n";
        assert_eq!(token_from(&head(all)), TokenSource::Bearer("h"));
        assert_eq!(selected_protocol(&head(all)), Some("ringside"));
        let no_auth = "GET /ws?token=q HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Protocol: ringside.bearer.p\r\n\r\n";
        assert_eq!(token_from(&head(no_auth)), TokenSource::Protocol { token: "p".into(), echo: String::new() });
        let query_only = "GET /ws?token=q HTTP/1.1\r\nHost: x\r\nAuthorization: Basic Zm9v\r\n\r\n";
        assert_eq!(token_from(&head(query_only)), TokenSource::Query("q".into()));
    }
}
