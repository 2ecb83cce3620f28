//! Durations (`500ms`, `10s`, `5m`, `48h`) and sizes (`512MiB`, `10GB`, `1024`) in config values.

use std::time::Duration;

/// A duration or size that does not parse; the value is quoted as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// Not `N` and a duration unit.
    #[error("{0:?} is not a duration like 10s, 5m or 48h")]
    Duration(String),
    /// Not `N` and a size unit.
    #[error("{0:?} is not a size like 512MiB or 10GB")]
    Size(String),
    /// A duration longer than 64 bits of milliseconds.
    #[error("{0:?} is too long")]
    TooLong(String),
    /// A size larger than 64 bits of bytes.
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// Parses `N` followed by `ms`, `s`, `m`, `h` or `d`.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number.parse().map_err(|_| UnitError::Duration(text.to_string()))?;
    let millis = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(UnitError::Duration(text.to_string())),
    };
    value.checked_mul(millis).map(Duration::from_millis).ok_or_else(|| UnitError::TooLong(text.to_string()))
}

/// Parses a byte count with an optional `KB/MB/GB/TB` (powers of 1000) or `KiB/MiB/GiB/TiB`
/// (powers of 1024) suffix.
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number.parse().map_err(|_| UnitError::Size(text.to_string()))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1000,
        "MB" => 1000_u64.pow(2),
        "GB" => 1000_u64.pow(3),
        "TB" => 1000_u64.pow(4),
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return Err(UnitError::Size(text.to_string())),
    };
    value.checked_mul(factor).ok_or_else(|| UnitError::TooLarge(text.to_string()))
}
