//! Berth's access control, free of HTTP-server and storage types.
//!
//! - [`scope`]: the Docker scope grammar and the token `access` claim.
//! - [`token`]: signing keys, the token issuer and the verifier (ours and external issuers).
//! - [`htpasswd`]: users and passwords (bcrypt).
//! - [`policy`]: who may pull, push or delete where.
//! - [`challenge`]: `WWW-Authenticate` values.
//! - [`credentials`]: `Authorization` values.
//! - [`limiter`]: failed-login limiting per client address.
//!
//! Names are plain `&str` here: the server checks them against the OCI grammar before asking.

pub mod challenge;
pub mod credentials;
pub mod error;
pub mod htpasswd;
pub mod limiter;
pub mod policy;
pub mod scope;
pub mod token;

pub use challenge::{Challenge, ChallengeError};
pub use credentials::Credentials;
pub use error::{Error, TokenError};
pub use htpasswd::Users;
pub use limiter::LoginLimiter;
pub use policy::{Policy, PolicyConfig, Rule};
pub use scope::{Access, Actions, ResourceType, Scope};
pub use token::{Issued, Issuer, SigningKey, Verified, Verifier};
