//! Authentication and authorization for the server: who is calling, and may they do this.
//!
//! Built from `[auth]` at start-up. [`AuthService::decide`] is the one place a request's access
//! is decided; it returns a typed [`Decision`], which the HTTP side (`api::access`) renders as a
//! challenge, a `403` or a `429`. The rules themselves live in the `berth-auth` crate.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request};
use axum::http::HeaderMap;
use berth_auth::{
    Actions, ChallengeError, Credentials, Issuer, LoginLimiter, Policy, Scope, SigningKey,
    TokenError, Users, Verifier,
};

use crate::config::{AuthMode, Config};

/// Errors setting up authentication.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// A file or key is unusable.
    #[error(transparent)]
    Auth(#[from] berth_auth::Error),
    /// A trusted issuer's key or JWKS is unusable.
    #[error("auth.token.trusted {issuer}: {message}")]
    Trusted {
        /// The issuer.
        issuer: String,
        /// What is wrong.
        message: String,
    },
    /// The policy does not compile.
    #[error("auth.rule: {0}")]
    Policy(String),
}

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Authentication is off: everything is allowed.
    Open,
    /// No credentials.
    Anonymous,
    /// A user who gave a correct password (Basic).
    User(String),
    /// A verified token.
    Token {
        /// Its subject (empty: anonymous token).
        subject: String,
        /// What it grants.
        access: Vec<Scope>,
    },
}

impl Caller {
    /// The user name, if any.
    pub fn user(&self) -> Option<&str> {
        match self {
            Self::User(u) => Some(u),
            Self::Token { subject, .. } if !subject.is_empty() => Some(subject),
            _ => None,
        }
    }
}

/// Whether a request may go on.
#[derive(Debug)]
pub enum Decision {
    /// It may, as this caller.
    Allow(Caller),
    /// It may not.
    Deny(Denial),
}

/// Why a request may not go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// Too many failed logins from this address: wait this long.
    TooManyFailures(std::time::Duration),
    /// No valid credentials: authenticate (a challenge), with the reason to show the client.
    Unauthenticated {
        /// Why a token was refused, when one was sent.
        error: Option<ChallengeError>,
        /// A short reason for the client.
        reason: &'static str,
    },
    /// A valid token that does not grant this: ask for one that does.
    InsufficientScope,
    /// A signed-in user who lacks the right.
    Forbidden,
}

/// Why a request could not be authenticated.
#[derive(Debug)]
pub enum Rejection {
    /// A bad password or user.
    BadCredentials,
    /// A token that does not verify.
    BadToken(TokenError),
    /// Too many failed logins from this address.
    TooManyFailures(std::time::Duration),
    /// A credential scheme this server does not take.
    Unsupported,
}

/// The server's authentication service.
#[derive(Debug)]
pub struct AuthService {
    mode: AuthMode,
    users: Option<Arc<Users>>,
    policy: Policy,
    issuer: Option<Issuer>,
    verifier: Verifier,
    limiter: LoginLimiter,
    realm: Option<String>,
    service: String,
}

impl AuthService {
    /// Builds the service for `config`; `None` when authentication is off.
    pub fn from_config(config: &Config) -> Result<Option<Self>, AuthSetupError> {
        Self::build(config, true)
    }

    /// Checks what [`AuthService::from_config`] would load (user file, policy, keys of
    /// trusted issuers, the token key if it exists) without writing anything: a missing token
    /// key is generated only by `serve`.
    pub fn check(config: &Config) -> Result<(), AuthSetupError> {
        Self::build(config, false).map(|_| ())
    }

