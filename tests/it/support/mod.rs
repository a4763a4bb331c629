//! What every suite shares, so that none builds its own world:
//! - [`servers`]: Berth in-process ([`TestServer`]) or as the real binary ([`spawn_berth`]),
//!   Distribution as a reference or an upstream, a token server; all on 127.0.0.1.
//! - [`images`]: seeded images ([`Image`]) and OCI layouts for real clients ([`Layout`]).
//! - [`postgres`]: a fresh database on the test PostgreSQL server.
//! - [`cluster`]: replicas over PostgreSQL and S3 behind haproxy.
//! - [`push`]: one push helper ([`Push`], [`Image::try_push`]) and one pull check
//!   ([`Image::pull`]).

pub(crate) mod cluster;
pub(crate) mod images;
pub(crate) mod postgres;
pub(crate) mod push;
pub(crate) mod servers;

pub(crate) use images::*;
pub(crate) use push::*;
pub(crate) use servers::*;
