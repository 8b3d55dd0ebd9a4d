//! Go-compatible durations (wire.md §3): a JSON string in Go syntax (`"30s"`,
//! `"1h30m"`, `"500ms"`, `"-5m"`, `"0"`) or a JSON number of nanoseconds.

use std::time::Duration;

use serde_json::Value;

/// A signed duration in nanoseconds, as Go's `time.Duration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct GoDuration(pub i64);

impl GoDuration {
    /// The duration if it is strictly positive.
    pub fn positive(self) -> Option<Duration> {
        (self.0 > 0).then(|| Duration::from_nanos(self.0 as u64))
    }
}

/// Parses a Go duration string.
pub fn parse_go_duration_str(s: &str) -> Result<GoDuration, String> {
    let trimmed = s.trim();
    let (negative, body) = match trimmed.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, trimmed.strip_prefix('+').unwrap_or(trimmed)),
    };
    if body == "0" {
        return Ok(GoDuration(0));
    }
    // humantime accepts "1h30m", "500ms", "1h 30m"; Go has no spaces but
    // accepting them is harmless. Go's "us"/"µs" are also humantime units.
    let d = humantime::parse_duration(body).map_err(|e| {
        format!("invalid duration {s:?}: {e} (expected e.g. \"30s\", \"5m\", \"1h30m\")")
    })?;
    let nanos = i64::try_from(d.as_nanos()).map_err(|_| format!("duration {s:?} is too large"))?;
    Ok(GoDuration(if negative { -nanos } else { nanos }))
}

/// Parses a JSON duration value: a Go string or an integer of nanoseconds.
/// `null` and any other type are errors (for that field only; callers decide).
pub fn parse_go_duration(value: &Value) -> Result<GoDuration, String> {
    match value {
        Value::String(s) => parse_go_duration_str(s),
        Value::Number(n) => n
            .as_i64()
            .map(GoDuration)
            .ok_or_else(|| format!("duration {n} is not an integer number of nanoseconds")),
        other => Err(format!(
            "duration must be a string like \"5m\" or integer nanoseconds, got {}",
            json_type(other)
        )),
    }
}

/// serde helper for `Option<Duration>` fields of our own config files that
/// accept Go syntax, humantime syntax or nanoseconds.
pub mod serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        if value.is_null() {
            return Ok(None);
        }
        let parsed = super::parse_go_duration(&value).map_err(serde::de::Error::custom)?;
        if parsed.0 < 0 {
            return Err(serde::de::Error::custom("duration must not be negative"));
        }
        Ok(Some(Duration::from_nanos(parsed.0 as u64)))
    }
}

pub(crate) fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn go_strings() {
        assert_eq!(
            parse_go_duration(&json!("30s")).unwrap(),
            GoDuration(30_000_000_000)
        );
        assert_eq!(
            parse_go_duration(&json!("1h30m")).unwrap(),
            GoDuration(5_400_000_000_000)
        );
        assert_eq!(
            parse_go_duration(&json!("500ms")).unwrap(),
            GoDuration(500_000_000)
        );
        assert_eq!(
            parse_go_duration(&json!("-5m")).unwrap(),
            GoDuration(-300_000_000_000)
        );
        assert_eq!(parse_go_duration(&json!("0")).unwrap(), GoDuration(0));
    }

    #[test]
    fn nanoseconds() {
        assert_eq!(
            parse_go_duration(&json!(1_000_000_000i64)).unwrap(),
            GoDuration(1_000_000_000)
        );
        assert!(parse_go_duration(&json!(1.5)).is_err());
    }

    #[test]
    fn errors_name_the_value() {
        let err = parse_go_duration(&json!("five minutes")).unwrap_err();
        assert!(err.contains("five minutes"), "{err}");
        assert!(parse_go_duration(&json!(null))
            .unwrap_err()
            .contains("null"));
        assert!(parse_go_duration(&json!(true)).is_err());
    }

    #[test]
    fn positive_only() {
        assert_eq!(GoDuration(0).positive(), None);
        assert_eq!(GoDuration(-1).positive(), None);
        assert_eq!(GoDuration(5).positive(), Some(Duration::from_nanos(5)));
    }
}
