#![allow(clippy::unwrap_used, clippy::expect_used)]
//! chatd end to end: real node processes, real RocksDB, real QUIC on loopback.

mod bad_input;
mod chat;
mod demo;
mod drain;
mod harness;
mod replication;
mod ws;
