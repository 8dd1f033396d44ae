//! Sizes, durations and counts as the file writes them (`"16MiB"`, `"500ms"`, a whole number)
//! and as they are checked: parsed, range-checked, and shown back in the same words.

use std::{fmt, time::Duration};

use serde::{de, Deserialize, Deserializer};

use super::errors::Problems;

const SIZE_EXPECTED: &str =
    "expected a size like \"4096\", \"64KiB\", \"16MiB\" or \"1GiB\" (binary units B, KiB, MiB, GiB)";
const DURATION_EXPECTED: &str = "expected a duration like \"500ms\", \"10s\", \"5m\" or \"1h\"";

/// What kind of value a text was read as, for the message of a [`ValueError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    Size,
    Duration,
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Quantity::Size => SIZE_EXPECTED,
            Quantity::Duration => DURATION_EXPECTED,
        })
    }
}

/// Why a size or duration text was refused. Each message quotes the text and ends with what a
/// right one looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("{text:?} does not start with a number; {of}")]
    NoNumber { text: String, of: Quantity },
    #[error("{text:?} is not a whole number; {of}")]
    NotWhole { text: String, of: Quantity },
    #[error("{text:?} is not a whole number; use a smaller unit; {of}")]
    NotWholeDuration { text: String, of: Quantity },
    #[error(
        "{text:?} uses the unit {unit:?}; sizes here are binary, write {instead:?} instead; {of}"
    )]
    DecimalUnit {
        text: String,
        unit: String,
        instead: String,
        of: Quantity,
    },
    #[error("{text:?} has no unit; {of}")]
    NoUnit { text: String, of: Quantity },
    #[error("{text:?} has the unknown unit {unit:?}; {of}")]
    UnknownUnit {
        text: String,
        unit: String,
        of: Quantity,
    },
    #[error("{text:?} is too large; {of}")]
    TooLarge { text: String, of: Quantity },
    #[error("{n} is negative; {of}")]
    Negative { n: i64, of: Quantity },
}

/// The config checker collects problems as text.
impl From<ValueError> for String {
    fn from(e: ValueError) -> String {
        e.to_string()
    }
}

/// Splits `"16 MiB"` into its whole number and its unit (a space between them is allowed).
fn number_and_unit(text: &str, of: Quantity) -> Result<(&str, &str), ValueError> {
    let s = text.trim();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    let unit = unit.trim_start();
    if num.is_empty() {
        return Err(ValueError::NoNumber {
            text: text.to_string(),
            of,
        });
    }
    if unit.starts_with(['.', ',']) {
        let text = text.to_string();
        return Err(match of {
            Quantity::Size => ValueError::NotWhole { text, of },
            Quantity::Duration => ValueError::NotWholeDuration { text, of },
        });
    }
    Ok((num, unit))
}

/// Parses a size: a whole number of bytes with an optional binary unit: `"4096"`, `"64KiB"`,
/// `"16MiB"`, `"1GiB"` (also `B` and `TiB`; a space before the unit is allowed).
pub fn parse_size(text: &str) -> Result<u64, ValueError> {
    let of = Quantity::Size;
    let (num, unit) = number_and_unit(text, of)?;
    let text = text.to_string();
    let mult: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        u if ["k", "kb", "m", "mb", "g", "gb", "t", "tb"]
            .contains(&u.to_ascii_lowercase().as_str()) =>
        {
            return Err(ValueError::DecimalUnit {
                text,
                unit: u.to_string(),
                instead: format!("{num}{}iB", u[..1].to_ascii_uppercase()),
                of,
            })
        }
        u => {
            return Err(ValueError::UnknownUnit {
                text,
                unit: u.to_string(),
                of,
            })
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or(ValueError::TooLarge { text, of })
}

/// Parses a duration: a whole number with the unit `ms`, `s`, `m` or `h`: `"500ms"`, `"10s"`,
/// `"5m"`, `"1h"`.
pub fn parse_duration(text: &str) -> Result<Duration, ValueError> {
    let of = Quantity::Duration;
    let (num, unit) = number_and_unit(text, of)?;
    let text = text.to_string();
    let ms_per: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" => return Err(ValueError::NoUnit { text, of }),
        u => {
            return Err(ValueError::UnknownUnit {
                text,
                unit: u.to_string(),
                of,
            })
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(ms_per))
        .map(Duration::from_millis)
        .ok_or(ValueError::TooLarge { text, of })
}

/// Formats a byte count the way the config writes it (`16MiB`, or plain bytes).
pub fn format_size(n: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n != 0 && n.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

pub(super) fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) && ms != 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms != 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A size as written: a string with a unit, or an integer number of bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum SizeValue {
    Bytes(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = SizeValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like \"16MiB\" or a whole number of bytes")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SizeValue, E> {
                Ok(SizeValue::Bytes(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SizeValue, E> {
                Ok(SizeValue::Bytes(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SizeValue, E> {
                Ok(SizeValue::Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

pub(super) fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

fn size_value(v: &SizeValue) -> Result<u64, ValueError> {
    match v {
        SizeValue::Bytes(n) => u64::try_from(*n).map_err(|_| ValueError::Negative {
            n: *n,
            of: Quantity::Size,
        }),
        SizeValue::Text(t) => parse_size(t),
    }
}

fn shown(v: &SizeValue, n: u64) -> String {
    match v {
        SizeValue::Text(t) if t.trim() == format_size(n) => format!("{t:?}"),
        SizeValue::Text(t) => format!("{t:?} ({n} bytes)"),
        SizeValue::Bytes(_) if format_size(n) == n.to_string() => n.to_string(),
        SizeValue::Bytes(_) => format!("{n} ({})", format_size(n)),
    }
}

pub(super) fn check_size(
    p: &mut Problems,
    key: &str,
    v: Option<SizeValue>,
    default: u64,
    min: u64,
    max: u64,
    pow2: bool,
) -> u64 {
    let Some(v) = v else { return default };
    match size_value(&v) {
        Err(e) => {
            p.push(key, e);
            default
        }
        Ok(n) => {
            let range = format!("between {} and {}", format_size(min), format_size(max));
            if pow2 && (!n.is_power_of_two() || n < min || n > max) {
                p.push(
                    key,
                    format!(
                        "{} is not a power of two {range}; expected one of \"64KiB\", \
                         \"128KiB\", …, \"16MiB\", …, \"1GiB\"",
                        shown(&v, n)
                    ),
                );
                default
            } else if n < min || n > max {
                p.push(
                    key,
                    format!("{} is out of range; expected a size {range}", shown(&v, n)),
                );
                default
            } else {
                n
            }
        }
    }
}

pub(super) fn check_count(
    p: &mut Problems,
    key: &str,
    v: Option<i64>,
    default: i64,
    max: i64,
) -> i64 {
    match v {
        None => default,
        Some(n) if (1..=max).contains(&n) => n,
        Some(n) => {
            p.push(
                key,
                format!("{n} is out of range; expected a whole number between 1 and {max}"),
            );
            default
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("16 MiB"), Ok(16 << 20));
        assert_eq!(parse_size("12B"), Ok(12));
        for bad in [
            "",
            "MiB",
            "1.5MiB",
            "16mib",
            "16XB",
            "99999999999999999999",
            "17179869184GiB",
            "-1",
        ] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.contains("expected a size like"), "{bad}: {e}");
        }
        assert!(parse_size("16M")
            .unwrap_err()
            .to_string()
            .contains("write \"16MiB\""));
        assert_eq!(format_size(16 << 20), "16MiB");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(0), "0");
    }
}
