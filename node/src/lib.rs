//! chatd: one node of a self-contained chat cluster. This crate is the glue: configuration,
//! the node's lifecycle, the HTTP API, node-to-node services and the operator commands.
//! Only this crate speaks HTTP and WebSocket.

pub mod api;
pub mod bench;
pub mod config;
pub mod demo;
pub mod init;
pub mod node;
pub mod partition;
pub mod run;
