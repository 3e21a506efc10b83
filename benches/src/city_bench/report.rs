//! The city run as an HTML page beside its Markdown table: latency CDFs per tier (time to first token and
//! total), tokens/s per tier over time, each zone's share (served / offered, mean TTFT; hot zones marked)
//! and the rejections over time. One self-contained file with inline SVG: no script, no network, opens
//! anywhere and can be committed.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One request as the report needs it.
pub struct Point {
    pub zone: usize,
    pub hot: bool,
    pub tier: String,
    pub status: u16,
    /// Seconds from the run's start to the request's end.
    pub end_s: f64,
    pub ttft_ms: f64,
    pub total_ms: f64,
    pub completion_tokens: usize,
}

const W: f64 = 560.0;
const H: f64 = 260.0;
const PAD: f64 = 46.0;
const COLORS: [&str; 4] = ["#2f7ed8", "#e4572e", "#3aa655", "#9b59b6"];

/// A line chart: each series `(name, points)`; `log_x` for latencies.
fn chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    log_x: bool,
) -> String {
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.1.iter().copied()).collect();
    if all.is_empty() {
        return format!("<div><h3>{title}</h3><p>no data</p></div>");
    }
    let tx = |x: f64| if log_x { x.max(1.0).log10() } else { x };
    let (mut x0, mut x1) = (f64::MAX, f64::MIN);
    let (mut y0, mut y1) = (0.0f64, f64::MIN);
    for &(x, y) in &all {
        x0 = x0.min(tx(x));
        x1 = x1.max(tx(x));
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let px = |x: f64| PAD + (tx(x) - x0) / (x1 - x0) * (W - PAD - 10.0);
    let py = |y: f64| H - PAD + 10.0 - (y - y0) / (y1 - y0) * (H - PAD - 10.0);
    let mut svg = format!(
        r##"<div><h3>{title}</h3><svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img"><rect width="{W}" height="{H}" fill="#fff"/>"##
    );
    for k in 0..=4 {
        let f = k as f64 / 4.0;
        let (gx, gy) = (x0 + f * (x1 - x0), y0 + f * (y1 - y0));
        let xv = if log_x { 10f64.powf(gx) } else { gx };
        let _ = write!(
            svg,
            r##"<line x1="{a}" y1="{b}" x2="{a}" y2="{c}" stroke="#eee"/><text x="{a}" y="{d}" font-size="10" text-anchor="middle">{xv:.0}</text><line x1="{PAD}" y1="{e}" x2="{g}" y2="{e}" stroke="#eee"/><text x="{h}" y="{e}" font-size="10" text-anchor="end">{gl}</text>"##,
            a = PAD + f * (W - PAD - 10.0),
            b = 10.0,
            c = H - PAD + 10.0,
            d = H - PAD + 24.0,
            e = py(gy),
            g = W - 10.0,
            h = PAD - 4.0,
            gl = if y1 - y0 > 10.0 {
                format!("{gy:.0}")
            } else {
                format!("{gy:.2}")
            },
        );
    }
    let _ = write!(
        svg,
        r##"<text x="{}" y="{}" font-size="11" text-anchor="middle">{x_label}</text><text x="12" y="{}" font-size="11" transform="rotate(-90 12 {})" text-anchor="middle">{y_label}</text>"##,
        PAD + (W - PAD) / 2.0,
        H - 6.0,
        H / 2.0,
        H / 2.0
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = write!(
            svg,
            r##"<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{}"/><text x="{}" y="{}" font-size="11" fill="{color}">{name}</text>"##,
            path.join(" "),
            W - 150.0,
            22.0 + 14.0 * i as f64
        );
    }
    svg + "</svg></div>"
}

/// The empirical CDF of `v` (finite values), at most 200 points.
fn cdf(mut v: Vec<f64>) -> Vec<(f64, f64)> {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let step = (n / 200).max(1);
    (0..n)
        .step_by(step)
        .chain(n.checked_sub(1))
        .map(|i| (v[i], (i + 1) as f64 / n as f64))
        .collect()
}

