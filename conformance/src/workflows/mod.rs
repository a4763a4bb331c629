//! The workflows, one module each. Every check records exactly one outcome.

mod auth;
mod discovery;
mod extras;
mod management;
mod pull;
mod push;
