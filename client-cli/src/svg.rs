//! A small hand-written SVG line chart (no dependencies): axes with round tick values,
//! grid lines, axis labels, a title and a legend. Used by `chat-cli bench --svg`.

use std::fmt::Write as _;

/// One line of the chart.
#[derive(Clone, Debug)]
pub struct Series {
    /// Shown in the legend.
    pub name: String,
    /// Any SVG colour, e.g. `#1f77b4`.
    pub color: String,
    /// Draw the line dashed.
    pub dashed: bool,
    /// `(x, y)` points, in x order. Non-finite values are skipped.
    pub points: Vec<(f64, f64)>,
}

/// A line chart.
#[derive(Clone, Debug)]
pub struct Chart {
    /// Above the plot.
    pub title: String,
    /// Under the x axis.
    pub x_label: String,
    /// Left of the y axis (rotated).
    pub y_label: String,
    /// The x range to show (it is widened to round ticks and to hold every point);
    /// `None`: from 0 (or the smallest x) to the largest x.
    pub x_range: Option<(f64, f64)>,
    /// The lines.
    pub series: Vec<Series>,
    /// Shaded x ranges drawn under the lines (e.g. fault windows), with a label each.
    pub bands: Vec<Band>,
}

/// A shaded x range.
#[derive(Clone, Debug)]
pub struct Band {
    /// Where it starts.
    pub from: f64,
    /// Where it ends.
    pub to: f64,
    /// Shown at its top (may be empty).
    pub label: String,
}

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 480.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

/// Escapes text for SVG element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Round tick values covering `[lo, hi]`: about `target` steps of 1, 2 or 5 × 10^k.
/// Returns the ticks (first ≤ lo, last ≥ hi).
pub fn ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let (lo, hi) = if hi > lo { (lo, hi) } else { (lo, lo + 1.0) };
    let raw = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).floor() * step;
    let mut out = Vec::new();
    let mut i = 0u32;
    loop {
        let v = first + f64::from(i) * step;
        // Snap away floating-point noise such as 0.30000000000000004.
        let v = (v / step).round() * step;
        out.push(v);
        if v >= hi - step * 1e-9 || i > 1000 {
            break;
        }
        i += 1;
    }
    out
}

