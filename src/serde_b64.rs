//! Bytes as one base64 string in JSON (`#[serde(with = "crate::serde_b64")]`):
//! a third larger than the bytes, where a JSON array of numbers is up to four
//! times larger.

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serializer};

pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
}

pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    let text = String::deserialize(deserializer)?;
    base64::engine::general_purpose::STANDARD
        .decode(text.as_bytes())
        .map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Data(#[serde(with = "super")] Vec<u8>);

    #[test]
    fn bytes_round_trip_as_a_base64_string() {
        let data = Data((0..=255).collect());
        let text = serde_json::to_string(&data).unwrap();
        assert!(text.starts_with("\"AAECAw"), "{text}");
        assert_eq!(serde_json::from_str::<Data>(&text).unwrap(), data);
        assert!(serde_json::from_str::<Data>("\"not base64!\"").is_err());
        assert!(serde_json::from_str::<Data>("[1,2]").is_err());
    }
}
