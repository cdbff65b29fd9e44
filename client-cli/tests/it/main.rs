//! End-to-end tests of the `chat-cli` binary against real chatd processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod bench;
mod e2e;
mod files;
mod harness;
mod messaging;
mod session;
