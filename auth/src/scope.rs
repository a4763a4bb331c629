//! The Docker token scope grammar (`repository:team/app:pull,push`, `registry:catalog:*`).
//!
//! ```text
//! scope         := resourcescope [ ' ' resourcescope ]*
//! resourcescope := type [ '(' class ')' ] ':' name ':' action [ ',' action ]*
//! ```
//! A name may carry a registry host with a port (`host:5000/app`), so the type ends at the first
//! `:` and the actions start after the last one. The deprecated `(class)` suffix is dropped;
//! actions this registry does not know are ignored, never an error.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A set of actions on one resource.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Actions(u8);

impl Actions {
    /// No action.
    pub const NONE: Self = Self(0);
    /// Read manifests, blobs, tags and referrers.
    pub const PULL: Self = Self(1);
    /// Upload blobs and manifests.
    pub const PUSH: Self = Self(2);
    /// Delete manifests, tags and blobs.
    pub const DELETE: Self = Self(4);
    /// `*`: every action (used by `registry:catalog:*`).
    pub const ALL: Self = Self(8 | 7);

    /// Both sets (usable in constants).
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// Parses one action word; `None` for words this registry does not use.
    pub fn parse_one(word: &str) -> Option<Self> {
        match word {
            "pull" => Some(Self::PULL),
            "push" => Some(Self::PUSH),
            "delete" => Some(Self::DELETE),
            "*" => Some(Self::ALL),
            _ => None,
        }
    }

    /// Parses a comma-separated action list, ignoring unknown words.
    pub fn parse_list(list: &str) -> Self {
        list.split(',')
            .filter_map(Self::parse_one)
            .fold(Self::NONE, |a, b| a | b)
    }

    /// Whether every action in `other` is in `self`.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The action words, in a fixed order (`*` alone for the full set).
    pub fn words(self) -> Vec<&'static str> {
        if self == Self::ALL {
            return vec!["*"];
        }
        [
            (Self::PULL, "pull"),
            (Self::PUSH, "push"),
            (Self::DELETE, "delete"),
        ]
        .into_iter()
        .filter(|(a, _)| self.contains(*a))
        .map(|(_, w)| w)
        .collect()
    }
}

impl std::ops::BitOr for Actions {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl std::ops::BitAnd for Actions {
    type Output = Self;
    fn bitand(self, rhs: Self) -> Self {
        // `*` granted covers any requested action, and a requested `*` needs `*` granted.
        Self(self.0 & rhs.0)
    }
}

impl fmt::Display for Actions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.words().join(","))
    }
}

/// The kind of resource a scope names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    /// `repository`: a repository by name.
    Repository,
    /// `registry`: the registry itself (only `registry:catalog`).
    Registry,
    /// Any other type: parsed and carried, never granted.
    Other(String),
}

impl ResourceType {
    fn parse(s: &str) -> Self {
        // `repository(plugin)` is the deprecated class form of `repository`.
        let base = s.split_once('(').map_or(s, |(b, _)| b);
        match base {
            "repository" => Self::Repository,
            "registry" => Self::Registry,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The type word.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Repository => "repository",
            Self::Registry => "registry",
            Self::Other(s) => s,
        }
    }
}

/// One resource scope: a type, a name and the actions asked for or granted.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Scope {
    /// What kind of resource.
    pub kind: ResourceType,
    /// The resource name (a repository name, or `catalog`).
    pub name: String,
    /// The actions.
    pub actions: Actions,
}

impl Scope {
    /// A repository scope.
    pub fn repository(name: &str, actions: Actions) -> Self {
        Self {
            kind: ResourceType::Repository,
            name: name.to_owned(),
            actions,
        }
    }

    /// `registry:catalog:*`.
    pub fn catalog() -> Self {
        Self {
            kind: ResourceType::Registry,
            name: "catalog".to_owned(),
            actions: Actions::ALL,
        }
    }

    /// Parses one resource scope; `None` when it does not have the three parts.
    pub fn parse(s: &str) -> Option<Self> {
        let (kind, rest) = s.split_once(':')?;
        let (name, actions) = rest.rsplit_once(':')?;
        if kind.is_empty() || name.is_empty() {
            return None;
        }
        Some(Self {
            kind: ResourceType::parse(kind),
            name: name.to_owned(),
            actions: Actions::parse_list(actions),
        })
    }

    /// Parses a space-separated list of scopes (one `scope` value), skipping malformed ones.
    pub fn parse_list(s: &str) -> Vec<Self> {
        s.split_whitespace().filter_map(Self::parse).collect()
    }

    /// Whether this scope names the same resource as `other`.
    pub fn same_resource(&self, other: &Self) -> bool {
        self.kind == other.kind && self.name == other.name
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.kind.as_str(), self.name, self.actions)
    }
}

