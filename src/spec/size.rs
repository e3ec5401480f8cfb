//! Byte sizes written as strings with a unit: `"4GiB"`, `"512MiB"`, `"20G"`.
//!
//! Units follow libvirt and qemu-img: `K`, `M`, `G`, `T` and the `KiB`… forms are
//! powers of 1024; `KB`, `MB`, `GB`, `TB` are powers of 1000; `B` is bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(u64);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error(
        "invalid size {0:?}: expected a whole number and a unit, like \"4GiB\", \"512MiB\" or \"20G\""
    )]
    Syntax(String),
    #[error(
        "invalid size {0:?}: unknown unit {1:?} (use B, K/KiB, M/MiB, G/GiB, T/TiB, or KB/MB/GB/TB)"
    )]
    Unit(String, String),
    #[error("invalid size {0:?}: too large")]
    Overflow(String),
}

impl Size {
    pub const fn from_bytes(bytes: u64) -> Self {
        Self(bytes)
    }

    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// Whole KiB, rounded up (libvirt's memory unit).
    pub const fn kib_ceil(self) -> u64 {
        self.0.div_ceil(KIB)
    }
}

impl FromStr for Size {
    type Err = SizeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(trimmed.len());
        let (digits, unit) = trimmed.split_at(split);
        if digits.is_empty() || unit.is_empty() {
            return Err(SizeError::Syntax(text.to_string()));
        }
        let multiplier: u64 = match unit.trim_start() {
            "B" => 1,
            "K" | "KiB" => KIB,
            "M" | "MiB" => MIB,
            "G" | "GiB" => GIB,
            "T" | "TiB" => 1024 * GIB,
            "KB" => 1000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            other => return Err(SizeError::Unit(text.to_string(), other.to_string())),
        };
        let number: u64 = digits
            .parse()
            .map_err(|_| SizeError::Overflow(text.to_string()))?;
        number
            .checked_mul(multiplier)
            .map(Size)
            .ok_or_else(|| SizeError::Overflow(text.to_string()))
    }
}

impl fmt::Display for Size {
    /// The largest binary unit that divides the size exactly.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, factor) in [
            ("TiB", 1024 * GIB),
            ("GiB", GIB),
            ("MiB", MIB),
            ("KiB", KIB),
        ] {
            if self.0 >= factor && self.0.is_multiple_of(factor) {
                return write!(f, "{}{unit}", self.0 / factor);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size string with a unit, like \"4GiB\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                Err(E::custom(format!(
                    "invalid size {v}: write it as a string with a unit, like \"{v}MiB\""
                )))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_units() {
        assert_eq!("4GiB".parse::<Size>().unwrap().bytes(), 4 * GIB);
        assert_eq!("512MiB".parse::<Size>().unwrap().bytes(), 512 * MIB);
        assert_eq!("20G".parse::<Size>().unwrap().bytes(), 20 * GIB);
        assert_eq!("1T".parse::<Size>().unwrap().bytes(), 1024 * GIB);
        assert_eq!("10GB".parse::<Size>().unwrap().bytes(), 10_000_000_000);
        assert_eq!("4096B".parse::<Size>().unwrap().bytes(), 4096);
        assert_eq!("64 MiB".parse::<Size>().unwrap().bytes(), 64 * MIB);
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!("4XB".parse::<Size>(), Err(SizeError::Unit(..))));
        assert!(matches!("4096".parse::<Size>(), Err(SizeError::Syntax(_))));
        assert!(matches!("GiB".parse::<Size>(), Err(SizeError::Syntax(_))));
        assert!(matches!("-1G".parse::<Size>(), Err(SizeError::Syntax(_))));
        assert!(matches!("1.5G".parse::<Size>(), Err(SizeError::Unit(..))));
        assert!(matches!(
            "99999999999999T".parse::<Size>(),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            "999999999999999999999G".parse::<Size>(),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn displays_in_the_largest_exact_unit() {
        assert_eq!(Size::from_bytes(4 * GIB).to_string(), "4GiB");
        assert_eq!(Size::from_bytes(1536 * MIB).to_string(), "1536MiB");
        assert_eq!(Size::from_bytes(1000).to_string(), "1000B");
    }

    #[test]
    fn rounds_memory_up_to_kib() {
        assert_eq!(Size::from_bytes(1025).kib_ceil(), 2);
        assert_eq!(Size::from_bytes(2 * GIB).kib_ceil(), 2 * MIB);
    }
}
