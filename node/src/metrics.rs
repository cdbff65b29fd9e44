//! Prometheus text metrics of a node.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Bucket upper bounds of latency histograms, in milliseconds.
pub const LATENCY_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];

/// A fixed-bucket histogram of milliseconds.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; 12],
    count: AtomicU64,
    sum_ms: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn record(&self, ms: u64) {
        for (i, le) in LATENCY_BUCKETS_MS.iter().enumerate() {
            if ms <= *le {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ms.fetch_add(ms, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, le) in LATENCY_BUCKETS_MS.iter().enumerate() {
            let secs = *le as f64 / 1000.0;
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{secs}\"}} {}",
                self.buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_ms.load(Ordering::Relaxed) as f64 / 1000.0
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Counters and histograms of the gateway.
#[derive(Default)]
pub struct Metrics {
    pub connections: AtomicI64,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub messages_in: AtomicU64,
    pub ack_latency: Histogram,
    pub deliver_latency: Histogram,
    pub delivery_dropped: std::sync::Arc<AtomicU64>,
    /// Requests to other nodes (deliveries, typing) dropped: queue full or call failed.
    pub broadcast_dropped: AtomicU64,
    /// Delivery batches this node's leaders did not send to a peer: no recipient has a
    /// session there (the peer's roster is known here).
    pub deliveries_skipped: AtomicU64,
    /// Delivery batches other nodes' leaders sent here.
    pub deliveries_received: AtomicU64,
    /// Forwarded requests answered "outcome unknown" because the target lost the
    /// leadership (a newer term seen here) or fell silent (node liveness) while they were
    /// in flight.
    pub forwards_cut: AtomicU64,
    /// File chunks this node stored (synced) as a replica, and their bytes.
    pub file_chunks_stored: AtomicU64,
    pub file_chunk_bytes_stored: AtomicU64,
    /// File chunks the repair loop fetched from another replica and stored here.
    pub file_chunks_repaired: AtomicU64,
    /// File chunks the last repair pass found missing here and did not repair.
    pub file_chunks_missing: AtomicU64,
    /// File chunks, and their bytes, this node holds (as of the last sweep).
    pub file_chunks: AtomicU64,
    pub file_bytes: AtomicU64,
    /// Files collection dropped (by this node, as the leader of their partition).
    pub files_collected: AtomicU64,
    /// Offline notifications the webhook accepted.
    pub notifications_sent: AtomicU64,
    /// Offline notifications dropped: the webhook refused TLS, or every attempt failed.
    pub notifications_failed: AtomicU64,
}

/// Appends one metric in Prometheus text format: its help, its type (`gauge` or
/// `counter`) and its value. Every metric of /metrics is written through this.
pub fn metric(out: &mut String, name: &str, help: &str, kind: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

impl Metrics {
    /// The metrics in Prometheus text format; `lag` summarises the hosted groups' entries
    /// not yet applied.
    pub fn render(&self, lag: &chatd_raftlog::ApplyBacklog) -> String {
        let mut out = String::new();
        metric(
            &mut out,
            "chatd_connections",
            "Open client WebSocket sessions.",
            "gauge",
            self.connections.load(Ordering::Relaxed).to_string(),
        );
        if let Some(rss) = resident_bytes() {
            metric(
                &mut out,
                "chatd_process_resident_memory_bytes",
                "Resident memory of this chatd process (RSS), in bytes.",
                "gauge",
                rss.to_string(),
            );
        }
        if let Some(cpu) = cpu_seconds() {
            metric(
                &mut out,
                "chatd_process_cpu_seconds_total",
                "CPU time of this chatd process, user and system, in seconds.",
                "counter",
                format!("{cpu:.2}"),
            );
        }
        metric(
            &mut out,
            "chatd_frames_in_total",
            "Client frames received.",
            "counter",
            self.frames_in.load(Ordering::Relaxed).to_string(),
        );
        metric(
            &mut out,
            "chatd_frames_out_total",
            "Frames pushed to clients.",
            "counter",
            self.frames_out.load(Ordering::Relaxed).to_string(),
        );
        metric(
            &mut out,
            "chatd_messages_in_total",
            "Send requests received.",
            "counter",
            self.messages_in.load(Ordering::Relaxed).to_string(),
        );
        metric(
            &mut out,
            "chatd_delivery_batches_dropped_total",
            "Applied event batches dropped because the delivery queue was full.",
            "counter",
            self.delivery_dropped.load(Ordering::Relaxed).to_string(),
        );
        metric(
            &mut out,
            "chatd_peer_broadcasts_dropped_total",
            "Deliveries or typing events for other nodes dropped (queue full or call failed).",
            "counter",
            self.broadcast_dropped.load(Ordering::Relaxed).to_string(),
        );
        metric(
            &mut out,
            "chatd_peer_deliveries_skipped_total",
            "Delivery batches not sent to a peer: none of their recipients has a session there.",
            "counter",
            self.deliveries_skipped.load(Ordering::Relaxed).to_string(),
        );
        metric(
            &mut out,
            "chatd_peer_deliveries_received_total",
            "Delivery batches other nodes' leaders sent to this node.",
            "counter",
            self.deliveries_received.load(Ordering::Relaxed).to_string(),
        );
        metric(
            &mut out,
            "chatd_notifications_sent_total",
            "Offline notifications the webhook accepted (2xx).",
            "counter",
            self.notifications_sent.load(Ordering::Relaxed).to_string(),
        );
        metric(
            &mut out,
            "chatd_notifications_failed_total",
            "Offline notifications dropped: TLS refused by this node, or every attempt failed.",
            "counter",
            self.notifications_failed
                .load(Ordering::Relaxed)
                .to_string(),
        );
        metric(
            &mut out,
            "chatd_forwards_cut_total",
            "Forwarded requests ended early (outcome unknown) because their leader lost the \
             leadership or fell silent (node liveness) while they were in flight.",
            "counter",
            self.forwards_cut.load(Ordering::Relaxed).to_string(),
        );
        metric(
            &mut out,
            "chatd_file_chunks_stored_total",
            "File chunks this node stored, synced, as a replica of their file's partition.",
            "counter",
            self.file_chunks_stored.load(Ordering::Relaxed).to_string(),
        );
        metric(
            &mut out,
            "chatd_file_chunks_repaired_total",
            "File chunks this node fetched from another replica and stored (repair).",
            "counter",
            self.file_chunks_repaired
                .load(Ordering::Relaxed)
                .to_string(),
        );
        metric(
            &mut out,
            "chatd_file_chunks",
            "File chunks this node holds (as of its last sweep).",
            "gauge",
            self.file_chunks.load(Ordering::Relaxed).to_string(),
        );
        metric(
            &mut out,
            "chatd_file_bytes",
            "Bytes of file chunks this node holds: its disk use for files (as of its last sweep).",
            "gauge",
            self.file_bytes.load(Ordering::Relaxed).to_string(),
        );
        metric(
            &mut out,
            "chatd_files_collected_total",
            "Files dropped by collection (unattached, unfinished or unreferenced past their ttl).",
            "counter",
            self.files_collected.load(Ordering::Relaxed).to_string(),
        );
        metric(
            &mut out,
            "chatd_file_chunks_missing",
            "File chunks the last repair pass found missing here and could not fetch yet.",
            "gauge",
            self.file_chunks_missing.load(Ordering::Relaxed).to_string(),
        );
        metric(
            &mut out,
            "chatd_file_chunk_bytes_stored_total",
            "Bytes of the file chunks this node stored as a replica.",
            "counter",
            self.file_chunk_bytes_stored
                .load(Ordering::Relaxed)
                .to_string(),
        );
        self.ack_latency.render(
            "chatd_send_to_ack_seconds",
            "From receiving a send to its ack (committed and applied).",
            &mut out,
        );
        self.deliver_latency.render(
            "chatd_send_to_deliver_seconds",
            "From a message's timestamp to its push by this node.",
            &mut out,
        );
        metric(
            &mut out,
            "chatd_apply_lag_entries_total",
            "Log entries not yet applied, summed over the hosted groups.",
            "gauge",
            lag.entries_total.to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP chatd_apply_lag_entries_max Log entries not yet applied in the group with the \
             most (labelled with it).\n# TYPE chatd_apply_lag_entries_max gauge\n\
             chatd_apply_lag_entries_max{{partition=\"{}\"}} {}",
            lag.worst_group, lag.worst_entries
        );
        out
    }
}

/// The Raft groups hosted here, their traffic to peers and the peers' liveness (O(1) in
/// the number of groups: counters and a snapshot of the peers, no call into any group).
pub fn render_raft(registry: &chatd_raftlog::Registry, out: &mut String) {
    let links = registry.link_stats();
    let lives = registry.liveness().snapshot();
    let health = registry.peer_health();
    let (lost, recovered) = health.transitions();
    let counter = |a: &AtomicU64| a.load(Ordering::Relaxed);
    for (name, help, kind, v) in [
        (
            "chatd_raft_groups",
            "Raft groups (partitions and group 0) hosted on this node.",
            "gauge",
            registry.group_count() as u64,
        ),
        (
            "chatd_raft_groups_quiesced",
            "Hosted groups quiesced here: idle, no heartbeats, no ticks.",
            "gauge",
            registry.quiesced_groups() as u64,
        ),
        (
            "chatd_raft_log_tail_bytes",
            "Bytes of newest log entries kept in memory for replication and apply (bounded).",
            "gauge",
            registry.log_tail_bytes() as u64,
        ),
        (
            "chatd_raft_peer_batches_total",
            "Batches of Raft RPCs sent to peers (one QUIC stream each; pings included).",
            "counter",
            counter(&links.batches_total),
        ),
        (
            "chatd_raft_peer_rpcs_total",
            "Raft RPCs sent to peers inside batches.",
            "counter",
            counter(&links.rpcs_total),
        ),
        (
            "chatd_raft_peer_pings_total",
            "Liveness pings sent to peers as empty batches (a QUIC stream each: when a peer \
             was not heard lately).",
            "counter",
            counter(&links.pings_total),
        ),
        (
            "chatd_raft_peer_datagram_pings_total",
            "Liveness pings sent to peers as QUIC datagrams (the usual way).",
            "counter",
            counter(&links.datagram_pings_total),
        ),
        (
            "chatd_raft_entry_bytes_sent_total",
            "Bytes of AppendEntries carrying entries sent to peers (replication, and the \
             catch-up of a lagging or new replica from the log).",
            "counter",
            counter(&links.entry_bytes_total),
        ),
        (
            "chatd_raft_catch_up_entry_bytes_sent_total",
            "Of chatd_raft_entry_bytes_sent_total, the bytes of entries already committed \
             when sent: the catch-up of a new replica (a move's learner) or of a lagging one \
             from the log.",
            "counter",
            counter(&links.catch_up_entry_bytes_total),
        ),
        (
            "chatd_raft_snapshot_bytes_sent_total",
            "Bytes of snapshot chunks sent to peers (the catch-up of a new or far-behind \
             replica from a snapshot).",
            "counter",
            counter(&links.snapshot_bytes_total),
        ),
        (
            "chatd_raft_peers_alive",
            "Peers heard from within the liveness timeout.",
            "gauge",
            lives.values().filter(|l| l.alive).count() as u64,
        ),
        (
            "chatd_raft_peers_dead",
            "Peers silent past the liveness timeout.",
            "gauge",
            lives
                .values()
                .filter(|l| !l.alive && l.incarnation.is_some())
                .count() as u64,
        ),
        (
            "chatd_peers_unreachable",
            "Peers whose last Raft RPC failed.",
            "gauge",
            health.down().len() as u64,
        ),
        (
            "chatd_peer_lost_total",
            "Times a peer stopped answering Raft RPCs.",
            "counter",
            lost,
        ),
        (
            "chatd_peer_recovered_total",
            "Times an unreachable peer answered again.",
            "counter",
            recovered,
        ),
    ] {
        metric(out, name, help, kind, v);
    }
}

/// This process's CPU time, user and system, in seconds (`/proc/self/stat`, Linux).
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    // utime and stime are fields 14 and 15 of the line: 12th and 13th after the command.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // USER_HZ is 100 on every Linux target chatd is built for.
    const TICKS_PER_SECOND: f64 = 100.0;
    Some((utime + stime) as f64 / TICKS_PER_SECOND)
}

/// This process's resident memory in bytes (`/proc/self/statm`, Linux); `None` elsewhere.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // The page size of every Linux target chatd is built for (x86-64, aarch64 default).
    const PAGE_BYTES: u64 = 4096;
    Some(pages * PAGE_BYTES)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.ack_latency.record(3);
        m.ack_latency.record(7000);
        let text = m.render(&chatd_raftlog::ApplyBacklog {
            entries_total: 5,
            worst_group: 2,
            worst_entries: 5,
        });
        assert!(text.contains("chatd_apply_lag_entries_max{partition=\"2\"} 5"));
        assert!(text.contains("chatd_apply_lag_entries_total 5"));
        assert!(text.contains("chatd_send_to_ack_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("chatd_send_to_ack_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("# TYPE chatd_connections gauge"));
        let rss = resident_bytes().expect("Linux: /proc/self/statm");
        assert!(rss > 1 << 20, "a test process holds more than 1 MiB: {rss}");
        assert!(text.contains("chatd_process_resident_memory_bytes "));
        assert!(text.contains("chatd_process_cpu_seconds_total "));
        // Burn some CPU: the counter moves.
        let before = cpu_seconds().expect("Linux: /proc/self/stat");
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(300) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        assert!(
            cpu_seconds().expect("cpu") > before,
            "CPU time did not grow"
        );
    }
}
