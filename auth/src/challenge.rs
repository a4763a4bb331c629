//! `WWW-Authenticate` challenges.

use std::fmt;

use crate::scope::Scope;

/// Why a Bearer challenge is sent (`error=` in the header; containerd retries once on it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChallengeError {
    /// The token presented is malformed, expired or not trusted.
    InvalidToken,
    /// The token is valid but does not grant what the request needs.
    InsufficientScope,
}

/// A challenge to send with a 401.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    /// `Bearer realm=…,service=…[,scope=…][,error=…]`.
    Bearer {
        /// The token endpoint URL.
        realm: String,
        /// The registry's service name.
        service: String,
        /// What the request needs (empty for `/v2/`).
        scopes: Vec<Scope>,
        /// Why the presented token failed, when one was presented.
        error: Option<ChallengeError>,
    },
    /// `Basic realm=…`.
    Basic {
        /// Text shown to users.
        realm: String,
    },
}

/// Quotes a parameter value (quoted-string: backslash-escape `"` and `\`).
fn quoted(f: &mut fmt::Formatter<'_>, v: &str) -> fmt::Result {
    f.write_str("\"")?;
    for c in v.chars() {
        if c == '"' || c == '\\' {
            f.write_str("\\")?;
        }
        write!(f, "{c}")?;
    }
    f.write_str("\"")
}

impl fmt::Display for Challenge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bearer {
                realm,
                service,
                scopes,
                error,
            } => {
                f.write_str("Bearer realm=")?;
                quoted(f, realm)?;
                f.write_str(",service=")?;
                quoted(f, service)?;
                if !scopes.is_empty() {
                    let s: Vec<String> = scopes.iter().map(ToString::to_string).collect();
                    f.write_str(",scope=")?;
                    quoted(f, &s.join(" "))?;
                }
                match error {
                    Some(ChallengeError::InvalidToken) => f.write_str(",error=\"invalid_token\""),
                    Some(ChallengeError::InsufficientScope) => {
                        f.write_str(",error=\"insufficient_scope\"")
                    }
                    None => Ok(()),
                }
            }
            Self::Basic { realm } => {
                f.write_str("Basic realm=")?;
                quoted(f, realm)?;
                f.write_str(",charset=\"UTF-8\"")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::Actions;

    #[test]
    fn formats_bearer_and_basic() {
        let c = Challenge::Bearer {
            realm: "https://r.example/auth/token".into(),
            service: "r.example".into(),
            scopes: vec![
                Scope::repository("a/b", Actions::PULL | Actions::PUSH),
                Scope::repository("c", Actions::PULL),
            ],
            error: Some(ChallengeError::InsufficientScope),
        };
        assert_eq!(
            c.to_string(),
            r#"Bearer realm="https://r.example/auth/token",service="r.example",scope="repository:a/b:pull,push repository:c:pull",error="insufficient_scope""#
        );
        let c = Challenge::Bearer {
            realm: "x".into(),
            service: "s\"v".into(),
            scopes: vec![],
            error: None,
        };
        assert_eq!(c.to_string(), r#"Bearer realm="x",service="s\"v""#);
        assert_eq!(
            Challenge::Basic {
                realm: "Berth".into()
            }
            .to_string(),
            r#"Basic realm="Berth",charset="UTF-8""#
        );
    }
}
