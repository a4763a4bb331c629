//! The built-in token service at `/auth/token` (Docker token spec).
//!
//! - `GET` with optional Basic credentials, `service`, `scope` (repeatable), `offline_token`:
//!   what docker, podman, skopeo and containerd use.
//! - `POST` form with `grant_type=password` or `refresh_token` (OAuth2): what containerd tries
//!   first and docker uses with a stored identity token.
//!
//! A token grants the intersection of what was asked and what the policy allows, never an
//! error for a partly allowed scope; only wrong credentials are refused (401, rate-limited per
//! client address).

use std::time::{Duration, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use berth_auth::{Challenge, Credentials, Scope};
use berth_storage::RepoName;
use serde_json::json;

use super::access::too_many;
use super::headers::query;
use crate::auth::{AuthService, Rejection, client_ip};
use crate::state::AppState;

/// Largest POST form accepted.
const FORM_LIMIT: usize = 64 * 1024;

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({ "error": error, "error_description": description }).to_string(),
    )
        .into_response()
}

fn reject(r: Rejection) -> Response {
    match r {
        Rejection::TooManyFailures(d) => too_many(d),
        _ => {
            let mut resp = oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_grant",
                "invalid username, password or refresh token",
            );
            let c = Challenge::Basic {
                realm: "Berth".to_owned(),
            };
            if let Ok(v) = c.to_string().parse() {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            resp
        }
    }
}

/// The scopes asked for that name something grantable: repository names must pass the OCI
/// grammar, so no trick spelling (`..`, `%2F`, upper case) ever reaches a token.
fn asked(values: impl IntoIterator<Item = String>) -> Vec<Scope> {
    let scopes = values
        .into_iter()
        .flat_map(|v| Scope::parse_list(&v))
        .filter(|s| match s.kind {
            berth_auth::ResourceType::Repository => s.name.parse::<RepoName>().is_ok(),
            berth_auth::ResourceType::Registry => s.name == "catalog",
            berth_auth::ResourceType::Other(_) => false,
        });
    berth_auth::scope::merge(scopes)
}

fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

struct Grant<'a> {
    user: Option<&'a str>,
    scopes: Vec<Scope>,
    refresh: Option<String>,
    oauth: bool,
}

fn answer(auth: &AuthService, g: Grant<'_>) -> Response {
    let Some(issuer) = auth.issuer() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let granted: Vec<Scope> = auth
        .policy()
        .grant(g.user, &g.scopes)
        .into_iter()
        .filter(|s| !s.actions.is_empty())
        .collect();
    let issued = match issuer.issue(g.user.unwrap_or(""), &granted) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "issuing a token");
            return oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "");
        }
    };
    tracing::debug!(
        user = g.user.unwrap_or(""),
        granted = %granted.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "),
        "token issued"
    );
    let mut body = json!({
        "token": issued.token,
        "access_token": issued.token,
        "expires_in": issued.expires_in,
        "issued_at": rfc3339(issued.issued_at),
    });
    if g.oauth {
        body["scope"] = json!(
            granted
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    if let Some(r) = g.refresh {
        body["refresh_token"] = json!(r);
    }
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}

fn wrong_service(auth: &AuthService, service: Option<&str>) -> Option<Response> {
    service
        .filter(|s| !s.is_empty() && *s != auth.service())
        .map(|s| {
            oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("unknown service {s:?}"),
            )
        })
}

fn refresh_for(auth: &AuthService, user: &str) -> Option<String> {
    let stamp = auth.credential_stamp(user)?;
    auth.issuer()
        .and_then(|i| i.issue_refresh(user, &stamp).ok())
}

/// `GET /auth/token`.
pub(super) async fn get(State(state): State<AppState>, req: Request) -> Response {
    let Some(auth) = state.auth.clone().filter(|a| a.issuer().is_some()) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let q = query(req.uri());
    let one = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    if let Some(r) = wrong_service(&auth, one("service")) {
        return r;
    }
    let ip = client_ip(&req, &state.config.auth.trusted_proxies);
    let headers = req.headers();
    let credentials = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(Credentials::parse);
    let user = match credentials {
        None | Some(Credentials::Bearer(_) | Credentials::Other) => None,
        Some(Credentials::Malformed) => return reject(Rejection::BadCredentials),
        Some(Credentials::Basic { user, password }) => {
            if let Err(r) = auth.login(ip, &user, &password).await {
                return reject(r);
            }
            Some(user)
        }
    };
    let scopes = asked(
        q.iter()
            .filter(|(k, _)| k == "scope")
            .map(|(_, v)| v.clone()),
    );
    let refresh = match (&user, one("offline_token")) {
        (Some(u), Some("true")) => refresh_for(&auth, u),
        _ => None,
    };
    answer(
        &auth,
        Grant {
            user: user.as_deref(),
            scopes,
            refresh,
            oauth: false,
        },
    )
}

/// `POST /auth/token` (OAuth2 password and refresh_token grants).
pub(super) async fn post(State(state): State<AppState>, req: Request) -> Response {
    let Some(auth) = state.auth.clone().filter(|a| a.issuer().is_some()) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let ip = client_ip(&req, &state.config.auth.trusted_proxies);
    let Ok(body) = axum::body::to_bytes(Body::new(req.into_body()), FORM_LIMIT).await else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "form too large");
    };
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let one = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    if let Some(r) = wrong_service(&auth, one("service")) {
        return r;
    }
    if one("client_id").is_none_or(str::is_empty) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "client_id is required",
        );
    }
    let offline = one("access_type") == Some("offline");
    let (user, refresh) = match one("grant_type") {
        Some("password") => {
            let (Some(u), Some(p)) = (one("username"), one("password")) else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "username and password are required",
                );
            };
            if let Err(r) = auth.login(ip, u, p).await {
                return reject(r);
            }
            let refresh = offline.then(|| refresh_for(&auth, u)).flatten();
            (u.to_owned(), refresh)
        }
        Some("refresh_token") => {
            let Some(t) = one("refresh_token") else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "refresh_token is required",
                );
            };
            let subject = auth
                .issuer()
                .and_then(|i| i.verify_refresh(t).ok())
                // The user still exists, with the password the token was issued for.
                .filter(|(s, stamp)| auth.credential_stamp(s).as_ref() == Some(stamp))
                .map(|(s, _)| s);
            let Some(subject) = subject else {
                let r = auth.failed(ip).err().unwrap_or(Rejection::BadCredentials);
                return reject(r);
            };
            (subject, Some(t.to_owned()))
        }
        _ => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "grant_type must be password or refresh_token",
            );
        }
    };
    let scopes = asked(one("scope").map(str::to_owned));
    answer(
        &auth,
        Grant {
            user: Some(&user),
            scopes,
            refresh,
            oauth: true,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_names_are_asked_for() {
        let got = asked([
            "repository:team/app:pull repository:Team/App:pull".to_owned(),
            "repository:team/../x:pull repository:team%2Fx:pull registry:catalog:*".to_owned(),
            "repository:team/app:push repository(plugin):p:pull thing:x:pull".to_owned(),
        ]);
        let s: Vec<String> = got.iter().map(ToString::to_string).collect();
        assert_eq!(
            s,
            [
                "repository:team/app:pull,push",
                "registry:catalog:*",
                "repository:p:pull"
            ]
        );
    }

    #[test]
    fn issued_at_is_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
