#![allow(clippy::unwrap_used, clippy::expect_used)]
//! chatd end to end: real node processes, real RocksDB, real QUIC on loopback.

mod accounts;
mod bad_input;
mod bounds;
mod chat;
mod chat_bad_input;
mod chat_presence;
mod chat_webhook;
mod cursors;
mod dedup;
mod demo;
mod drain;
mod e2e;
mod failover;
mod files;
mod files_shared;
mod harness;
mod membership;
mod replication;
mod web;
mod webdriver;
mod webhook_tls;
mod ws;
