//! Results: one JSON line for machines, then a short table for people; a progress line meanwhile.

use std::io::Write;

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

/// A histogram of microseconds (1 µs to 60 s, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| Histogram::new(3).expect("a 3-digit histogram"))
}

/// p50/p90/p99/p999/max of a microsecond histogram, in milliseconds.
pub fn percentiles(h: &Histogram<u64>) -> Value {
    let ms = |us: u64| (us as f64 / 10.0).round() / 100.0;
    if h.is_empty() {
        return json!(null);
    }
    json!({
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
        "count": h.len(),
    })
}

/// The p99 of a microsecond histogram in milliseconds.
pub fn p99_ms(h: &Histogram<u64>) -> f64 {
    h.value_at_quantile(0.99) as f64 / 1000.0
}

/// Prints the JSON line and the table.
pub fn print(scenario: &str, fields: Map<String, Value>) {
    let mut line = Map::new();
    line.insert("scenario".into(), scenario.into());
    line.extend(fields.clone());
    println!("{}", Value::Object(line));
    println!("\n{scenario}");
    for (k, v) in &fields {
        let shown = match v {
            Value::Object(o) => o.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("  "),
            other => other.to_string(),
        };
        println!("  {k:<28} {shown}");
    }
}

/// A progress line on stderr, redrawn in place.
pub fn progress(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "\r\x1b[2K{text}");
    let _ = err.flush();
}

/// Ends the progress line.
pub fn progress_done() {
    eprintln!();
}