    fn build(config: &Config, generate_key: bool) -> Result<Option<Self>, AuthSetupError> {
        let a = &config.auth;
        if a.mode == AuthMode::None {
            return Ok(None);
        }
        let users = match &a.htpasswd {
            Some(p) => Some(Arc::new(Users::load(p)?)),
            None => None,
        };
        let policy = Policy::new(&config.policy_config().map_err(AuthSetupError::Policy)?)?;
        let t = &a.token;
        let mut verifier = Verifier::new(&t.service);
        let issuer = match (a.mode, &users) {
            (AuthMode::Token, Some(_)) => {
                let path = t
                    .key
                    .clone()
                    .unwrap_or_else(|| config.data.join("auth").join("token.key"));
                if !generate_key && !path.exists() {
                    None // `serve` generates it
                } else {
                    let key = SigningKey::load_or_generate(&path)?;
                    if generate_key {
                        tracing::info!(kid = key.kid(), "token signing key loaded");
                    }
                    let issuer = Issuer::new(key, &t.issuer, &t.service, t.ttl);
                    verifier.trust_own(&issuer);
                    Some(issuer)
                }
            }
            _ => None,
        };
        for tr in &t.trusted {
            let err = |message: String| AuthSetupError::Trusted {
                issuer: tr.issuer.clone(),
                message,
            };
            let read =
                |p: &PathBuf| std::fs::read(p).map_err(|e| err(format!("{}: {e}", p.display())));
            if let Some(k) = &tr.key {
                verifier.trust_pem(&tr.issuer, &read(k)?).map_err(err)?;
            }
            if let Some(j) = &tr.jwks {
                verifier.trust_jwks(&tr.issuer, &read(j)?).map_err(err)?;
            }
        }
        let realm = t.realm.clone().or_else(|| {
            config
                .public_url
                .as_ref()
                .map(|u| format!("{}/auth/token", u.trim_end_matches('/')))
        });
        Ok(Some(Self {
            mode: a.mode,
            users,
            policy,
            issuer,
            verifier,
            limiter: LoginLimiter::new(a.max_failures, a.failure_window),
            realm,
            service: t.service.clone(),
        }))
    }

    /// The authentication mode.
    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// The built-in token issuer, when this server issues tokens.
    pub fn issuer(&self) -> Option<&Issuer> {
        self.issuer.as_ref()
    }

    /// The service name (token audience).
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The access policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The configured realm, if any (otherwise derived from the request).
    pub fn realm(&self) -> Option<&str> {
        self.realm.as_deref()
    }

    /// Checks a user's password, counting failures per client address.
    pub async fn login(&self, ip: IpAddr, user: &str, password: &str) -> Result<(), Rejection> {
        self.limiter.check(ip).map_err(Rejection::TooManyFailures)?;
        let Some(users) = self.users.clone() else {
            return Err(Rejection::BadCredentials);
        };
        let (u, p) = (user.to_owned(), password.to_owned());
        let ok = tokio::task::spawn_blocking(move || users.verify(&u, &p))
            .await
            .unwrap_or(false);
        if ok {
            self.limiter.succeeded(ip);
            Ok(())
        } else {
            self.limiter.failed(ip);
            // A client chooses the name: log a bounded, printable prefix of it.
            let shown: String = user
                .chars()
                .take(64)
                .map(|c| if c.is_control() { '?' } else { c })
                .collect();
            tracing::info!(client = %ip, user = %shown, name_bytes = user.len(), "failed login");
            Err(Rejection::BadCredentials)
        }
    }

    /// Counts a failed refresh-token or similar attempt.
    pub fn failed(&self, ip: IpAddr) -> Result<(), Rejection> {
        self.limiter.check(ip).map_err(Rejection::TooManyFailures)?;
        self.limiter.failed(ip);
        Ok(())
    }

    /// A stamp of `user`'s current credential (`None` if there is no such user): refresh
    /// tokens carry it, so a removed user's or a changed password's tokens stop working.
    pub fn credential_stamp(&self, user: &str) -> Option<String> {
        self.users.as_ref().and_then(|u| u.stamp(user))
    }

