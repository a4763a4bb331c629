//! Berth's integration tests: one binary (see `support` for the servers they start).

mod api;
mod clients;
mod conformance;
mod durability;
mod support;
