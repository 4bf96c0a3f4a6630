//! Figures, their ratios to the baselines measured in the same run, the
//! targets, and how they are printed (a text table, or JSON).

use serde::Serialize;

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Stable key, e.g. `sidecar_batch_msgs_per_s`.
    pub key: &'static str,
    /// What was measured, for people.
    pub label: String,
    /// The value.
    pub value: f64,
    /// Its unit (`msg/s`, `ms`, `fsync/s`, `MiB`).
    pub unit: &'static str,
    /// The key of the figure it is compared with, if any.
    pub baseline: Option<&'static str>,
    /// What the ratio is taken against, for people.
    pub baseline_label: Option<String>,
    /// `value / baseline value`.
    pub ratio: Option<f64>,
}

/// A target, checked as a ratio.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is promised, e.g. `batch throughput >= 0.8x direct pipelined`.
    pub name: &'static str,
    /// The figure checked.
    pub figure: &'static str,
    /// The ratio measured (figure / baseline, or figure / fixed budget).
    pub ratio: f64,
    /// `>=` or `<=`.
    pub op: &'static str,
    /// The bound on the ratio.
    pub bound: f64,
    /// Whether the target was met.
    pub pass: bool,
}

/// Everything one run measured.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Settings of the run (sizes, batch size, machine).
    pub settings: serde_json::Map<String, serde_json::Value>,
    /// Figures in the order they were measured.
    pub figures: Vec<Figure>,
    /// Targets with PASS/MISS.
    pub targets: Vec<Target>,
}

impl Report {
    /// Records a setting shown in the header.
    pub fn setting(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.settings.insert(key.to_owned(), value.into());
    }

    /// Records a baseline figure (no ratio).
    pub fn baseline(&mut self, key: &'static str, label: &str, value: f64, unit: &'static str) {
        self.figures.push(Figure {
            key,
            label: label.to_owned(),
            value,
            unit,
            baseline: None,
            baseline_label: None,
            ratio: None,
        });
    }

    /// Records a figure with its ratio to a fixed budget.
    pub fn budgeted(
        &mut self,
        key: &'static str,
        label: &str,
        value: f64,
        unit: &'static str,
        budget: f64,
    ) {
        self.figures.push(Figure {
            key,
            label: label.to_owned(),
            value,
            unit,
            baseline: None,
            baseline_label: Some(format!("budget {} {unit}", fmt_value(budget))),
            ratio: Some(value / budget),
        });
    }

    /// Records a figure with its ratio to the baseline `base`.
    pub fn compared(
        &mut self,
        key: &'static str,
        label: &str,
        value: f64,
        unit: &'static str,
        base: &'static str,
    ) {
        let ratio = self.value(base).map(|b| value / b);
        let baseline_label = self
            .figures
            .iter()
            .find(|f| f.key == base)
            .map(|f| f.label.clone());
        self.figures.push(Figure {
            key,
            label: label.to_owned(),
            value,
            unit,
            baseline: Some(base),
            baseline_label,
            ratio,
        });
    }

    /// The value of figure `key`, if measured.
    pub fn value(&self, key: &str) -> Option<f64> {
        self.figures.iter().find(|f| f.key == key).map(|f| f.value)
    }

    /// Checks `figure / baseline op bound`; a figure or baseline that was not
    /// measured is a miss.
    pub fn target(
        &mut self,
        name: &'static str,
        figure: &'static str,
        baseline: f64,
        op: &'static str,
        bound: f64,
    ) {
        let ratio = self.value(figure).map_or(f64::NAN, |v| v / baseline);
        let pass = ratio.is_finite()
            && match op {
                ">=" => ratio >= bound,
                _ => ratio <= bound,
            };
        self.targets.push(Target {
            name,
            figure,
            ratio,
            op,
            bound,
            pass,
        });
    }

    /// Whether every target passed.
    pub fn all_pass(&self) -> bool {
        self.targets.iter().all(|t| t.pass)
    }

    /// The human-readable table.
    pub fn text(&self) -> String {
        let mut out = String::new();
        out.push_str("warren-bench: 1 KiB persistent messages to a quorum queue, one private broker, one machine\n");
        for (k, v) in &self.settings {
            out.push_str(&format!("  {k}: {v}\n"));
        }
        out.push('\n');
        out.push_str(&format!(
            "{:<58} {:>12} {:<8} {:>8}  {}\n",
            "figure", "value", "unit", "ratio", "baseline"
        ));
        out.push_str(&format!("{}\n", "-".repeat(118)));
        for f in &self.figures {
            let ratio = f
                .ratio
                .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"));
            let base = f
                .baseline_label
                .clone()
                .unwrap_or_else(|| "(baseline)".to_owned());
            out.push_str(&format!(
                "{:<58} {:>12} {:<8} {:>8}  {}\n",
                f.label,
                fmt_value(f.value),
                f.unit,
                ratio,
                base
            ));
        }
        out.push('\n');
        out.push_str(&format!(
            "{:<66} {:>10} {:>10}  {}\n",
            "target", "ratio", "bound", "result"
        ));
        out.push_str(&format!("{}\n", "-".repeat(98)));
        for t in &self.targets {
            out.push_str(&format!(
                "{:<66} {:>9.2}x {:>2}{:>7.2}x  {}\n",
                t.name,
                t.ratio,
                t.op,
                t.bound,
                if t.pass { "PASS" } else { "MISS" }
            ));
        }
        let missed = self.targets.iter().filter(|t| !t.pass).count();
        out.push_str(&format!(
            "\n{} of {} targets met{}\n",
            self.targets.len() - missed,
            self.targets.len(),
            if missed > 0 {
                " -- SOME TARGETS MISSED"
            } else {
                ""
            }
        ));
        out
    }
}

fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        format!("{v}")
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Latency percentiles of a set of samples, in milliseconds.
pub fn percentile_ms(sorted: &[std::time::Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64)).ceil() as usize;
    let i = rank.clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ratios_and_targets() {
        let mut r = Report::default();
        r.baseline("base", "direct", 1000.0, "msg/s");
        r.compared("fig", "sidecar", 850.0, "msg/s", "base");
        assert_eq!(r.figures[1].ratio, Some(0.85));
        r.target("fig >= 0.8x base", "fig", 1000.0, ">=", 0.8);
        r.target("fig <= 0.5x base", "fig", 1000.0, "<=", 0.5);
        r.target("missing", "nope", 1000.0, ">=", 0.1);
        assert!(r.targets[0].pass);
        assert!(!r.targets[1].pass);
        assert!(!r.targets[2].pass, "an unmeasured figure is a miss");
        assert!(!r.all_pass());
        let text = r.text();
        assert!(text.contains("PASS") && text.contains("MISS"), "{text}");
        assert!(text.contains("0.85x"), "{text}");
    }

    #[test]
    fn percentiles() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&s, 50.0), 50.0);
        assert_eq!(percentile_ms(&s, 99.0), 99.0);
        assert_eq!(percentile_ms(&s[..1], 99.0), 1.0);
        assert!(percentile_ms(&[], 50.0).is_nan());
    }
}
