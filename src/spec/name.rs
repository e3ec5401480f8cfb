//! Names of VMs, images and backends: `[a-z][a-z0-9-]{0,30}`, not ending in `-`.

use std::fmt;

pub const MAX_NAME_LEN: usize = 31;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid name {0:?}: names start with a lowercase letter, have at most 31 lowercase letters, digits and '-', and do not end in '-' (VM names become host names)"
)]
pub struct NameError(pub String);

/// A validated name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Name(String);

impl Name {
    pub fn new(text: &str) -> Result<Self, NameError> {
        let mut chars = text.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if first_ok && rest_ok && !text.ends_with('-') && text.len() <= MAX_NAME_LEN {
            Ok(Self(text.to_string()))
        } else {
            Err(NameError(text.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> serde::Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Name::new(&text).map_err(serde::de::Error::custom)
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_good_names() {
        for good in ["a", "drago", "agent-2", "x1234567890123456789012345678-z"] {
            assert!(Name::new(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn rejects_bad_names() {
        for bad in [
            "",
            "Drago",
            "1abc",
            "-a",
            "a_b",
            "a.b",
            "a/b",
            "../etc",
            "a b",
            "ä",
            "a'><x",
            "abcdefghijklmnopqrstuvwxyz012345",
        ] {
            assert_eq!(Name::new(bad), Err(NameError(bad.to_string())), "{bad}");
        }
    }
}
