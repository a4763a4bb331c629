//! Names the distribution spec gives a grammar to: repository names, tags, digests and references.
//!
//! ```text
//! name       := component ("/" component)*            (at most 255 bytes in all)
//! component  := [a-z0-9]+ ((\.|_|__|-+) [a-z0-9]+)*
//! tag        := [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}
//! digest     := algorithm ":" encoded
//! algorithm  := [a-z0-9]+ ([+._-][a-z0-9]+)*           (sha256 and sha512 are supported)
//! encoded    := [a-f0-9]{64} for sha256, [a-f0-9]{128} for sha512
//! reference  := tag | digest                          (a ':' makes it a digest)
//! ```
//!
//! Every type here is built only through `FromStr`, so a value that exists has been checked.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

use crate::error::Error;

/// Longest repository name accepted, as Distribution and clients expect.
pub const MAX_NAME_LEN: usize = 255;

/// A repository name such as `library/alpine`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // a separator: '.', '_', '__' or a run of '-'
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !is_alnum(b[i]) {
            return false;
        }
    }
    true
}

fn is_alnum(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

impl FromStr for RepoName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        if s.is_empty() || s.len() > MAX_NAME_LEN || !s.split('/').all(valid_component) {
            return Err(Error::NameInvalid(s.chars().take(300).collect()));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tag such as `latest` or `v1.2.3`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    /// The tag as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b[1..]
                .iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(Error::TagInvalid(s.chars().take(200).collect()))
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The digest algorithms Berth can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// SHA-256, the canonical algorithm.
    Sha256,
    /// SHA-512.
    Sha512,
}

impl Algorithm {
    /// The algorithm's name in a digest string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Self::Sha256 => 64,
            Self::Sha512 => 128,
        }
    }

    /// A fresh incremental hasher for this algorithm.
    pub fn hasher(self) -> Hasher {
        match self {
            Self::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Self::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }
}

/// An incremental hasher producing a [`Digest`].
#[derive(Clone)]
pub enum Hasher {
    /// SHA-256 state.
    Sha256(sha2::Sha256),
    /// SHA-512 state.
    Sha512(sha2::Sha512),
}

impl Hasher {
    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(data),
            Self::Sha512(h) => h.update(data),
        }
    }

    /// The digest of everything fed so far.
    pub fn finish(self) -> Digest {
        match self {
            Self::Sha256(h) => Digest {
                algorithm: Algorithm::Sha256,
                hex: hex::encode(h.finalize()),
            },
            Self::Sha512(h) => Digest {
                algorithm: Algorithm::Sha512,
                hex: hex::encode(h.finalize()),
            },
        }
    }
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hasher")
    }
}

