//! Who may do what: rules of (repository globs, users, actions), admins, groups.
//!
//! Repository globs: `*` matches within one path component, `**` any number of components,
//! `${user}` stands for the signed-in user's name (personal namespaces: `users/${user}/**`).
//! Users in a rule: a user name, `@group`, `*` (any signed-in user) or `anonymous`.
//! A request gets the union of every matching rule's actions; admins get everything.
//! With no rules at all, every signed-in user may pull, push and delete everywhere and
//! anonymous clients get nothing.

use std::collections::HashMap;

use glob::{MatchOptions, Pattern};

use crate::error::Error;
use crate::scope::{Actions, ResourceType, Scope};

const MATCH: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

/// One rule as configured.
#[derive(Clone, Debug, Default)]
pub struct Rule {
    /// Repository globs.
    pub repositories: Vec<String>,
    /// Who: user names, `@group`, `*`, `anonymous`.
    pub users: Vec<String>,
    /// What they may do.
    pub actions: Actions,
}

/// The policy as configured.
#[derive(Clone, Debug, Default)]
pub struct PolicyConfig {
    /// Users who may do anything, the catalog included.
    pub admins: Vec<String>,
    /// Group name → members.
    pub groups: HashMap<String, Vec<String>>,
    /// Rules; none means "signed-in users may do everything".
    pub rules: Vec<Rule>,
}

#[derive(Debug)]
enum Who {
    Anonymous,
    AnyUser,
    User(String),
    Group(String),
}

#[derive(Debug)]
enum Glob {
    Fixed(Pattern),
    PerUser(String),
}

#[derive(Debug)]
struct Compiled {
    globs: Vec<Glob>,
    who: Vec<Who>,
    actions: Actions,
}

/// The compiled policy.
#[derive(Debug)]
pub struct Policy {
    admins: Vec<String>,
    groups: HashMap<String, Vec<String>>,
    rules: Vec<Compiled>,
}

impl Policy {
    /// Compiles `config`, reporting the first malformed glob or unknown group.
    pub fn new(config: &PolicyConfig) -> Result<Self, Error> {
        let default = [Rule {
            repositories: vec!["**".into()],
            users: vec!["*".into()],
            actions: Actions::PULL | Actions::PUSH | Actions::DELETE,
        }];
        let rules = if config.rules.is_empty() {
            &default[..]
        } else {
            &config.rules[..]
        };
        let mut compiled = Vec::new();
        for r in rules {
            let mut globs = Vec::new();
            for g in &r.repositories {
                if g.contains("${user}") {
                    // Checked now with a sample name, compiled per request.
                    Pattern::new(&g.replace("${user}", "u"))
                        .map_err(|e| Error::Policy(format!("{g:?}: {e}")))?;
                    globs.push(Glob::PerUser(g.clone()));
                } else {
                    globs.push(Glob::Fixed(
                        Pattern::new(g).map_err(|e| Error::Policy(format!("{g:?}: {e}")))?,
                    ));
                }
            }
            let mut who = Vec::new();
            for u in &r.users {
                who.push(match u.as_str() {
                    "anonymous" => Who::Anonymous,
                    "*" => Who::AnyUser,
                    g if g.starts_with('@') => {
                        let name = &g[1..];
                        if !config.groups.contains_key(name) {
                            return Err(Error::Policy(format!("unknown group {g:?}")));
                        }
                        Who::Group(name.to_owned())
                    }
                    name => Who::User(name.to_owned()),
                });
            }
            if globs.is_empty() || who.is_empty() {
                return Err(Error::Policy(
                    "a rule needs at least one repository and one user".into(),
                ));
            }
            compiled.push(Compiled {
                globs,
                who,
                actions: r.actions,
            });
        }
        Ok(Self {
            admins: config.admins.clone(),
            groups: config.groups.clone(),
            rules: compiled,
        })
    }

    /// Whether `user` is an admin.
    pub fn is_admin(&self, user: Option<&str>) -> bool {
        user.is_some_and(|u| self.admins.iter().any(|a| a == u))
    }

