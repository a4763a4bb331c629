//! Who is looking at a page: sign-in sessions, and what guards the UI's changes.
//!
//! A session is a cookie `v1.<user>.<expiry>.<mac>`: the user name (base64url), its expiry
//! (unix seconds) and an HMAC-SHA256 over both and the user's current credential stamp, keyed
//! from the secret every replica shares (so a session made on one replica holds on all of
//! them, and a changed password or a removed user ends it). Nothing is stored server-side.
//!
//! Changes (tag deletes, sign-out) are POSTs that must carry the session's CSRF token (an HMAC
//! of the cookie) and must not come from another site: an `Origin` naming another host, or
//! `Sec-Fetch-Site: cross-site`/`same-site`, is refused before anything is looked at. The
//! cookie is `HttpOnly`, `SameSite=Strict`, scoped to `/ui`, and `Secure` under TLS.

use axum::http::{HeaderMap, header};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::auth::Caller;
use crate::state::AppState;

/// The session cookie's name.
pub const COOKIE: &str = "berth_session";

/// Why a session could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The shared secret could not be read from the metadata.
    #[error("session key: {0}")]
    Key(#[from] berth_storage::Error),
    /// The HMAC refused the key (it takes any length; kept typed rather than a panic).
    #[error("session key: {0}")]
    Mac(#[from] hmac::digest::InvalidLength),
}

/// The key sessions are signed with, derived from the replicas' shared secret.
async fn key(state: &AppState) -> Result<Hmac<Sha256>, SessionError> {
    let secret = state.store().shared_secret().await?;
    let mut derive = Hmac::<Sha256>::new_from_slice(secret)?;
    derive.update(b"berth ui session v1");
    let k = derive.finalize().into_bytes();
    Ok(Hmac::<Sha256>::new_from_slice(&k)?)
}

fn stamp(state: &AppState, user: &str) -> Option<String> {
    state.auth.as_deref()?.credential_stamp(user)
}

fn mac_hex(mut mac: Hmac<Sha256>, parts: &[&str]) -> String {
    for p in parts {
        mac.update(p.as_bytes());
        mac.update(b"\0");
    }
    hex::encode(mac.finalize().into_bytes())
}

/// A signed session value for `user`, valid until `expires` (unix seconds); `None` when the
/// user has no credential (it could never be checked).
pub async fn issue(
    state: &AppState,
    user: &str,
    expires: i64,
) -> Result<Option<String>, SessionError> {
    let Some(stamp) = stamp(state, user) else {
        return Ok(None);
    };
    let name = URL_SAFE_NO_PAD.encode(user);
    let exp = expires.to_string();
    let mac = mac_hex(key(state).await?, &[&name, &exp, &stamp]);
    Ok(Some(format!("v1.{name}.{exp}.{mac}")))
}

/// The user a session value names, if it is genuine, unexpired and the user's credential is
/// unchanged.
pub async fn verify(
    state: &AppState,
    value: &str,
    now: i64,
) -> Result<Option<String>, SessionError> {
    let mut parts = value.split('.');
    let (Some("v1"), Some(name), Some(exp), Some(mac), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Ok(None);
    };
    let Ok(expires) = exp.parse::<i64>() else {
        return Ok(None);
    };
    if expires <= now {
        return Ok(None);
    }
    let Some(user) = URL_SAFE_NO_PAD
        .decode(name)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
    else {
        return Ok(None);
    };
    let Some(stamp) = stamp(state, &user) else {
        return Ok(None);
    };
    let Ok(given) = hex::decode(mac) else {
        return Ok(None);
    };
    let mut check = key(state).await?;
    for p in [name, exp, stamp.as_str()] {
        check.update(p.as_bytes());
        check.update(b"\0");
    }
    Ok(check.verify_slice(&given).is_ok().then_some(user))
}

/// The session cookie's value in `headers`, if any.
pub fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// A `Set-Cookie` value holding `value` for `max_age` seconds (0 clears it).
pub fn set_cookie(state: &AppState, value: &str, max_age: u64) -> String {
    let secure = if state.config.tls.enabled() {
        "; Secure"
    } else {
        ""
    };
    format!("{COOKIE}={value}; Path=/ui; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}")
}

/// Who is looking, and the token their changes must carry.
#[derive(Debug, Clone)]
pub struct Viewer {
    /// The caller, as the API's policy sees it.
    pub caller: Caller,
    /// The signed-in user, if any.
    pub user: Option<String>,
    /// The CSRF token forms carry (empty: this viewer may change nothing).
    pub csrf: String,
}

/// The viewer of a request: with auth off, anyone (like the API); else the session's user,
/// or anonymous.
pub async fn viewer(state: &AppState, headers: &HeaderMap) -> Result<Viewer, SessionError> {
    if state.auth.is_none() {
        let csrf = mac_hex(key(state).await?, &["csrf", "open"]);
        return Ok(Viewer {
            caller: Caller::Open,
            user: None,
            csrf,
        });
    }
    if let Some(value) = cookie(headers)
        && let Some(user) = verify(state, value, berth_storage::meta::now()).await?
    {
        let csrf = mac_hex(key(state).await?, &["csrf", value]);
        return Ok(Viewer {
            caller: Caller::User(user.clone()),
            user: Some(user),
            csrf,
        });
    }
    Ok(Viewer {
        caller: Caller::Anonymous,
        user: None,
        csrf: String::new(),
    })
}

/// Whether `given` is the viewer's CSRF token (compared in time that depends only on the
/// lengths).
pub fn csrf_ok(viewer: &Viewer, given: &str) -> bool {
    let (a, b) = (viewer.csrf.as_bytes(), given.as_bytes());
    !a.is_empty()
        && a.len() == b.len()
        && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a state-changing request comes from this site: a browser's `Sec-Fetch-Site` must
/// be `same-origin` (or `none`, typed by the user), and an `Origin` must name the host the
/// request was sent to. A request with neither (not a browser) passes here; it still needs
/// the CSRF token.
pub fn same_site(headers: &HeaderMap) -> bool {
    let text = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site")
        && !matches!(site, "same-origin" | "none")
    {
        return false;
    }
    match text("origin") {
        None => true,
        Some(origin) => {
            let host = text("host").unwrap_or("");
            let origin_host = origin
                .split_once("://")
                .map_or("", |(_, rest)| rest.trim_end_matches('/'));
            !host.is_empty() && origin_host.eq_ignore_ascii_case(host)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn only_same_origin_requests_pass() {
        assert!(same_site(&headers(&[("host", "r.example:5000")])));
        assert!(same_site(&headers(&[
            ("host", "r.example:5000"),
            ("origin", "https://r.example:5000"),
            ("sec-fetch-site", "same-origin"),
        ])));
        assert!(!same_site(&headers(&[
            ("host", "r.example:5000"),
            ("origin", "https://evil.example"),
        ])));
        assert!(!same_site(&headers(&[
            ("host", "r.example:5000"),
            ("sec-fetch-site", "cross-site"),
        ])));
        assert!(!same_site(&headers(&[
            ("host", "r.example:5000"),
            ("sec-fetch-site", "same-site"),
        ])));
        assert!(!same_site(&headers(&[("origin", "null")])));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let h = headers(&[("cookie", "a=1; berth_session=v1.x.2.ab; b=3")]);
        assert_eq!(cookie(&h), Some("v1.x.2.ab"));
        assert_eq!(cookie(&headers(&[("cookie", "a=1")])), None);
    }
}