/// A tick label: integers without decimals, else up to 3 significant decimals.
fn label(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Renders the chart as a complete SVG document.
pub fn render(chart: &Chart) -> String {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let all: Vec<(f64, f64)> = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().filter(finite).copied())
        .collect();
    let x_min = all.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let x_max = all.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let y_max = all.iter().map(|p| p.1).fold(0.0, f64::max);
    let (x_min, x_max) = match (all.is_empty(), chart.x_range) {
        (true, None) => (0.0, 1.0),
        (true, Some(r)) => r,
        (false, None) => (x_min.min(0.0), x_max),
        (false, Some((lo, hi))) => (x_min.min(lo), x_max.max(hi)),
    };
    let xt = ticks(x_min, x_max, 10);
    let yt = ticks(0.0, if y_max > 0.0 { y_max } else { 1.0 }, 8);
    let (x0, x1) = (xt[0], xt[xt.len() - 1]);
    let (y0, y1) = (yt[0], yt[yt.len() - 1]);
    let pw = WIDTH - LEFT - RIGHT;
    let ph = HEIGHT - TOP - BOTTOM;
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| TOP + ph - (y - y0) / (y1 - y0) * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="28" text-anchor="middle" font-size="16">{}</text>"#,
        LEFT + pw / 2.0,
        escape(&chart.title)
    );
    // Grid and tick labels.
    for &v in &yt {
        let y = sy(v);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e0e0e0"/>"##,
            LEFT + pw
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            label(v)
        );
    }
    for &v in &xt {
        let x = sx(v);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#f0f0f0"/>"##,
            TOP + ph
        );
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            TOP + ph + 18.0,
            label(v)
        );
    }
    // Shaded bands, clipped to the plot.
    for (i, b) in chart.bands.iter().enumerate() {
        if !(b.from.is_finite() && b.to.is_finite()) {
            continue;
        }
        let (a, z) = (sx(b.from.max(x0)), sx(b.to.min(x1)));
        if z <= a {
            continue;
        }
        let _ = writeln!(
            s,
            r##"<rect x="{a:.1}" y="{TOP}" width="{:.1}" height="{ph:.1}" fill="#ff7f0e" fill-opacity="0.15"><title>{}</title></rect>"##,
            z - a,
            escape(&b.label)
        );
        if !b.label.is_empty() {
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" font-size="9" fill="#a05000">{}</text>"##,
                a + 2.0,
                TOP + 10.0 + (i % 4) as f64 * 10.0,
                escape(&b.label)
            );
        }
    }
    // Axes.
    let _ = writeln!(
        s,
        r#"<line x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
        TOP + ph,
        LEFT + pw,
        TOP + ph
    );
    let _ = writeln!(
        s,
        r#"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{:.1}" stroke="black"/>"#,
        TOP + ph
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        HEIGHT - 15.0,
        escape(&chart.x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">{}</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        escape(&chart.y_label)
    );
    // Lines and legend.
    for (i, series) in chart.series.iter().enumerate() {
        let pts: Vec<String> = series
            .points
            .iter()
            .filter(finite)
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let dash = if series.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let color = escape(&series.color);
        if pts.len() == 1 {
            let _ = writeln!(
                s,
                r#"<circle cx="{}" r="3" fill="{color}"/>"#,
                pts[0].replacen(',', r#"" cy=""#, 1)
            );
        } else if !pts.is_empty() {
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"/>"#,
                pts.join(" ")
            );
        }
        let ly = TOP + 10.0 + 22.0 * i as f64;
        let lx = LEFT + pw + 15.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"{dash}/>"#,
            lx + 28.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 34.0,
            ly + 4.0,
            escape(&series.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 10.0, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let t = ticks(0.0, 3.7, 8);
        assert_eq!(t.first(), Some(&0.0));
        assert!(t.last().is_some_and(|v| *v >= 3.7));
        assert!(t.windows(2).all(|w| (w[1] - w[0] - 0.5).abs() < 1e-9));
        assert_eq!(ticks(5.0, 5.0, 4).first(), Some(&5.0));
    }

    #[test]
    fn renders_lines_labels_and_escapes() {
        let chart = Chart {
            title: "latency <ms> & more".into(),
            x_label: "seconds".into(),
            y_label: "ms".into(),
            x_range: Some((0.0, 4.0)),
            series: vec![
                Series {
                    name: "p50".into(),
                    color: "#1f77b4".into(),
                    dashed: false,
                    points: vec![(0.0, 1.0), (1.0, 2.0), (2.0, f64::NAN), (3.0, 1.5)],
                },
                Series {
                    name: "p99".into(),
                    color: "#d62728".into(),
                    dashed: true,
                    points: vec![(1.0, 4.0)],
                },
            ],
            bands: vec![Band {
                from: 1.0,
                to: 2.5,
                label: "kill <n1>".into(),
            }],
        };
        let svg = render(&chart);
        assert_eq!(svg.matches("fill-opacity=\"0.15\"").count(), 1);
        assert!(svg.contains("kill &lt;n1&gt;"));
        assert!(svg.starts_with("<svg "));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("latency &lt;ms&gt; &amp; more"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert_eq!(svg.matches("<circle").count(), 1);
        assert!(svg.contains(">p50</text>") && svg.contains(">p99</text>"));
        assert!(svg.contains(">seconds</text>"));
        assert!(!svg.contains("NaN"));
        assert!(svg.contains(">4</text>"), "the x range reaches 4");
        // An empty chart still renders axes.
        let empty = render(&Chart {
            series: vec![],
            ..chart
        });
        assert!(empty.contains("<line"));
    }
}