/// The page: `title`, `summary` (the Markdown text, shown as preformatted), and the charts of `points`
/// over a run of `duration_s` seconds with `zones` zones.
pub fn html(title: &str, summary: &str, points: &[Point], duration_s: f64, zones: usize) -> String {
    let tiers = ["driver", "theia", "saturn"];
    let ok: Vec<&Point> = points.iter().filter(|p| p.status == 200).collect();
    let per_tier = |f: fn(&Point) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
        tiers
            .iter()
            .map(|t| {
                let v: Vec<f64> = ok.iter().filter(|p| p.tier == *t).map(|p| f(p)).collect();
                (format!("{t} ({})", v.len()), cdf(v))
            })
            .filter(|(_, c)| !c.is_empty())
            .collect()
    };
    let bins = (duration_s.ceil() as usize).clamp(1, 600);
    let width = duration_s.max(1.0) / bins as f64;
    let over_time = |keep: &dyn Fn(&Point) -> Option<f64>| -> Vec<f64> {
        let mut b = vec![0.0; bins + 1];
        for p in points {
            if let Some(v) = keep(p) {
                b[((p.end_s / width) as usize).min(bins)] += v;
            }
        }
        b
    };
    let tps: Vec<(String, Vec<(f64, f64)>)> = ["driver", "theia"]
        .iter()
        .map(|t| {
            let b = over_time(&|p: &Point| {
                (p.status == 200 && p.tier == *t).then_some(p.completion_tokens as f64)
            });
            let pts = b
                .iter()
                .enumerate()
                .map(|(i, v)| (i as f64 * width, v / width))
                .collect();
            (t.to_string(), pts)
        })
        .collect();
    let rejected = over_time(&|p: &Point| (p.status != 200).then_some(1.0));
    let rejections = vec![(
        "rejected requests".to_string(),
        rejected
            .iter()
            .enumerate()
            .map(|(i, v)| (i as f64 * width, *v))
            .collect(),
    )];
    // Per zone: served / offered and mean TTFT, hot and other zones as two series sorted by the value.
    let mut offered = vec![0usize; zones];
    let mut served = vec![0usize; zones];
    let mut ttft: Vec<Vec<f64>> = vec![Vec::new(); zones];
    let mut hot = vec![false; zones];
    for p in points {
        offered[p.zone] += 1;
        hot[p.zone] = p.hot;
        if p.status == 200 {
            served[p.zone] += 1;
            if p.ttft_ms.is_finite() && p.tier != "saturn" {
                ttft[p.zone].push(p.ttft_ms);
            }
        }
    }
    let share_series = |f: &dyn Fn(usize) -> Option<f64>| -> Vec<(String, Vec<(f64, f64)>)> {
        [(true, "hot zones"), (false, "other zones")]
            .iter()
            .map(|&(h, name)| {
                let mut v: Vec<f64> = (0..zones).filter(|&z| hot[z] == h).filter_map(f).collect();
                v.sort_by(f64::total_cmp);
                let n = v.len().max(1) as f64;
                let pts = v
                    .iter()
                    .enumerate()
                    .map(|(i, &y)| ((i + 1) as f64 / n * 100.0, y))
                    .collect();
                (format!("{name} ({})", v.len()), pts)
            })
            .collect()
    };
    let share = share_series(&|z| (offered[z] > 0).then(|| served[z] as f64 / offered[z] as f64));
    let mean_ttft = share_series(&|z| {
        (!ttft[z].is_empty()).then(|| ttft[z].iter().sum::<f64>() / ttft[z].len() as f64)
    });
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for p in points.iter().filter(|p| p.status != 200) {
        *by_status.entry(p.status).or_default() += 1;
    }
    let statuses = if by_status.is_empty() {
        "none".to_string()
    } else {
        by_status
            .iter()
            .map(|(s, n)| format!("{n} × HTTP {s}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let mut page = format!(
        r##"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{t}</title><style>body{{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}}.grid{{display:grid;grid-template-columns:repeat(auto-fit,minmax(580px,1fr));gap:12px}}pre{{white-space:pre-wrap;background:#f6f8fa;padding:12px;font-size:12px}}h3{{margin:8px 0 4px;font-size:14px}}</style></head><body><h1>{t}</h1><pre>{s}</pre><div class="grid">"##,
        t = esc(title),
        s = esc(summary)
    );
    page += &chart(
        "Time to first token, CDF per tier",
        "ms (log)",
        "fraction",
        &per_tier(|p| p.ttft_ms),
        true,
    );
    page += &chart(
        "Total latency, CDF per tier",
        "ms (log)",
        "fraction",
        &per_tier(|p| p.total_ms),
        true,
    );
    page += &chart("Generated tokens/s over time", "s", "tokens/s", &tps, false);
    page += &chart(
        &format!("Rejections over time ({statuses})"),
        "s",
        "requests per bin",
        &rejections,
        false,
    );
    page += &chart(
        "Each zone's served / offered (zones sorted)",
        "% of zones",
        "served / offered",
        &share,
        false,
    );
    page += &chart(
        "Each zone's mean TTFT (zones sorted)",
        "% of zones",
        "ms",
        &mean_ttft,
        false,
    );
    page += "</div></body></html>\n";
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_has_every_chart_and_escapes_the_summary() {
        let points: Vec<Point> = (0..50)
            .map(|i| Point {
                zone: i % 5,
                hot: i % 5 == 0,
                tier: ["driver", "theia", "saturn"][i % 3].into(),
                status: if i % 17 == 0 { 429 } else { 200 },
                end_s: i as f64 / 5.0,
                ttft_ms: 20.0 + i as f64,
                total_ms: 200.0 + 3.0 * i as f64,
                completion_tokens: 24,
            })
            .collect();
        let page = html("city <run>", "a | b <c>", &points, 10.0, 5);
        assert_eq!(page.matches("<svg").count(), 6);
        assert!(page.contains("city &lt;run&gt;") && page.contains("a | b &lt;c&gt;"));
        assert!(page.contains("3 × HTTP 429"));
        assert!(!page.contains("NaN"));
    }
}
