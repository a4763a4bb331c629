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

/// Splits `k=v, k="quoted, \"v\""` into pairs (keys lower-cased).
fn params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ','))
            .collect::<String>()
            .trim()
            .to_ascii_lowercase();
        if key.is_empty() {
            return out;
        }
        if chars.next_if_eq(&'=').is_none() {
            continue;
        }
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| *c != ','))
                .collect::<String>()
                .trim()
                .to_owned();
        }
        out.push((key, value));
    }
}

impl Challenge {
    /// Parses a `WWW-Authenticate` value from another registry (Bearer or Basic).
    pub fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
        let p = params(rest);
        let get = |k: &str| p.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        if scheme.eq_ignore_ascii_case("bearer") {
            Some(Self::Bearer {
                realm: get("realm")?,
                service: get("service").unwrap_or_default(),
                scopes: get("scope")
                    .map(|s| Scope::parse_list(&s))
                    .unwrap_or_default(),
                error: match get("error").as_deref() {
                    Some("invalid_token") => Some(ChallengeError::InvalidToken),
                    Some("insufficient_scope") => Some(ChallengeError::InsufficientScope),
                    _ => None,
                },
            })
        } else if scheme.eq_ignore_ascii_case("basic") {
            Some(Self::Basic {
                realm: get("realm").unwrap_or_default(),
            })
        } else {
            None
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

    #[test]
    fn parses_what_registries_send() {
        let hub = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#;
        assert_eq!(
            Challenge::parse(hub),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: "registry.docker.io".into(),
                scopes: vec![Scope::repository("library/alpine", Actions::PULL)],
                error: None,
            })
        );
        // Our own output round-trips, quoting included.
        let c = Challenge::Bearer {
            realm: "http://x/auth,token".into(),
            service: "s\"v".into(),
            scopes: vec![Scope::repository("a", Actions::PULL | Actions::PUSH)],
            error: Some(ChallengeError::InsufficientScope),
        };
        assert_eq!(Challenge::parse(&c.to_string()), Some(c));
        assert_eq!(
            Challenge::parse("basic realm=Registry"),
            Some(Challenge::Basic {
                realm: "Registry".into()
            })
        );
        assert_eq!(Challenge::parse("Bearer service=x"), None, "no realm");
        assert_eq!(Challenge::parse("Negotiate abc"), None);
    }
}

/// Properties over generated input (`PROPTEST_CASES` sets how many).
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Text shaped like a challenge: a scheme and parameters, quoted or not, with stray
    /// quotes, backslashes, commas and spaces.
    fn challenge_like() -> impl Strategy<Value = String> {
        let param = (
            "(realm|service|scope|error|[a-zA-Z]{1,6})",
            " ?= ?",
            "(\"[^\"]{0,20}\"?|[^,\" ]{0,20}|\"([^\"\\\\]|\\\\.){0,20}\")",
        )
            .prop_map(|(k, eq, v)| format!("{k}{eq}{v}"));
        (
            "(Bearer|bearer|BEARER|Basic|basic|Digest) {1,2}",
            proptest::collection::vec(param, 0..6),
            "(,|, | ,)",
        )
            .prop_map(|(scheme, params, sep)| format!("{scheme}{}", params.join(&sep)))
    }

    proptest! {
        /// A challenge Berth sends parses back to itself, quotes and backslashes included.
        #[test]
        fn bearer_challenges_round_trip(
            realm in "https?://[a-z0-9.:/-]{1,30}",
            service in "[a-zA-Z0-9 .:,=\"\\\\-]{0,20}",
            names in proptest::collection::vec("[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,2}", 0..3),
            error in proptest::option::of(prop_oneof![
                Just(ChallengeError::InvalidToken),
                Just(ChallengeError::InsufficientScope),
            ]),
        ) {
            let scopes = names
                .iter()
                .map(|n| Scope::repository(n, crate::scope::Actions::PULL))
                .collect();
            let c = Challenge::Bearer { realm, service, scopes, error };
            prop_assert_eq!(Challenge::parse(&c.to_string()), Some(c));
        }

        /// Any `WWW-Authenticate` an upstream sends: parsed or refused, never a panic; what
        /// parses prints as a challenge that parses back to the same.
        #[test]
        fn any_challenge_text(s in prop_oneof!["\\PC{0,300}", challenge_like()]) {
            if let Some(c) = Challenge::parse(&s) {
                prop_assert_eq!(Challenge::parse(&c.to_string()), Some(c));
            }
        }
    }
}
