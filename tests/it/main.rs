//! Berth's integration tests: one binary (see `support` for the servers they start).

mod api;
mod auth;
mod backends;
mod bigcopy;
mod cli;
mod clients;
mod conformance;
mod crash;
mod disk;
mod durability;
mod faults;
mod fsck;
mod garbage;
mod gc;
mod keepalive;
mod limits;
mod load;

mod mirror;
mod pki;
mod proxy;
mod replicas;
mod structure;
mod support;
mod tls;
mod ui;
