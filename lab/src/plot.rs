//! The bench plots (PNG), from the results `cargo xtask bench` writes.
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use serde_json::Value;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn font() -> Result<()> {
    static ONCE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let bytes = std::fs::read(FONT).map_err(|e| format!("{FONT}: {e} (fonts-dejavu-core)"))?;
        plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            Box::leak(bytes.into_boxed_slice()),
        )
        .map_err(|_| format!("{FONT}: not a font"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plot: {e:?}")
}

/// Delivered Mpps per setup, for each frame size and flow count.
pub fn pps(results: &Value, out: &Path) -> Result<()> {
    font()?;
    let runs = results["pps"].as_array().context("pps results")?;
    let setups: Vec<&str> = {
        let mut v: Vec<&str> = runs.iter().filter_map(|r| r["setup"].as_str()).collect();
        v.dedup();
        v
    };
    let cases: Vec<(u64, u64)> = {
        let mut v: Vec<(u64, u64)> = runs
            .iter()
            .map(|r| {
                (
                    r["frame_bytes"].as_u64().unwrap_or(0),
                    r["flows"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let max = runs
        .iter()
        .filter_map(|r| r["mpps"].as_f64())
        .fold(0.0, f64::max)
        * 1.15;
    let root = BitMapBackend::new(out, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let n = (cases.len() * (setups.len() + 1)) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Mpps VM to VM across hosts ({})",
                results["date"].as_str().unwrap_or("")
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..n, 0f64..max.max(0.01))
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(cases.len())
        .x_label_formatter(&|x| {
            let i = (*x / (setups.len() + 1) as f64) as usize;
            cases
                .get(i)
                .map_or(String::new(), |(b, f)| format!("{b} B, {f} flows"))
        })
        .y_desc("Mpps delivered")
        .draw()
        .map_err(err)?;
    let colors = [
        RGBColor(0, 114, 178),
        RGBColor(86, 180, 233),
        RGBColor(213, 94, 0),
    ];
    for (si, setup) in setups.iter().enumerate() {
        let color = colors[si % colors.len()];
        let bars: Vec<Rectangle<(f64, f64)>> = cases
            .iter()
            .enumerate()
            .filter_map(|(ci, (b, f))| {
                let r = runs
                    .iter()
                    .find(|r| r["setup"] == *setup && r["frame_bytes"] == *b && r["flows"] == *f)?;
                let x = (ci * (setups.len() + 1) + si) as f64 + 0.5;
                Some(Rectangle::new(
                    [(x, 0.0), (x + 0.9, r["mpps"].as_f64().unwrap_or(0.0))],
                    color.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(err)?
            .label(*setup)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Per-packet ns against rules, ports and flows (log scale).
pub fn scaling(results: &Value, out: &Path) -> Result<()> {
    font()?;
    let ns = results["criterion_ns"]
        .as_object()
        .context("criterion results")?;
    let series = |prefix: &str| -> Vec<(f64, f64)> {
        let mut v: Vec<(f64, f64)> = ns
            .iter()
            .filter_map(|(k, v)| {
                let n: f64 = k.strip_prefix(prefix)?.parse().ok()?;
                Some((n, v.as_f64()?))
            })
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    };
    let lines = [
        (
            "established flow vs rules",
            series("sg/established/"),
            RGBColor(0, 114, 178),
        ),
        (
            "new flow vs rules",
            series("sg/new_flow/"),
            RGBColor(213, 94, 0),
        ),
        (
            "established vs ports",
            series("scale/ports/"),
            RGBColor(0, 158, 115),
        ),
        (
            "established vs tracked flows",
            series("scale/flows/"),
            RGBColor(204, 121, 167),
        ),
    ];
    let ymax = lines
        .iter()
        .flat_map(|l| l.1.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        * 1.2;
    let root = BitMapBackend::new(out, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "ns per packet (BPF_PROG_TEST_RUN) as the state grows",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((1f64..300_000f64).log_scale(), 0f64..ymax.max(1.0))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("rules, ports or flows")
        .y_desc("ns")
        .draw()
        .map_err(err)?;
    for (name, points, color) in lines {
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 15, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn plots_are_pngs() {
        let r = serde_json::json!({
            "date": "test",
            "pps": [
                {"setup": "a", "frame_bytes": 60, "flows": 1, "mpps": 0.3},
                {"setup": "b", "frame_bytes": 60, "flows": 1, "mpps": 0.1}],
            "criterion_ns": {"sg/established/1": 230.0, "sg/established/100": 231.0, "scale/ports/10": 228.0}
        });
        let dir = std::env::temp_dir().join(format!("cloison-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        super::pps(&r, &dir.join("p.png")).unwrap();
        super::scaling(&r, &dir.join("s.png")).unwrap();
        for f in ["p.png", "s.png"] {
            let bytes = std::fs::read(dir.join(f)).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{f} is a PNG");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
