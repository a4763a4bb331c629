//! Users from an htpasswd file (bcrypt hashes only, as `htpasswd -B` or `berth passwd` writes).
//!
//! The file is re-read when it changes, so adding a user or changing a password needs no
//! restart. Checking a bcrypt hash costs tens of milliseconds by design; Basic auth sends the
//! password with every request, so a successful check is remembered for a few minutes under a
//! SHA-256 of the user and password (never the password itself). Unknown users are checked
//! against a dummy hash, so timing does not tell which names exist.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest as _, Sha256};

use crate::error::Error;

/// How long a verified password is remembered.
const REMEMBER: Duration = Duration::from_secs(300);
/// At most this many remembered credentials.
const REMEMBER_MAX: usize = 4096;
/// How often the file's modification time is looked at.
const RECHECK: Duration = Duration::from_secs(2);
/// bcrypt cost for new hashes.
pub const DEFAULT_COST: u32 = 10;

/// A bcrypt hash of `password` in htpasswd form (`$2y$...`).
pub fn hash(password: &str, cost: u32) -> Result<String, Error> {
    bcrypt::hash_with_result(password, cost)
        .map(|h| h.format_for_version(bcrypt::Version::TwoY))
        .map_err(|e| Error::Key(format!("bcrypt: {e}")))
}

/// Every valid `user:hash` line of `text`, and an error per broken line.
fn parse_lines(path: &Path, text: &str) -> (HashMap<String, String>, Vec<Error>) {
    let mut users = HashMap::new();
    let mut broken = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |message: &str| Error::Htpasswd {
            path: path.display().to_string(),
            line: i + 1,
            message: message.to_owned(),
        };
        let Some((user, hash)) = line.split_once(':') else {
            broken.push(err("expected user:hash"));
            continue;
        };
        if user.is_empty() {
            broken.push(err("empty user name"));
        } else if !(hash.starts_with("$2y$")
            || hash.starts_with("$2b$")
            || hash.starts_with("$2a$"))
        {
            broken.push(err(
                "only bcrypt hashes are supported (create them with `berth passwd` or `htpasswd -B`)",
            ));
        } else {
            users.insert(user.to_owned(), hash.to_owned());
        }
    }
    (users, broken)
}

/// The users of `text`, or the first broken line (at start-up a file must be whole).
fn parse(path: &Path, text: &str) -> Result<HashMap<String, String>, Error> {
    let (users, broken) = parse_lines(path, text);
    match broken.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(users),
    }
}

struct Loaded {
    users: HashMap<String, String>,
    modified: Option<SystemTime>,
    checked: Instant,
}

/// The user database.
pub struct Users {
    path: PathBuf,
    loaded: RwLock<Loaded>,
    remembered: Mutex<HashMap<[u8; 32], Instant>>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users").field("path", &self.path).finish()
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Users {
    /// Reads the htpasswd file at `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let users = parse(path, &text)?;
        Ok(Self {
            path: path.to_owned(),
            loaded: RwLock::new(Loaded {
                users,
                modified: modified(path),
                checked: Instant::now(),
            }),
            remembered: Mutex::new(HashMap::new()),
        })
    }

    /// How many users the file holds.
    pub fn len(&self) -> usize {
        self.refresh();
        self.loaded.read().map_or(0, |l| l.users.len())
    }

    /// Whether the file holds no user.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-reads the file when it changed. A broken line is logged and left out (that user
    /// cannot sign in until it is fixed), and every valid line applies: an edit that removes
    /// one user and breaks another's line still removes the first. An unreadable file keeps
    /// the previous users.
    fn refresh(&self) {
        let due = self
            .loaded
            .read()
            .map_or(true, |l| l.checked.elapsed() >= RECHECK);
        if !due {
            return;
        }
        let Ok(mut l) = self.loaded.write() else {
            return;
        };
        l.checked = Instant::now();
        let m = modified(&self.path);
        if m == l.modified {
            return;
        }
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) => {
                let e = Error::io(&self.path, e);
                tracing::warn!(error = %e, "keeping the previous users");
                return;
            }
        };
        let (users, broken) = parse_lines(&self.path, &text);
        for e in &broken {
            tracing::warn!(error = %e, "htpasswd line left out");
        }
        tracing::info!(path = %self.path.display(), users = users.len(), broken = broken.len(), "reloaded users");
        l.users = users;
        l.modified = m;
        if let Ok(mut r) = self.remembered.lock() {
            r.clear();
        }
    }

    /// Whether `user` exists.
    pub fn exists(&self, user: &str) -> bool {
        self.refresh();
        self.loaded.read().is_ok_and(|l| l.users.contains_key(user))
    }

    /// A stamp of `user`'s current credential: it changes when the password does (a new bcrypt
    /// hash, new salt), and refresh tokens carry it so that a changed password ends them. It
    /// is a SHA-256 of the hash, so it tells nothing about the password. `None` for an
    /// unknown user.
    pub fn stamp(&self, user: &str) -> Option<String> {
        self.refresh();
        let l = self.loaded.read().ok()?;
        let hash = l.users.get(user)?;
        let d = Sha256::digest(hash.as_bytes());
        Some(hex::encode(&d[..16]))
    }

    /// Checks a password. Blocking (bcrypt): call it off the async runtime.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        self.refresh();
        let key: [u8; 32] = Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update([0])
            .chain_update(password.as_bytes())
            .finalize()
            .into();
        if let Ok(r) = self.remembered.lock()
            && r.get(&key).is_some_and(|t| t.elapsed() < REMEMBER)
        {
            return true;
        }
        let hash = self
            .loaded
            .read()
            .ok()
            .and_then(|l| l.users.get(user).cloned());
        let ok = match hash {
            Some(h) => bcrypt::verify(password, &h).unwrap_or(false),
            None => {
                // Same cost for unknown users as for known ones.
                let _ = bcrypt::verify(password, dummy_hash());
                false
            }
        };
        if ok && let Ok(mut r) = self.remembered.lock() {
            if r.len() >= REMEMBER_MAX {
                r.retain(|_, t| t.elapsed() < REMEMBER);
                if r.len() >= REMEMBER_MAX {
                    r.clear();
                }
            }
            r.insert(key, Instant::now());
        }
        ok
    }
}

fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash("berth-dummy-password", DEFAULT_COST).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, lines: &[(&str, &str)]) -> PathBuf {
        let text: String = lines
            .iter()
            .map(|(u, p)| format!("{u}:{}\n", hash(p, 4).unwrap()))
            .collect();
        let path = dir.join("htpasswd");
        std::fs::write(&path, format!("# team\n\n{text}")).unwrap();
        path
    }

    #[test]
    fn verifies_bcrypt_users() {
        let dir = tempfile::tempdir().unwrap();
        let users = Users::load(&file(dir.path(), &[("alice", "s3cret"), ("bob", "pw")])).unwrap();
        assert_eq!(users.len(), 2);
        assert!(users.verify("alice", "s3cret"));
        assert!(users.verify("alice", "s3cret"), "remembered");
        assert!(!users.verify("alice", "S3cret"));
        assert!(!users.verify("alice", "s3cret\0"));
        assert!(!users.verify("carol", "s3cret"));
        assert!(users.exists("bob"));
        assert!(!users.exists("carol"));
    }

    #[test]
    fn reloads_on_change_and_forgets_old_passwords() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(dir.path(), &[("alice", "old")]);
        let users = Users::load(&path).unwrap();
        assert!(users.verify("alice", "old"));
        std::thread::sleep(Duration::from_millis(20));
        file(dir.path(), &[("alice", "new")]);
        let f = std::fs::File::options().append(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(5))
            .unwrap();
        users.loaded.write().unwrap().checked = Instant::now() - RECHECK;
        assert!(!users.verify("alice", "old"));
        assert!(users.verify("alice", "new"));
    }

    #[test]
    fn rejects_other_hash_kinds_with_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h");
        std::fs::write(
            &path,
            "a:$2y$04$abcdefghijklmnopqrstuu5Rj0b9l0p7z3OQp3Yf7R8bQeG6q5uP2\nb:$apr1$x$y\n",
        )
        .unwrap();
        let e = Users::load(&path).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        std::fs::write(&path, "nocolon\n").unwrap();
        assert!(Users::load(&path).is_err());
    }

    #[test]
    fn a_reload_applies_valid_lines_and_leaves_out_broken_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(dir.path(), &[("alice", "a"), ("bob", "b"), ("carol", "c")]);
        let users = Users::load(&path).unwrap();
        let stamp = users.stamp("alice").unwrap();
        assert!(users.verify("bob", "b"));
        // One edit: bob removed, carol's line broken (an MD5 hash), alice's password changed.
        std::thread::sleep(Duration::from_millis(20));
        let text = format!("alice:{}\ncarol:$apr1$x$y\n", hash("a2", 4).unwrap());
        std::fs::write(&path, text).unwrap();
        let f = std::fs::File::options().append(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(5))
            .unwrap();
        users.loaded.write().unwrap().checked = Instant::now() - RECHECK;
        assert!(!users.verify("bob", "b"), "a removed user kept access");
        assert!(!users.exists("bob"));
        assert!(
            !users.verify("carol", "c"),
            "a broken line still let its user in"
        );
        assert!(users.verify("alice", "a2"));
        assert_ne!(
            users.stamp("alice").unwrap(),
            stamp,
            "a new password, a new stamp"
        );
        assert_eq!(users.stamp("bob"), None);
    }
}
