//! The CLI ↔ daemon protocol: JSON lines over the daemon's unix socket.
//!
//! The client sends one `Envelope` per line; the daemon answers each with any
//! number of `Reply::Event` lines and then exactly one `Reply::Done` or
//! `Reply::Error`. Every envelope carries the protocol version; a daemon that
//! speaks another version answers with an error that says so.

use serde::{Deserialize, Serialize};

use crate::spec::{ImageSpec, VmSpec};

pub const PROTOCOL_VERSION: u32 = 1;
/// The longest request line the daemon reads.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub version: u32,
    pub request: Request,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Who are you? Answered with `Reply::Hello`.
    Hello {},
    Up {
        vms: Vec<UpItem>,
        wait: bool,
        timeout_secs: u64,
        no_block: bool,
    },
    Down {
        vms: Vec<VmRef>,
        force: bool,
        timeout_secs: u64,
        no_block: bool,
    },
    Destroy {
        vms: Vec<VmRef>,
        no_block: bool,
    },
    /// Creates, reverts to or deletes a snapshot (listing needs no daemon).
    Snapshot {
        vm: Box<VmRef>,
        action: crate::backend::SnapshotAction,
        no_block: bool,
    },
    /// Builds a flake image (and imports it) unless it is up to date.
    ImageBuild {
        image: ImageSpec,
        rebuild: bool,
    },
    /// Streams lifecycle events until the client goes away.
    Events {},
}

/// A VM to bring up: its resolved spec and image.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpItem {
    pub spec: VmSpec,
    pub image: ImageSpec,
}

/// A VM by name, with its spec when the fleet file still has one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRef {
    pub name: String,
    pub spec: Option<VmSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Reply {
    Hello {
        version: u32,
        pid: u32,
        home: String,
        uri: String,
    },
    Event(Event),
    /// One outcome per VM of the request, in request order.
    Done {
        results: Vec<VmResult>,
    },
    /// The request as a whole was refused.
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A step of an operation on a VM (`defined`, `started`, `ssh ready in 4.1 s`).
    Step {
        vm: String,
        step: String,
    },
    /// Progress of a byte copy (an image import).
    Bytes {
        label: String,
        done: u64,
        total: u64,
    },
    BytesDone {
        label: String,
    },
    /// A VM changed state (from `agentvm events`).
    Lifecycle {
        vm: String,
        state: String,
        /// Unix time in seconds.
        at: u64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmResult {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ok: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl VmResult {
    pub fn from_result(name: &str, result: anyhow::Result<serde_json::Value>) -> Self {
        match result {
            Ok(value) => Self {
                name: name.to_string(),
                ok: Some(value),
                error: None,
            },
            Err(e) => Self {
                name: name.to_string(),
                ok: None,
                error: Some(format!("{e:#}")),
            },
        }
    }
}

/// Why a request line was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("request is not JSON: {0}")]
    NotJson(String),
    #[error(
        "this daemon speaks protocol version {PROTOCOL_VERSION}, the client {0}: restart the daemon (agentvm daemon --stop) or use the matching agentvm"
    )]
    Version(u64),
    #[error("request has no protocol version")]
    NoVersion,
    #[error("unknown or malformed request: {0}")]
    Malformed(String),
}

/// Reads one request line; the version is checked before the rest, so a client
/// of another version gets a message about versions, not about fields.
pub fn parse_request(line: &[u8]) -> Result<Request, ParseError> {
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| ParseError::NotJson(e.to_string()))?;
    match value.get("version").and_then(serde_json::Value::as_u64) {
        None => return Err(ParseError::NoVersion),
        Some(v) if v != u64::from(PROTOCOL_VERSION) => return Err(ParseError::Version(v)),
        Some(_) => {}
    }
    serde_json::from_value::<Envelope>(value)
        .map(|e| e.request)
        .map_err(|e| ParseError::Malformed(e.to_string()))
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(value).expect("protocol types serialize to JSON");
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_a_request() {
        let line = encode(&Envelope {
            version: PROTOCOL_VERSION,
            request: Request::Destroy {
                vms: vec![VmRef {
                    name: "drago".into(),
                    spec: None,
                }],
                no_block: true,
            },
        });
        match parse_request(&line[..line.len() - 1]).unwrap() {
            Request::Destroy { vms, no_block } => {
                assert_eq!(vms[0].name, "drago");
                assert!(no_block);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn another_version_is_named() {
        let err = parse_request(br#"{"version":7,"request":{"op":"teleport"}}"#).unwrap_err();
        assert_eq!(err, ParseError::Version(7));
        assert!(err.to_string().contains("protocol version 1, the client 7"));
    }

    #[test]
    fn bad_requests_are_errors() {
        assert!(matches!(
            parse_request(b"not json"),
            Err(ParseError::NotJson(_))
        ));
        assert_eq!(parse_request(b"{}").unwrap_err(), ParseError::NoVersion);
        assert!(matches!(
            parse_request(br#"{"version":1,"request":{"op":"format-disk"}}"#),
            Err(ParseError::Malformed(_))
        ));
        assert!(matches!(
            parse_request(br#"{"version":1,"request":{"op":"hello","extra":1}}"#),
            Err(ParseError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_request(&bytes);
        }

        #[test]
        fn arbitrary_json_never_panics(
            op in "[a-z-]{0,12}",
            version in 0u64..4,
            extra in proptest::collection::btree_map("[a-z_]{1,8}", any::<i64>(), 0..4),
        ) {
            let mut request = serde_json::json!({ "op": op });
            for (k, v) in extra {
                request[k] = serde_json::json!(v);
            }
            let line = serde_json::json!({ "version": version, "request": request }).to_string();
            let _ = parse_request(line.as_bytes());
        }
    }
}
