//! Bake's date functions over RFC 3339 timestamps: `timestamp()`, `formatdate(spec, ts)`
//! with HCL's format letters, `timeadd(ts, duration)` with Go's duration syntax.

use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime, UtcOffset};

/// The current time, in UTC, to the second.
pub fn timestamp() -> Result<String, String> {
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).map_err(|e| e.to_string())?;
    now.format(&Rfc3339).map_err(|e| e.to_string())
}

fn parse(timestamp: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(timestamp, &Rfc3339).map_err(|e| format!("{timestamp:?} is not an RFC 3339 timestamp: {e}"))
}

/// `timeadd`: the timestamp moved by a Go duration (`1h30m`, `-10s`, `1.5h`).
pub fn timeadd(timestamp: &str, duration: &str) -> Result<String, String> {
    let moved = parse(timestamp)?
        .checked_add(go_duration(duration)?)
        .ok_or_else(|| format!("{timestamp} + {duration} is out of range"))?;
    moved.format(&Rfc3339).map_err(|e| e.to_string())
}

fn go_duration(text: &str) -> Result<Duration, String> {
    let nanos = kiln_types::parse_go_duration(text)
        .ok_or_else(|| format!("{text:?} is not a duration (such as 1h30m, 10s, -5m)"))?;
    Ok(Duration::nanoseconds(nanos))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// `formatdate`: HCL's format letters (`YYYY YY MMMM MMM MM M DD D EEEE EEE hh h HH H AA aa mm
/// m ss s ZZZZZ ZZZZ ZZZ Z`), text in single quotes (`''` for a quote) and other punctuation
/// as it is.
pub fn formatdate(spec: &str, timestamp: &str) -> Result<String, String> {
    let t = parse(timestamp)?;
    let mut out = String::new();
    let chars: Vec<char> = spec.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\'' {
            let mut j = i + 1;
            loop {
                match chars.get(j) {
                    None => return Err(format!("{spec:?}: unterminated quote")),
                    Some('\'') if chars.get(j + 1) == Some(&'\'') => {
                        out.push('\'');
                        j += 2;
                    }
                    Some('\'') => break,
                    Some(other) => {
                        out.push(*other);
                        j += 1;
                    }
                }
            }
            if j == i + 1 {
                out.push('\'');
            }
            i = j + 1;
            continue;
        }
        if !c.is_ascii_alphabetic() {
            out.push(c);
            i += 1;
            continue;
        }
        let run = chars[i..].iter().take_while(|&&d| d == c).count();
        i += run;
        let hour12 = match t.hour() % 12 {
            0 => 12,
            h => h,
        };
        let offset = t.offset();
        let text = match (c, run) {
            ('Y', 4) => format!("{:04}", t.year()),
            ('Y', 2) => format!("{:02}", t.year().rem_euclid(100)),
            ('M', 4) => MONTHS[usize::from(u8::from(t.month())) - 1].to_string(),
            ('M', 3) => MONTHS[usize::from(u8::from(t.month())) - 1][..3].to_string(),
            ('M', 2) => format!("{:02}", u8::from(t.month())),
            ('M', 1) => u8::from(t.month()).to_string(),
            ('D', 2) => format!("{:02}", t.day()),
            ('D', 1) => t.day().to_string(),
            ('E', 4) => DAYS[usize::from(t.weekday().number_days_from_monday())].to_string(),
            ('E', 3) => DAYS[usize::from(t.weekday().number_days_from_monday())][..3].to_string(),
            ('h', 2) => format!("{:02}", t.hour()),
            ('h', 1) => t.hour().to_string(),
            ('H', 2) => format!("{hour12:02}"),
            ('H', 1) => hour12.to_string(),
            ('A', 2) => (if t.hour() < 12 { "AM" } else { "PM" }).to_string(),
            ('a', 2) => (if t.hour() < 12 { "am" } else { "pm" }).to_string(),
            ('m', 2) => format!("{:02}", t.minute()),
            ('m', 1) => t.minute().to_string(),
            ('s', 2) => format!("{:02}", t.second()),
            ('s', 1) => t.second().to_string(),
            ('Z', 5) => zone(offset, true),
            ('Z', 4) => zone(offset, false),
            ('Z', 3) if offset == UtcOffset::UTC => "UTC".to_string(),
            ('Z', 3) => zone(offset, false),
            ('Z', 1) if offset == UtcOffset::UTC => "Z".to_string(),
            ('Z', 1) => zone(offset, true),
            _ => return Err(format!("{spec:?}: {} is not a format letter sequence", c.to_string().repeat(run))),
        };
        out.push_str(&text);
    }
    Ok(out)
}

fn zone(offset: UtcOffset, colon: bool) -> String {
    let (h, m, _) = offset.as_hms();
    let sign = if offset.is_negative() { '-' } else { '+' };
    if colon { format!("{sign}{:02}:{:02}", h.abs(), m.abs()) } else { format!("{sign}{:02}{:02}", h.abs(), m.abs()) }
}
