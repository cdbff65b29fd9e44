//! The report of a run: results.json and SVG plots of latency and throughput over time
//! with the fault windows shaded.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use chat_cli::svg::{self, Band, Chart, Series};

use crate::checker::Results;
use crate::history::{Kind, Op, F};

/// Per second of the run: (acked, unknown or failed, ack latencies in ms).
type Second = (u64, u64, Vec<f64>);

fn per_second(ops: &[Op]) -> BTreeMap<u64, Second> {
    let mut out: BTreeMap<u64, Second> = BTreeMap::new();
    let mut invoked: HashMap<&str, u64> = HashMap::new();
    for op in ops.iter().filter(|o| o.f == Some(F::Send)) {
        match op.kind {
            Some(Kind::Invoke) => {
                invoked.insert(&op.process, op.time_us);
            }
            Some(kind) => {
                let sec = op.time_us / 1_000_000;
                let slot = out.entry(sec).or_default();
                if kind == Kind::Ok {
                    slot.0 += 1;
                    if let Some(t0) = invoked.get(op.process.as_str()) {
                        slot.2.push(op.time_us.saturating_sub(*t0) as f64 / 1000.0);
                    }
                } else {
                    slot.1 += 1;
                }
            }
            None => {}
        }
    }
    out
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

fn bands(results: &Results) -> Vec<Band> {
    results
        .windows
        .iter()
        .map(|w| Band {
            from: w.start_s,
            to: w.end_s,
            label: w.fault.clone(),
        })
        .collect()
}

/// The latency plot: p50, p99 and max send → ack per second.
pub fn latency_svg(ops: &[Op], results: &Results, title: &str) -> String {
    let secs = per_second(ops);
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    let mut max = Vec::new();
    for (s, (_, _, lat)) in secs {
        let mut lat = lat;
        let x = s as f64 + 0.5;
        p50.push((x, quantile(&mut lat, 0.5)));
        p99.push((x, quantile(&mut lat, 0.99)));
        max.push((x, quantile(&mut lat, 1.0)));
    }
    svg::render(&Chart {
        title: format!("send → ack latency · {title}"),
        x_label: "seconds since start".into(),
        y_label: "ms".into(),
        x_range: None,
        series: vec![
            Series {
                name: "p50".into(),
                color: "#1f77b4".into(),
                dashed: false,
                points: p50,
            },
            Series {
                name: "p99".into(),
                color: "#d62728".into(),
                dashed: false,
                points: p99,
            },
            Series {
                name: "max".into(),
                color: "#7f7f7f".into(),
                dashed: true,
                points: max,
            },
        ],
        bands: bands(results),
    })
}

/// The throughput plot: acked and unsuccessful sends per second.
pub fn throughput_svg(ops: &[Op], results: &Results, title: &str) -> String {
    let secs = per_second(ops);
    let ok: Vec<(f64, f64)> = secs
        .iter()
        .map(|(s, v)| (*s as f64 + 0.5, v.0 as f64))
        .collect();
    let bad: Vec<(f64, f64)> = secs
        .iter()
        .map(|(s, v)| (*s as f64 + 0.5, v.1 as f64))
        .collect();
    svg::render(&Chart {
        title: format!("sends per second · {title}"),
        x_label: "seconds since start".into(),
        y_label: "sends / s".into(),
        x_range: None,
        series: vec![
            Series {
                name: "acked".into(),
                color: "#2ca02c".into(),
                dashed: false,
                points: ok,
            },
            Series {
                name: "failed / unknown".into(),
                color: "#d62728".into(),
                dashed: true,
                points: bad,
            },
        ],
        bands: bands(results),
    })
}

/// Writes results.json, latency.svg and throughput.svg into `dir`.
pub fn write(
    dir: &Path,
    ops: &[Op],
    results: &Results,
    params: &serde_json::Value,
    title: &str,
) -> std::io::Result<()> {
    let doc = serde_json::json!({ "params": params, "results": results });
    let text = serde_json::to_string_pretty(&doc).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("results.json"), text + "\n")?;
    std::fs::write(dir.join("latency.svg"), latency_svg(ops, results, title))?;
    std::fs::write(
        dir.join("throughput.svg"),
        throughput_svg(ops, results, title),
    )?;
    Ok(())
}
