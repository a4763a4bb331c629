//! Berth's integration tests: one binary (see `support` for the servers they start).

mod api;
mod cli;
mod clients;
mod conformance;
mod durability;
mod images;
mod support;