/// Merges scopes that name the same resource, in first-seen order.
pub fn merge(scopes: impl IntoIterator<Item = Scope>) -> Vec<Scope> {
    let mut out: Vec<Scope> = Vec::new();
    for s in scopes {
        match out.iter_mut().find(|o| o.same_resource(&s)) {
            Some(o) => o.actions = o.actions | s.actions,
            None => out.push(s),
        }
    }
    out
}

/// One entry of a token's `access` claim (the JSON form of a granted scope).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    /// Resource type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Resource name.
    pub name: String,
    /// Granted actions.
    #[serde(default)]
    pub actions: Vec<String>,
}

impl From<&Scope> for Access {
    fn from(s: &Scope) -> Self {
        Self {
            kind: s.kind.as_str().to_owned(),
            name: s.name.clone(),
            actions: s.actions.words().into_iter().map(str::to_owned).collect(),
        }
    }
}

impl From<&Access> for Scope {
    fn from(a: &Access) -> Self {
        Self {
            kind: ResourceType::parse(&a.kind),
            name: a.name.clone(),
            actions: a
                .actions
                .iter()
                .filter_map(|w| Actions::parse_one(w))
                .fold(Actions::NONE, |x, y| x | y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_grammar() {
        let s = Scope::parse("repository:team/app:pull,push").unwrap();
        assert_eq!(s.kind, ResourceType::Repository);
        assert_eq!(s.name, "team/app");
        assert_eq!(s.actions, Actions::PULL | Actions::PUSH);
        assert_eq!(s.to_string(), "repository:team/app:pull,push");

        let s = Scope::parse("repository:localhost:5000/app:pull").unwrap();
        assert_eq!(s.name, "localhost:5000/app");
        assert_eq!(s.actions, Actions::PULL);

        let s = Scope::parse("repository(plugin):x:pull").unwrap();
        assert_eq!(s.kind, ResourceType::Repository);

        let s = Scope::parse("registry:catalog:*").unwrap();
        assert_eq!(s, Scope::catalog());
        assert_eq!(s.to_string(), "registry:catalog:*");

        let s = Scope::parse("repository:a:pull,metadata-read,,push").unwrap();
        assert_eq!(s.actions, Actions::PULL | Actions::PUSH);

        for bad in [
            "",
            "repository",
            "repository:a",
            ":a:pull",
            "repository::pull",
        ] {
            assert_eq!(Scope::parse(bad), None, "{bad}");
        }
        assert_eq!(
            Scope::parse_list("repository:a:pull  registry:catalog:* junk").len(),
            2
        );
    }

    #[test]
    fn merges_repeated_resources() {
        let m = merge(Scope::parse_list(
            "repository:a:pull repository:b:pull repository:a:push",
        ));
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].actions, Actions::PULL | Actions::PUSH);
    }

    #[test]
    fn star_covers_everything_but_is_needed_for_star() {
        assert!(Actions::ALL.contains(Actions::PULL | Actions::DELETE));
        assert!(!(Actions::PULL | Actions::PUSH | Actions::DELETE).contains(Actions::ALL));
        assert_eq!(
            (Actions::PULL | Actions::PUSH) & Actions::PULL,
            Actions::PULL
        );
    }

    #[test]
    fn access_claim_round_trips() {
        let s = Scope::repository("a/b", Actions::PULL | Actions::DELETE);
        let a = Access::from(&s);
        assert_eq!(a.actions, ["pull", "delete"]);
        assert_eq!(Scope::from(&a), s);
    }
}

/// Properties over generated input (`PROPTEST_CASES` sets how many).
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn scope() -> impl Strategy<Value = Scope> {
        (
            "([a-z0-9.-]{1,12}(:[0-9]{1,5})?/)?[a-z0-9]{1,8}(/[a-z0-9._-]{1,8}){0,3}",
            1u8..8,
        )
            .prop_map(|(name, bits)| Scope {
                kind: ResourceType::Repository,
                name,
                actions: Actions(bits),
            })
    }

    proptest! {
        /// A scope prints as the grammar says and parses back to itself, a host with a port in
        /// the name included.
        #[test]
        fn scopes_round_trip(scopes in proptest::collection::vec(scope(), 1..5)) {
            for s in &scopes {
                prop_assert_eq!(Scope::parse(&s.to_string()), Some(s.clone()));
            }
            let list: Vec<String> = scopes.iter().map(ToString::to_string).collect();
            prop_assert_eq!(Scope::parse_list(&list.join(" ")), scopes);
        }

        /// Anything a client sends as `scope=`: parsed or skipped, never a panic; every scope
        /// that parses has a type and a name.
        #[test]
        fn any_scope_text(s in "\\PC{0,300}") {
            for scope in Scope::parse_list(&s) {
                prop_assert!(!scope.name.is_empty());
            }
            let _ = Scope::parse(&s);
            let _ = Actions::parse_list(&s);
        }
    }
}
