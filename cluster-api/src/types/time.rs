//! Durations as Docker writes them, and the clock objects carry.

use crate::types::{Invalid, Result};

/// Docker's (and compose's) durations: 300ms, 10s, 1m30s, 1h; a bare number is
/// seconds.
pub fn parse_duration(t: &str) -> Result<u64> {
    let bad = || Invalid(format!("duration {t:?}: e.g. 500ms, 10s, 1m30s"));
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n * 1000);
    }
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = t.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let mut unit = c.to_string();
        if c == 'm' && chars.peek() == Some(&'s') {
            unit.push(chars.next().unwrap_or('s'));
        }
        let v: f64 = num.parse().map_err(|_| bad())?;
        num.clear();
        total += v * match unit.as_str() {
            "ms" => 1.0,
            "s" => 1000.0,
            "m" => 60_000.0,
            "h" => 3_600_000.0,
            _ => return Err(bad()),
        };
        any = true;
    }
    if !num.is_empty() || !any {
        return Err(bad());
    }
    Ok(total as u64)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