    /// Identifies the caller from an `Authorization` header value.
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
        ip: IpAddr,
    ) -> Result<Caller, Rejection> {
        let Some(value) = authorization else {
            return Ok(Caller::Anonymous);
        };
        match Credentials::parse(value) {
            Credentials::Bearer(token) if self.mode == AuthMode::Token => {
                let v = self.verifier.verify(&token).map_err(Rejection::BadToken)?;
                Ok(Caller::Token {
                    subject: v.subject,
                    access: berth_auth::scope::merge(v.access),
                })
            }
            Credentials::Basic { user, password } => {
                self.login(ip, &user, &password).await?;
                Ok(Caller::User(user))
            }
            Credentials::Malformed => Err(Rejection::BadCredentials),
            Credentials::Bearer(_) | Credentials::Other => Err(Rejection::Unsupported),
        }
    }

    /// Decides whether a request with `authorization`, from `ip`, may do what `scopes` name;
    /// `ping` for `/v2/`, which any valid credential may call and anonymous callers are
    /// challenged on (that is how clients find the auth scheme).
    pub async fn decide(
        &self,
        authorization: Option<&str>,
        ip: IpAddr,
        scopes: &[Scope],
        ping: bool,
    ) -> Decision {
        let unauthenticated =
            |error, reason| Decision::Deny(Denial::Unauthenticated { error, reason });
        let caller = match self.authenticate(authorization, ip).await {
            Ok(c) => c,
            Err(Rejection::TooManyFailures(d)) => {
                return Decision::Deny(Denial::TooManyFailures(d));
            }
            Err(Rejection::BadToken(e)) => {
                // The detail helps an operator, not a client (nor an attacker).
                tracing::debug!(client = %ip, error = %e, "token refused");
                return unauthenticated(Some(ChallengeError::InvalidToken), "invalid token");
            }
            Err(Rejection::BadCredentials | Rejection::Unsupported) => {
                return unauthenticated(None, "invalid credentials");
            }
        };
        if ping {
            return match caller {
                Caller::Anonymous => unauthenticated(None, "authentication required"),
                c => Decision::Allow(c),
            };
        }
        if self.permits(&caller, scopes) {
            return Decision::Allow(caller);
        }
        match caller {
            Caller::Anonymous => unauthenticated(None, "authentication required"),
            // A token for other scopes: the client fetches one for these and retries.
            Caller::Token { .. } => Decision::Deny(Denial::InsufficientScope),
            Caller::User(_) | Caller::Open => Decision::Deny(Denial::Forbidden),
        }
    }

    /// Whether `caller` may do everything `required` names.
    pub fn permits(&self, caller: &Caller, required: &[Scope]) -> bool {
        match caller {
            Caller::Open => true,
            Caller::Anonymous => self.policy.permits(None, required),
            Caller::User(u) => self.policy.permits(Some(u), required),
            Caller::Token { access, .. } => required.iter().all(|r| {
                access
                    .iter()
                    .any(|a| a.same_resource(r) && a.actions.contains(r.actions))
            }),
        }
    }

    /// Whether `caller` may see `repo` in the catalog.
    pub fn may_list(&self, caller: &Caller, repo: &str) -> bool {
        match caller {
            Caller::Open => true,
            other => self
                .policy
                .allowed(other.user(), repo)
                .contains(Actions::PULL),
        }
    }
}

/// Whether `caller` may do `required` with `auth` (no auth: always).
pub fn permits(auth: Option<&AuthService>, caller: &Caller, required: &[Scope]) -> bool {
    auth.is_none_or(|a| a.permits(caller, required))
}

/// The client's address (for failed-login limiting): the peer, or, when the peer is a trusted
/// proxy, the nearest address in `X-Forwarded-For` that is not one (entries further left
/// could have been written by the client itself).
pub fn client_ip(req: &Request, trusted: &[ipnet::IpNet]) -> IpAddr {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
    forwarded_client(peer, req.headers(), trusted)
}

fn forwarded_client(peer: IpAddr, headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|h| h.trim().parse().ok())
        .collect();
    hops.iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .copied()
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_addresses_count_only_behind_trusted_proxies() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "6.6.6.6, 203.0.113.7".parse().unwrap());
        h.append("x-forwarded-for", "10.1.2.3".parse().unwrap());
        let ingress: IpAddr = "10.0.0.5".parse().unwrap();
        let outsider: IpAddr = "198.51.100.1".parse().unwrap();
        // Behind the ingress: the nearest untrusted hop, not what the client wrote further left.
        assert_eq!(
            forwarded_client(ingress, &h, &trusted),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        // A direct client cannot pick its address.
        assert_eq!(forwarded_client(outsider, &h, &trusted), outsider);
        assert_eq!(forwarded_client(ingress, &h, &[]), ingress);
        assert_eq!(
            forwarded_client(ingress, &HeaderMap::new(), &trusted),
            ingress
        );
    }
}
