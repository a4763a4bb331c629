//! The `Authorization` header, parsed in one place: the scheme is case-insensitive (RFC 9110),
//! Basic credentials are base64 `user:password` with a non-empty user.

use base64::Engine as _;

/// What a client presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// `Basic <base64(user:password)>`.
    Basic {
        /// The user name.
        user: String,
        /// The password.
        password: String,
    },
    /// `Bearer <token>`.
    Bearer(String),
    /// A Basic value that does not decode to `user:password`.
    Malformed,
    /// Another scheme.
    Other,
}

impl Credentials {
    /// Parses an `Authorization` header value.
    pub fn parse(value: &str) -> Self {
        let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return Self::Bearer(rest.to_owned());
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return Self::Other;
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()
            .and_then(|raw| String::from_utf8(raw).ok());
        match decoded.as_deref().and_then(|t| t.split_once(':')) {
            Some((user, password)) if !user.is_empty() => Self::Basic {
                user: user.to_owned(),
                password: password.to_owned(),
            },
            _ => Self::Malformed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn schemes_are_case_insensitive_and_basic_decodes() {
        for scheme in ["Basic", "basic", "BASIC"] {
            assert_eq!(
                Credentials::parse(&format!("{scheme} {}", b64("alice:pw:with:colons"))),
                Credentials::Basic {
                    user: "alice".into(),
                    password: "pw:with:colons".into()
                }
            );
        }
        assert_eq!(
            Credentials::parse("bearer abc.def"),
            Credentials::Bearer("abc.def".into())
        );
        assert_eq!(
            Credentials::parse(&format!("Basic {}", b64(":pw"))),
            Credentials::Malformed
        );
        assert_eq!(Credentials::parse("Basic !!!"), Credentials::Malformed);
        assert_eq!(Credentials::parse("Digest x"), Credentials::Other);
    }
}

/// Properties over generated input (`PROPTEST_CASES` sets how many).
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Basic credentials decode to exactly the user and password encoded, whatever the
        /// password holds (colons included).
        #[test]
        fn basic_round_trips(user in "[^:]{1,30}", password in "\\PC{0,40}") {
            let raw = format!("{user}:{password}");
            let value = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            );
            prop_assert_eq!(Credentials::parse(&value), Credentials::Basic { user, password });
        }

        /// Any `Authorization` value: classified, never a panic.
        #[test]
        fn any_authorization_text(s in "\\PC{0,300}") {
            if let Credentials::Basic { user, .. } = Credentials::parse(&s) {
                prop_assert!(!user.is_empty());
            }
        }
    }
}
