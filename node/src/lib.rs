//! chatd: one node of a self-contained chat cluster. This crate is the glue: configuration,
//! the node's lifecycle, the HTTP API, node-to-node services and the operator commands.
//! Only this crate speaks HTTP and WebSocket.

pub mod api;
pub mod auth;
pub mod bench;
pub mod bench_move;
pub mod config;
pub mod demo;
pub mod files;
pub mod first_steps;
pub mod gateway;
#[cfg(test)]
mod golden;
pub mod init;
pub mod limits;
pub mod members;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod presence;
pub mod queries;
pub mod rebalance;
pub mod receipts;
pub mod run;
pub mod sessions;
pub mod systemd;
pub mod web;
