//! The report of `chat-cli bench`: latency summaries, the text and JSON report, the
//! per-second latency SVG.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::verify::{AnomalyKind, ChatSpec, Verdict};
use super::{BenchArgs, Hists, Stats};
use crate::svg;

/// A latency summary in milliseconds.
#[derive(Clone, Debug, Default)]
pub(super) struct Summary {
    count: u64,
    p: Option<[f64; 6]>, // p50, p90, p99, p99.9, max, mean
}

pub(super) fn summarize(h: &Histogram<u64>) -> Summary {
    if h.is_empty() {
        return Summary::default();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    Summary {
        count: h.len(),
        p: Some([
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.9)),
            ms(h.value_at_quantile(0.99)),
            ms(h.value_at_quantile(0.999)),
            ms(h.max()),
            h.mean() / 1000.0,
        ]),
    }
}

impl Summary {
    pub(super) fn json(&self) -> Value {
        match self.p {
            Some([p50, p90, p99, p999, max, mean]) => json!({
                "count": self.count, "p50": round3(p50), "p90": round3(p90), "p99": round3(p99),
                "p99_9": round3(p999), "max": round3(max), "mean": round3(mean),
            }),
            None => json!({ "count": 0, "p50": null, "p90": null, "p99": null,
                            "p99_9": null, "max": null, "mean": null }),
        }
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

// ---------------------------------------------------------------------------------------
// Report.
// ---------------------------------------------------------------------------------------

pub(super) struct Report<'a> {
    pub(super) nodes: &'a [String],
    pub(super) args: &'a BenchArgs,
    pub(super) prefix: &'a str,
    pub(super) members: usize,
    pub(super) stats: &'a Stats,
    pub(super) ack: &'a Summary,
    pub(super) deliver: &'a Summary,
    pub(super) acked_per_sec: f64,
    pub(super) delivered_per_sec: f64,
    pub(super) verdict: &'a Verdict,
    pub(super) specs: &'a [ChatSpec],
    pub(super) closed: &'a [String],
    pub(super) history_requests: usize,
    /// Live-delivery misses by the node of the receiving connection.
    pub(super) misses_by_node: &'a BTreeMap<String, u64>,
}

impl Report<'_> {
    pub(super) fn anomaly_summary(&self) -> String {
        let parts: Vec<String> = AnomalyKind::ALL
            .iter()
            .filter(|k| self.verdict.count(**k) > 0)
            .map(|k| format!("{} {}", k.name().replace('_', " "), self.verdict.count(*k)))
            .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }

    fn chat_kind(&self) -> String {
        if self.args.group_size <= 1 {
            "direct chats".into()
        } else {
            format!("groups of {}", self.args.group_size)
        }
    }

    pub(super) fn json(&self) -> Value {
        let v = self.verdict;
        let mut verification = json!({
            "ok": v.anomalies() == 0,
            "expected_deliveries": v.expected,
            "delivered_once_in_order": v.delivered,
            "anomalies": v.anomalies(),
            "unconfirmed_committed": v.unconfirmed_committed,
            "history_requests": self.history_requests,
            "live_misses_by_node": self.misses_by_node,
            "chats_checked": self.specs.len(),
            "examples": v.examples.iter().map(|a| json!({
                "kind": a.kind.name(), "chat": self.specs.get(a.chat).map(|c| c.id.as_str()),
                "connection": a.conn, "seq": a.seq, "detail": a.detail,
            })).collect::<Vec<_>>(),
        });
        for k in AnomalyKind::ALL {
            verification[k.name()] = json!(v.count(k));
        }
        json!({
            "nodes": self.nodes,
            "connections": self.args.connections,
            "chats": self.args.chats,
            "group_size": self.args.group_size,
            "senders_per_chat": self.args.senders,
            "members_per_chat": self.members,
            "rate": self.args.rate,
            "in_flight": self.args.in_flight,
            "size": self.args.size,
            "duration_s": self.args.duration,
            "warmup_s": self.args.warmup,
            "user_prefix": self.prefix,
            "sent": self.stats.measured_sent,
            "acked": self.stats.measured_acked,
            "delivered": self.stats.measured_delivered,
            "acked_per_sec": round3(self.acked_per_sec),
            "delivered_per_sec": round3(self.delivered_per_sec),
            "ack_latency_ms": self.ack.json(),
            "deliver_latency_ms": self.deliver.json(),
            "errors": self.stats.errors,
            "rate_limited": self.stats.errors.get("rate_limited").copied().unwrap_or(0),
            "total": {
                "sent": self.stats.sent,
                "acked": self.stats.acked,
                "delivered": self.stats.delivered,
            },
            "closed_connections": self.closed,
            "verification": verification,
        })
    }

