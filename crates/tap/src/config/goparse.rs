//! Go-compatible value syntax: `strconv.ParseBool` booleans and `time.ParseDuration`
//! durations, so every value that worked with the Go tap works here unchanged.

use std::time::Duration;

/// Parses a boolean the way Go's `strconv.ParseBool` does.
///
/// # Errors
/// Anything but `1 t T TRUE true True 0 f F FALSE false False`.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        other => Err(format!("{other:?} is not a boolean (use true or false)")),
    }
}

/// Parses a duration the way Go's `time.ParseDuration` does: a sequence of decimal numbers
/// with units `ns`, `us`, `µs`, `ms`, `s`, `m`, `h` (`1m30s`, `1.5s`, `300ms`), or `0`.
/// Negative durations are rejected: no tap setting has a meaning for them.
///
/// # Errors
/// A missing or unknown unit, an empty number, or an overflowing value.
pub fn parse_duration(input: &str) -> Result<Duration, String> {
    let bad = || format!("{input:?} is not a duration (examples: 1s, 300ms, 1m30s)");
    let s = input.strip_prefix('+').unwrap_or(input);
    if s.starts_with('-') {
        return Err(format!("{input:?}: a negative duration is not allowed"));
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(bad());
    }
    let mut rest = s;
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (number, after) = rest.split_at(number_len);
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(bad());
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after_unit) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(bad()),
        };
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad())?
        };
        let mut nanos = whole.checked_mul(unit_nanos).ok_or_else(bad)?;
        // Fractions are exact to the nanosecond, like Go.
        let mut scale = unit_nanos;
        for digit in frac.bytes() {
            scale /= 10;
            nanos += u128::from(digit - b'0') * scale;
        }
        total_nanos = total_nanos.checked_add(nanos).ok_or_else(bad)?;
        rest = after_unit;
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| bad())?;
    // The remainder of a division by 1e9 always fits in u32.
    let sub = u32::try_from(total_nanos % 1_000_000_000).map_err(|_| bad())?;
    Ok(Duration::new(secs, sub))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_booleans_are_accepted_in_every_spelling() {
        for t in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_bool(t), Ok(true), "{t}");
        }
        for f in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_bool(f), Ok(false), "{f}");
        }
        for bad in ["", "yes", "on", "tRuE", "2"] {
            assert!(parse_bool(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn go_durations_parse_like_time_parse_duration() {
        let cases = [
            ("0", Duration::ZERO),
            ("1s", Duration::from_secs(1)),
            ("300s", Duration::from_secs(300)),
            ("60s", Duration::from_secs(60)),
            ("1m30s", Duration::from_secs(90)),
            ("1h2m3s", Duration::from_secs(3723)),
            ("500ms", Duration::from_millis(500)),
            ("1.5s", Duration::from_millis(1500)),
            (".5s", Duration::from_millis(500)),
            ("10us", Duration::from_micros(10)),
            ("10µs", Duration::from_micros(10)),
            ("7ns", Duration::from_nanos(7)),
            ("24h", Duration::from_secs(86_400)),
            ("+2s", Duration::from_secs(2)),
        ];
        for (input, want) in cases {
            assert_eq!(parse_duration(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn malformed_durations_are_rejected_with_the_input_named() {
        for bad in ["", "1", "s", "1x", "1.2.3s", "-1s", "1s2", "abc", "."] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }
}