    /// Whether some rule lets anonymous clients in at all.
    pub fn anonymous_allowed(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.who.iter().any(|w| matches!(w, Who::Anonymous)))
    }

    fn applies(&self, who: &Who, user: Option<&str>) -> bool {
        match (who, user) {
            (Who::Anonymous, None) => true,
            (Who::AnyUser, Some(_)) => true,
            (Who::User(n), Some(u)) => n == u,
            (Who::Group(g), Some(u)) => {
                self.groups.get(g).is_some_and(|m| m.iter().any(|x| x == u))
            }
            _ => false,
        }
    }

    fn matches(glob: &Glob, user: Option<&str>, repo: &str) -> bool {
        match glob {
            Glob::Fixed(p) => p.matches_with(repo, MATCH),
            Glob::PerUser(g) => user.is_some_and(|u| {
                Pattern::new(&g.replace("${user}", &Pattern::escape(u)))
                    .is_ok_and(|p| p.matches_with(repo, MATCH))
            }),
        }
    }

    /// What `user` (`None`: anonymous) may do in repository `repo`.
    pub fn allowed(&self, user: Option<&str>, repo: &str) -> Actions {
        // Defence in depth: the server checks names against the OCI grammar first.
        if repo
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Actions::NONE;
        }
        if self.is_admin(user) {
            return Actions::PULL | Actions::PUSH | Actions::DELETE;
        }
        self.rules
            .iter()
            .filter(|r| r.who.iter().any(|w| self.applies(w, user)))
            .filter(|r| r.globs.iter().any(|g| Self::matches(g, user, repo)))
            .fold(Actions::NONE, |a, r| a | r.actions)
    }

    /// What `user` may do on one resource scope.
    fn allowed_on(&self, user: Option<&str>, scope: &Scope) -> Actions {
        match scope.kind {
            ResourceType::Repository => self.allowed(user, &scope.name),
            // The catalog is open to whoever can sign in (or pull anonymously); its listing is
            // filtered by pull rights.
            ResourceType::Registry if scope.name == "catalog" => {
                if user.is_some() || self.anonymous_allowed() {
                    Actions::ALL
                } else {
                    Actions::NONE
                }
            }
            _ => Actions::NONE,
        }
    }

    /// The intersection of what was asked and what is allowed, per resource. Scopes granted
    /// nothing are kept with no actions (the caller drops them from tokens).
    pub fn grant(&self, user: Option<&str>, requested: &[Scope]) -> Vec<Scope> {
        requested
            .iter()
            .map(|s| Scope {
                actions: s.actions & self.allowed_on(user, s),
                ..s.clone()
            })
            .collect()
    }

    /// Whether `user` may perform all of `required`.
    pub fn permits(&self, user: Option<&str>, required: &[Scope]) -> bool {
        required
            .iter()
            .all(|s| self.allowed_on(user, s).contains(s.actions))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RW: Actions = Actions::PULL.union(Actions::PUSH);

    fn policy() -> Policy {
        Policy::new(&PolicyConfig {
            admins: vec!["root".into()],
            groups: HashMap::from([("dev".into(), vec!["alice".into(), "bob".into()])]),
            rules: vec![
                Rule {
                    repositories: vec!["team/*".into()],
                    users: vec!["@dev".into()],
                    actions: Actions::PULL | Actions::PUSH,
                },
                Rule {
                    repositories: vec!["team/**".into()],
                    users: vec!["carol".into()],
                    actions: Actions::PULL,
                },
                Rule {
                    repositories: vec!["public/**".into()],
                    users: vec!["anonymous".into(), "*".into()],
                    actions: Actions::PULL,
                },
                Rule {
                    repositories: vec!["users/${user}/**".into()],
                    users: vec!["*".into()],
                    actions: Actions::PULL | Actions::PUSH | Actions::DELETE,
                },
            ],
        })
        .unwrap()
    }

    #[test]
    fn unions_matching_rules() {
        let p = policy();
        assert_eq!(p.allowed(Some("alice"), "team/app"), RW);
        assert_eq!(p.allowed(Some("alice"), "team/app/sub"), Actions::NONE);
        assert_eq!(p.allowed(Some("carol"), "team/app/sub"), Actions::PULL);
        assert_eq!(p.allowed(Some("carol"), "team/app"), Actions::PULL);
        assert_eq!(p.allowed(None, "public/x/y"), Actions::PULL);
        assert_eq!(p.allowed(None, "team/app"), Actions::NONE);
        assert_eq!(p.allowed(Some("dave"), "public/x"), Actions::PULL);
        assert_eq!(
            p.allowed(Some("root"), "anything/at/all"),
            Actions::PULL | Actions::PUSH | Actions::DELETE
        );
    }

    #[test]
    fn personal_namespaces() {
        let p = policy();
        assert!(
            p.allowed(Some("bob"), "users/bob/tool")
                .contains(Actions::DELETE)
        );
        assert_eq!(p.allowed(Some("bob"), "users/alice/tool"), Actions::NONE);
        assert_eq!(p.allowed(None, "users/anonymous/x"), Actions::NONE);
        // A user name with glob characters matches only itself.
        assert_eq!(p.allowed(Some("*"), "users/bob/tool"), Actions::NONE);
    }

    #[test]
    fn grants_the_intersection_never_more() {
        let p = policy();
        let asked = Scope::parse_list(
            "repository:team/app:pull,push,delete repository:other:pull registry:catalog:*",
        );
        let got = p.grant(Some("carol"), &asked);
        assert_eq!(got[0].actions, Actions::PULL);
        assert_eq!(got[1].actions, Actions::NONE);
        assert_eq!(got[2].actions, Actions::ALL);
        assert_eq!(
            p.grant(None, &asked)[2].actions,
            Actions::ALL,
            "anonymous rule exists"
        );
        // Name tricks do not escape a glob.
        for name in [
            "team/../secret",
            "team/app/../../secret",
            "Team/app",
            "team//app",
        ] {
            let s = Scope::repository(name, Actions::PULL | Actions::PUSH);
            assert!(
                !p.permits(Some("alice"), std::slice::from_ref(&s)),
                "{name}"
            );
        }
        assert!(!p.permits(
            Some("alice"),
            &[Scope::repository("Team/app", Actions::PULL)]
        ));
    }

    #[test]
    fn defaults_and_validation() {
        let p = Policy::new(&PolicyConfig::default()).unwrap();
        assert_eq!(
            p.allowed(Some("x"), "a/b/c"),
            Actions::PULL | Actions::PUSH | Actions::DELETE
        );
        assert_eq!(p.allowed(None, "a"), Actions::NONE);
        assert!(!p.anonymous_allowed());
        assert!(p.grant(None, &[Scope::catalog()])[0].actions.is_empty());
        let bad = |rule: Rule| {
            Policy::new(&PolicyConfig {
                rules: vec![rule],
                ..Default::default()
            })
        };
        assert!(
            bad(Rule {
                repositories: vec!["a[".into()],
                users: vec!["*".into()],
                actions: Actions::PULL
            })
            .is_err()
        );
        assert!(
            bad(Rule {
                repositories: vec!["a".into()],
                users: vec!["@nope".into()],
                actions: Actions::PULL
            })
            .is_err()
        );
        assert!(
            bad(Rule {
                repositories: vec![],
                users: vec!["*".into()],
                actions: Actions::PULL
            })
            .is_err()
        );
    }
}
