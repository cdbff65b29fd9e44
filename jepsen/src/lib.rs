//! chatd-jepsen: fault injection in the manner of Jepsen. Real chatd processes on
//! loopback addresses, real faults (kill -9, SIGSTOP, iptables partitions, graceful
//! restarts), a recorded history of every client operation, and a [`checker`] that
//! judges the history without trusting chatd's own logic.
//!
//! * [`cluster`]: start, stop, pause, kill, partition, heal, add and remove nodes;
//!   cleanup on drop;
//! * [`nemesis`]: the faults (membership changes included) and a seeded schedule;
//! * [`workload`]: the clients and the final reads;
//! * [`history`]: the JSONL history;
//! * [`checker`]: lost, duplicate, inconsistent, gap, non-monotonic, unexpected, stale
//!   read, receipts backwards; availability and latency;
//! * [`report`]: results.json and SVG plots with fault windows shaded.

pub mod checker;
pub mod cluster;
pub mod history;
pub mod http;
pub mod lazyfs;
pub mod nemesis;
pub mod report;
pub mod run;
pub mod workload;
