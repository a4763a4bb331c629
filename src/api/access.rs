//! Access control on the distribution API, as HTTP: the caller's address and credentials go
//! to [`AuthService::decide`], and its typed decision is rendered here (a challenge with the
//! exact scope, a `403`, a `429`).
//!
//! Checked before the handler looks anything up, so an anonymous request for a private
//! repository gets the same 401 whether the repository exists or not.

use std::net::IpAddr;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use berth_auth::{Actions, Challenge, ChallengeError, Scope};
use serde_json::json;

use super::error::{ApiError, Code};
use super::operation::{Access, Operation};
use crate::auth::{AuthService, Caller, Decision, Denial};
use crate::config::AuthMode;
use crate::state::AppState;

/// The token endpoint URL to announce: configured, or built from how the client reached us.
pub fn realm(state: &AppState, auth: &AuthService, headers: &HeaderMap) -> String {
    if let Some(r) = auth.realm() {
        return r.to_owned();
    }
    let scheme = if state.config.tls.enabled() {
        "https"
    } else {
        "http"
    };
    // Only a plausible host[:port] is echoed back; anything else falls back to localhost.
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("localhost");
    format!("{scheme}://{host}/auth/token")
}

/// The challenge for a request needing `scopes`.
fn challenge(
    state: &AppState,
    auth: &AuthService,
    headers: &HeaderMap,
    scopes: &[Scope],
    error: Option<ChallengeError>,
) -> Challenge {
    match auth.mode() {
        AuthMode::Token => Challenge::Bearer {
            realm: realm(state, auth, headers),
            service: auth.service().to_owned(),
            scopes: scopes.to_vec(),
            error,
        },
        _ => Challenge::Basic {
            realm: "Berth".to_owned(),
        },
    }
}

fn detail(scopes: &[Scope]) -> serde_json::Value {
    scopes
        .iter()
        .map(
            |s| json!({ "Type": s.kind.as_str(), "Name": s.name, "Action": s.actions.to_string() }),
        )
        .collect()
}

/// A 401 with a challenge.
pub fn unauthorized(challenge: &Challenge, message: &str, scopes: &[Scope]) -> Response {
    let mut e = ApiError::new(Code::Unauthorized, message);
    if !scopes.is_empty() {
        e = e.with_detail(detail(scopes));
    }
    match HeaderValue::from_str(&challenge.to_string()) {
        Ok(v) => e.with_header(header::WWW_AUTHENTICATE, v).into_response(),
        Err(_) => e.into_response(),
    }
}

/// A 429 for a client that failed to log in too often.
pub fn too_many(retry: std::time::Duration) -> Response {
    let secs = retry.as_secs().max(1).to_string();
    let e = ApiError::new(
        Code::TooManyRequests,
        "too many failed logins from this address; try again later",
    );
    match HeaderValue::from_str(&secs) {
        Ok(v) => e.with_header(header::RETRY_AFTER, v).into_response(),
        Err(_) => e.into_response(),
    }
}

/// Identifies the caller and checks it may make this request; the answer to send otherwise.
pub async fn authorize(
    state: &AppState,
    op: &Operation,
    headers: &HeaderMap,
    ip: IpAddr,
) -> Result<Caller, Response> {
    let Some(auth) = state.auth.as_deref() else {
        return Ok(Caller::Open);
    };
    let scopes = op.scopes();
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let ping = op.route.access == Access::SignedIn;
    let denial = match auth.decide(authorization, ip, &scopes, ping).await {
        Decision::Allow(caller) => return Ok(caller),
        Decision::Deny(d) => d,
    };
    Err(match denial {
        Denial::TooManyFailures(d) => too_many(d),
        Denial::Unauthenticated { error, reason } => {
            let c = challenge(state, auth, headers, &scopes, error);
            unauthorized(&c, reason, &scopes)
        }
        Denial::InsufficientScope => {
            let c = challenge(
                state,
                auth,
                headers,
                &scopes,
                Some(ChallengeError::InsufficientScope),
            );
            unauthorized(&c, "the token does not grant this access", &scopes)
        }
        Denial::Forbidden => {
            ApiError::new(Code::Denied, "requested access to the resource is denied")
                .with_detail(detail(&scopes))
                .with_status(StatusCode::FORBIDDEN)
                .into_response()
        }
    })
}

/// Whether the caller may pull `repo` (cross-repository mount sources).
pub fn may_pull(state: &AppState, caller: &Caller, repo: &str) -> bool {
    crate::auth::permits(
        state.auth.as_deref(),
        caller,
        &[Scope::repository(repo, Actions::PULL)],
    )
}

/// Whether the caller may mount a blob without naming its source: only when nothing is
/// private (no auth) or for admins, since the blob may live only in repositories the caller
/// cannot read.
pub fn may_mount_anywhere(state: &AppState, caller: &Caller) -> bool {
    match state.auth.as_deref() {
        None => true,
        Some(a) => a.policy().is_admin(caller.user()),
    }
}
