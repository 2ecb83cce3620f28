//! RFC 3339 timestamps (UTC) for image configs and build metadata, without a date library.

/// Formats milliseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (whole seconds
/// without the fraction when `millis` is a multiple of 1000).
pub fn rfc3339_millis(millis: u64) -> String {
    let secs = millis / 1000;
    let fraction = millis % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let time = format!("{:02}:{:02}:{:02}", rem / 3600, (rem % 3600) / 60, rem % 60);
    if fraction == 0 {
        format!("{year:04}-{month:02}-{day:02}T{time}Z")
    } else {
        format!("{year:04}-{month:02}-{day:02}T{time}.{fraction:03}Z")
    }
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Milliseconds since the Unix epoch (0 for a clock before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Milliseconds since `since` (a phase's length).
pub fn elapsed_ms(since: std::time::Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Parses a Go duration (`time.ParseDuration`: `30s`, `1m30s`, `1.5h`, `100ms`, `-5m`, `0`)
/// into signed nanoseconds; `None` when it is not one or overflows. The arithmetic is Go's,
/// so a value lands on the same nanosecond as in BuildKit (`0.3s` is 300,000,000, not one
/// less as a float product would make it): integer parts exactly, a fraction as
/// `fraction × (unit / 10^digits)` in floating point, digits past 2^63 dropped.
pub fn parse_go_duration(text: &str) -> Option<i64> {
    const LIMIT: u64 = 1 << 63;
    let (negative, mut rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let digits = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let whole = digits(rest);
        let mut value: u64 = 0;
        for digit in rest[..whole].bytes() {
            value = value.checked_mul(10)?.checked_add(u64::from(digit - b'0')).filter(|v| *v <= LIMIT)?;
        }
        rest = &rest[whole..];
        let (mut fraction, mut scale, mut fractional) = (0u64, 1.0f64, 0);
        if let Some(after) = rest.strip_prefix('.') {
            fractional = digits(after);
            for digit in after[..fractional].bytes() {
                match fraction.checked_mul(10).and_then(|f| f.checked_add(u64::from(digit - b'0'))) {
                    Some(next) if next <= LIMIT => {
                        fraction = next;
                        scale *= 10.0;
                    }
                    // Precision past what 63 bits hold is dropped, as Go drops it.
                    _ => break,
                }
            }
            rest = &after[fractional..];
        }
        if whole == 0 && fractional == 0 {
            return None;
        }
        let unit_end = rest.find(|c: char| c == '.' || c.is_ascii_digit()).unwrap_or(rest.len());
        let unit: u64 = match &rest[..unit_end] {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        rest = &rest[unit_end..];
        let mut nanos = value.checked_mul(unit).filter(|v| *v <= LIMIT)?;
        if fraction > 0 {
            // At most 3.6e12 (a fraction of an hour): the cast cannot overflow.
            nanos = nanos.checked_add((fraction as f64 * (unit as f64 / scale)) as u64).filter(|v| *v <= LIMIT)?;
        }
        total = total.checked_add(nanos).filter(|v| *v <= LIMIT)?;
    }
    if negative {
        return Some(0i64.wrapping_sub_unsigned(total));
    }
    i64::try_from(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_land_on_gos_nanosecond() {
        let cases: &[(&str, Option<i64>)] = &[
            ("0", Some(0)),
            ("0.3s", Some(300_000_000)),
            ("1.1s", Some(1_100_000_000)),
            ("0.1h", Some(360_000_000_000)),
            (".5m", Some(30_000_000_000)),
            ("5.m", Some(300_000_000_000)),
            ("1h2m3.004005006s", Some(3_723_004_005_006)),
            ("1.0000000001s", Some(1_000_000_000)),
            ("-1.5\u{b5}s", Some(-1_500)),
            ("2562047h47m16.854775807s", Some(i64::MAX)),
            ("-2562047h47m16.854775808s", Some(i64::MIN)),
            ("2562047h47m16.854775808s", None),
            ("9223372036854775808ns", None),
            ("1.00000000000000000000000000000001s", Some(1_000_000_000)),
            ("5", None),
            (".s", None),
            ("s", None),
            ("1d", None),
            ("", None),
            ("-", None),
        ];
        for (text, nanos) in cases {
            assert_eq!(parse_go_duration(text), *nanos, "{text}");
        }
    }

    #[test]
    fn timestamps_format_as_rfc3339() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_millis(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_millis(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339_millis(4_102_444_799_000), "2099-12-31T23:59:59Z");
    }
}