/// A content digest such as `sha256:e3b0…`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    /// The digest of `data` under `algorithm`.
    pub fn of(algorithm: Algorithm, data: &[u8]) -> Self {
        let mut h = algorithm.hasher();
        h.update(data);
        h.finish()
    }

    /// The SHA-256 digest of `data`.
    pub fn sha256(data: &[u8]) -> Self {
        Self::of(Algorithm::Sha256, data)
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The encoded (hex) part.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl FromStr for Digest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::DigestInvalid(s.chars().take(200).collect());
        let (alg, enc) = s.split_once(':').ok_or_else(bad)?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return Err(bad()),
        };
        if enc.len() != algorithm.hex_len()
            || !enc
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        {
            return Err(bad());
        }
        Ok(Self {
            algorithm,
            hex: enc.to_owned(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

/// What a manifest URL names: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// A mutable tag.
    Tag(Tag),
    /// An immutable digest.
    Digest(Digest),
}

impl FromStr for Reference {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        if s.contains(':') {
            Ok(Self::Digest(s.parse()?))
        } else {
            Ok(Self::Tag(s.parse()?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tag(t) => t.fmt(f),
            Self::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_names() {
        for ok in [
            "a",
            "library/alpine",
            "a.b_c__d---e/f0",
            "blobs/uploads",
            "x/manifests/y",
        ] {
            assert!(ok.parse::<RepoName>().is_ok(), "{ok}");
        }
        for bad in [
            "", "A", "a//b", "/a", "a/", "a..b", "a___b", "-a", "a-", "a:b", "..", "a/../b",
            "a%2Fb", "_catalog",
        ] {
            assert!(bad.parse::<RepoName>().is_err(), "{bad}");
        }
        assert!("a".repeat(256).parse::<RepoName>().is_err());
        assert!("a".repeat(255).parse::<RepoName>().is_ok());
    }

    #[test]
    fn tags() {
        for ok in ["latest", "_x", "v1.2.3-rc_1", &"a".repeat(128)] {
            assert!(ok.parse::<Tag>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".a",
            "-a",
            "a:b",
            "a/b",
            &"a".repeat(129),
            ".INVALID_MANIFEST_NAME",
        ] {
            assert!(bad.parse::<Tag>().is_err(), "{bad}");
        }
    }

    #[test]
    fn digests_round_trip() {
        let d = Digest::sha256(b"");
        assert_eq!(
            d.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        let d5 = Digest::of(Algorithm::Sha512, b"x");
        assert_eq!(d5.to_string().parse::<Digest>().unwrap(), d5);
        for bad in [
            "sha256:totallywrong",
            "sha256:",
            "md5:abc",
            "sha256",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }
}

/// Properties over generated input (`PROPTEST_CASES` sets how many; CI runs the default 256).
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// A valid path component: alphanumerics joined by `.`, `_`, `__` or runs of `-`.
    const COMPONENT: &str = "[a-z0-9]{1,8}((\\.|_|__|-{1,3})[a-z0-9]{1,8}){0,2}";

    fn repo_name() -> impl Strategy<Value = String> {
        proptest::collection::vec(COMPONENT, 1..5).prop_map(|parts| parts.join("/"))
    }

    proptest! {
        #[test]
        fn valid_names_round_trip(name in repo_name()) {
            let parsed: RepoName = name.parse().expect("a valid name");
            prop_assert_eq!(parsed.to_string(), name);
        }

        #[test]
        fn valid_tags_and_digests_round_trip(
            tag in "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}",
            hex in "[a-f0-9]{64}",
        ) {
            let parsed: Tag = tag.parse().expect("a valid tag");
            prop_assert_eq!(parsed.to_string(), tag.clone());
            let d = format!("sha256:{hex}");
            let parsed: Digest = d.parse().expect("a valid digest");
            prop_assert_eq!(parsed.to_string(), d.clone());
            // A reference is the one or the other, and says which.
            prop_assert!(matches!(tag.parse::<Reference>(), Ok(Reference::Tag(_))));
            prop_assert!(matches!(d.parse::<Reference>(), Ok(Reference::Digest(_))));
        }

        /// Anything at all: an answer, never a panic; what parses prints back the same.
        #[test]
        fn any_text_parses_or_is_refused(s in "\\PC{0,300}") {
            if let Ok(n) = s.parse::<RepoName>() {
                prop_assert_eq!(n.to_string(), s.clone());
                prop_assert!(s.len() <= MAX_NAME_LEN);
            }
            if let Ok(t) = s.parse::<Tag>() {
                prop_assert_eq!(t.to_string(), s.clone());
            }
            if let Ok(d) = s.parse::<Digest>() {
                prop_assert_eq!(d.to_string(), s.clone());
            }
            let _ = s.parse::<Reference>();
        }

        /// Near-misses of valid names (one character changed) are judged without panicking,
        /// and upper case or an empty component is always refused.
        #[test]
        fn near_miss_names(name in repo_name(), at in 0usize..64, c in any::<char>()) {
            let mut chars: Vec<char> = name.chars().collect();
            let at = at % chars.len();
            chars[at] = c;
            let mutated: String = chars.into_iter().collect();
            let parsed = mutated.parse::<RepoName>();
            if c.is_ascii_uppercase() || mutated.contains("//") || mutated.starts_with('/') {
                prop_assert!(parsed.is_err(), "{mutated:?} was accepted");
            }
        }
    }
}