    pub(super) fn table(&self) -> String {
        let a = self.args;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "chat-cli bench: {} node(s), {} connections, {} {}, {}-byte messages",
            self.nodes.len(),
            a.connections,
            a.chats,
            self.chat_kind(),
            a.size
        );
        let load = if a.rate > 0.0 {
            format!("{} msg/s open loop", a.rate)
        } else {
            "as fast as possible".to_string()
        };
        let _ = writeln!(
            s,
            "load: {load}, at most {} in flight, {} s measured after {} s of warm-up (users {}-*){}",
            a.in_flight,
            a.duration,
            a.warmup,
            self.prefix,
            match a.senders {
                0 => String::new(),
                k => format!(", the first {k} member(s) of each chat send"),
            }
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<16} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "", "count", "msgs/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        );
        for (name, sum, rate) in [
            ("send → ack", self.ack, self.acked_per_sec),
            ("send → deliver", self.deliver, self.delivered_per_sec),
        ] {
            let cells = match sum.p {
                Some([p50, p90, p99, p999, max, _]) => {
                    [p50, p90, p99, p999, max].map(|x| format!("{x:.2}"))
                }
                None => std::array::from_fn(|_| "-".to_string()),
            };
            let _ = writeln!(
                s,
                "{:<16} {:>9} {:>10.1} {:>9} {:>9} {:>9} {:>9} {:>9}",
                name, sum.count, rate, cells[0], cells[1], cells[2], cells[3], cells[4]
            );
        }
        let _ = writeln!(s);
        if self.stats.errors.is_empty() {
            let _ = writeln!(s, "errors: none");
        } else {
            let list: Vec<String> = self
                .stats
                .errors
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(s, "errors: {}", list.join(", "));
            if let Some(rl) = self.stats.errors.get("rate_limited") {
                let _ = writeln!(
                    s,
                    "  rate_limited {rl}: the per-user send limit (raise it with `chatd cluster init --send-rate-per-sec`) or a full proposal queue"
                );
            }
        }
        for c in self.closed {
            let _ = writeln!(s, "closed: {c}");
        }
        let v = self.verdict;
        let st = self.stats;
        if v.anomalies() == 0 {
            let _ = writeln!(
                s,
                "verification: OK: {} acknowledged messages (warm-up included) and the joins reached every member connection exactly once, in seq order ({} deliveries); seqs gapless in {} chats; nothing unexpected",
                st.acked,
                v.expected,
                self.specs.len()
            );
        } else {
            let _ = writeln!(
                s,
                "verification: FAILED: {} of {} expected deliveries arrived live once and in order; {}",
                v.delivered,
                v.expected,
                self.anomaly_summary()
            );
            if !self.misses_by_node.is_empty() {
                let list: Vec<String> = self
                    .misses_by_node
                    .iter()
                    .map(|(node, n)| format!("{node} {n}"))
                    .collect();
                let _ = writeln!(
                    s,
                    "  live-delivery misses by the receiving connection's node: {}",
                    list.join(", ")
                );
            }
            for e in &v.examples {
                let _ = writeln!(s, "  {}: {}", e.kind.name(), e.detail);
            }
        }
        if v.unconfirmed_committed > 0 {
            let _ = writeln!(
                s,
                "note: {} sends without a definite answer were committed (seen delivered)",
                v.unconfirmed_committed
            );
        }
        s
    }
}

pub(super) fn latency_svg(per_second: &[Hists], report: &Report<'_>) -> String {
    let point = |h: &Histogram<u64>, q: f64, x: usize| {
        if h.is_empty() {
            None
        } else {
            Some((x as f64 + 0.5, h.value_at_quantile(q) as f64 / 1000.0))
        }
    };
    let series =
        |name: &str, color: &str, dashed: bool, f: &dyn Fn(&Hists) -> &Histogram<u64>, q: f64| {
            svg::Series {
                name: name.to_string(),
                color: color.to_string(),
                dashed,
                points: per_second
                    .iter()
                    .enumerate()
                    .filter_map(|(x, h)| point(f(h), q, x))
                    .collect(),
            }
        };
    let a = report.args;
    let load = if a.rate > 0.0 {
        format!("{} msg/s", a.rate)
    } else {
        format!("max rate, {} in flight", a.in_flight)
    };
    svg::render(&svg::Chart {
        title: format!(
            "chatd latency per second: {} node(s), {} conns, {} {}, {} B, {load}",
            report.nodes.len(),
            a.connections,
            a.chats,
            report.chat_kind(),
            a.size
        ),
        x_label: "seconds since the start of measurement (by send time)".into(),
        y_label: "latency (ms)".into(),
        x_range: Some((0.0, a.duration)),
        series: vec![
            series("ack p50", "#1f77b4", false, &|h| &h.ack, 0.5),
            series("ack p99", "#1f77b4", true, &|h| &h.ack, 0.99),
            series("deliver p50", "#d62728", false, &|h| &h.deliver, 0.5),
            series("deliver p99", "#d62728", true, &|h| &h.deliver, 0.99),
        ],
        bands: Vec::new(),
    })
}
