//! The CLI ↔ daemon protocol: JSON lines over the daemon's unix socket.
//!
//! The client sends one `Envelope` per line; the daemon answers each with any
//! number of `Reply::Event` lines and then exactly one `Reply::Done` or
//! `Reply::Error`. Every envelope carries the protocol version; a daemon that
//! speaks another version answers with an error that says so.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::backend::registry::RemoteConfig;
use crate::backend::{
    BackendError, DownPath, ErrorKind, ExecOutcome, ForkOutcome, ForwardChange, ForwardStatus,
    HostKey, Plan, PushAction, SnapshotAction, SnapshotInfo, SpiceAccess, Stream, UpOutcome,
    VmStatus,
};
use crate::spec::{ImageSpec, VmSpec};
use crate::ssh::Endpoint;

pub const PROTOCOL_VERSION: u32 = 3;
/// The agentvm build a client and daemon must share: protocol types change
/// with the code, so a daemon of another build is restarted, not trusted.
pub const BUILD: &str = concat!(env!("CARGO_PKG_VERSION"), "+protocol.2");
/// The longest request line the daemon reads.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// The most file data one `ReadFile`/`WriteFile` should move: in base64 it
/// stays well under [`MAX_REQUEST_BYTES`].
pub const FILE_CHUNK_BYTES: usize = 512 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub version: u32,
    pub request: Request,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The handshake: answered with `Reply::Hello`.
    Hello { build: String },
    /// An operation on VMs, each on the backend it lives on.
    Vms {
        /// The fleet file's `[backends.NAME]`, tokens read.
        backends: Vec<RemoteConfig>,
        vms: Vec<VmRef>,
        action: Op,
        /// Fail at once when another operation holds a VM, instead of waiting.
        no_block: bool,
    },
    /// Every VM of every backend, and the fleet file's VMs that exist nowhere.
    List {
        backends: Vec<RemoteConfig>,
        specs: Vec<VmSpec>,
    },
    /// Builds a flake image (and imports it) unless it is up to date.
    ImageBuild { image: ImageSpec, rebuild: bool },
    /// Makes a template of an image on a backend, unless one of the image's
    /// digest is already there.
    ImagePush {
        image: ImageSpec,
        /// The backend to push to.
        backend: String,
        /// The fleet file's `[backends.NAME]`, tokens read.
        backends: Vec<RemoteConfig>,
    },
    /// Streams lifecycle events of every backend until the client goes away.
    Events { backends: Vec<RemoteConfig> },
}

/// A VM by name, with its spec and image when the fleet file has them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRef {
    pub name: String,
    pub spec: Option<VmSpec>,
    pub image: Option<ImageSpec>,
}

/// What to do to each VM of a `Request::Vms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Op {
    Up {
        /// Wait this long for SSH and the agent; `None` returns once started.
        wait_secs: Option<u64>,
        /// Create absent VMs on this backend instead of their spec's.
        backend: Option<String>,
    },
    Down {
        force: bool,
        timeout_secs: u64,
    },
    Destroy,
    Status,
    Plan {
        backend: Option<String>,
    },
    SshEndpoint,
    Exec {
        argv: Vec<String>,
        /// The command's standard input, if any.
        #[serde(default)]
        stdin: Option<Vec<u8>>,
        timeout_secs: u64,
        /// Pass output on while the command runs (`exec --stream`).
        #[serde(default)]
        stream: bool,
    },
    HostKey,
    /// Reads a guest file through the agent: all of it, or (with `length`)
    /// up to `length` bytes from `offset`, fewer only at its end.
    ReadFile {
        path: String,
        #[serde(default)]
        offset: u64,
        #[serde(default)]
        length: Option<u64>,
    },
    /// Makes or replaces a guest file through the agent, or adds to its end.
    WriteFile {
        path: String,
        #[serde(with = "crate::serde_b64")]
        data: Vec<u8>,
        /// Permission bits to set on it (such as 0o600).
        #[serde(default)]
        mode: Option<u32>,
        /// Add `data` at the end of the file (which must exist) instead.
        #[serde(default)]
        append: bool,
    },
    /// Saves the display to `path` (absolute, on the daemon's machine).
    Screenshot {
        path: PathBuf,
    },
    Snapshot {
        action: SnapshotAction,
    },
    SerialLog,
    Spice,
    /// Sets the guest's clock to the host's.
    SyncClock,
    /// Lists, adds or removes port forwards of a running VM.
    Forward {
        change: ForwardChange,
    },
    /// The VM's egress policy, its proxy tunnel and recent connections.
    Egress,
    /// Running copies of the running VM, named `new` (each locked too).
    Fork {
        new: Vec<String>,
        /// Wait this long for each copy's SSH; `None` returns once restored.
        wait_secs: Option<u64>,
        /// Give each copy new SSH host keys and machine-id.
        new_identity: bool,
    },
    /// Makes the stopped VMs that sit on this VM's disk independent of it.
    Flatten,
    /// The guest's system was changed from outside its image (`provision`
    /// ran `nixos-rebuild switch`): a VM booting its image's kernel directly
    /// boots through its own bootloader from its next start on.
    SystemChanged,
}

impl Op {
    /// The verb as `busy: … since …` names it.
    pub fn verb(&self) -> &'static str {
        match self {
            Self::Up { .. } => "up",
            Self::Down { .. } => "down",
            Self::Destroy => "destroy",
            Self::Status => "status",
            Self::Plan { .. } => "plan",
            Self::SshEndpoint => "ssh",
            Self::Exec { .. } => "exec",
            Self::HostKey => "hostkey",
            Self::ReadFile { .. } => "read-file",
            Self::WriteFile { .. } => "write-file",
            Self::Screenshot { .. } => "screenshot",
            Self::Snapshot { .. } => "snapshot",
            Self::SerialLog => "console",
            Self::Spice => "spice",
            Self::SyncClock => "sync-clock",
            Self::Forward { .. } => "forward",
            Self::Egress => "egress",
            Self::Fork { .. } => "fork",
            Self::Flatten => "flatten",
            Self::SystemChanged => "system-changed",
        }
    }

    /// Whether the operation changes the VM and so holds its lock.
    pub fn changes_vm(&self) -> bool {
        match self {
            Self::Up { .. }
            | Self::Down { .. }
            | Self::Destroy
            | Self::Fork { .. }
            | Self::Flatten
            | Self::SystemChanged => true,
            Self::Snapshot { action } => *action != SnapshotAction::List,
            Self::Forward { change } => *change != ForwardChange::List,
            // The host key is pinned in agentvm's files: one writer at a time.
            Self::HostKey => true,
            // Like exec, file calls change the guest's files, not the VM:
            // they run beside other operations (a file written during a
            // snapshot or a stop may or may not be in it, as with exec).
            Self::ReadFile { .. } | Self::WriteFile { .. } => false,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Reply {
    Hello {
        version: u32,
        build: String,
        pid: u32,
        home: String,
        uri: String,
    },
    Event(Event),
    /// One outcome per VM of the request, in request order.
    Done {
        results: Vec<VmResult>,
    },
    /// The answer to `List`: rows, and the backends that could not be listed.
    Listed {
        rows: Vec<VmStatus>,
        failed: Vec<BackendFailure>,
    },
    /// The request as a whole was refused.
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendFailure {
    pub backend: String,
    pub error: String,
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
    /// Output of a command run by `exec`, as the guest agent delivers it.
    Output {
        vm: String,
        stream: Stream,
        data: Vec<u8>,
    },
    /// A VM changed state (from `agentvm events`).
    Lifecycle {
        vm: String,
        backend: String,
        state: String,
        /// Unix time in seconds.
        at: u64,
    },
    /// Something broke in a running VM and needs the user (from `agentvm
    /// events`): a shared folder's virtiofsd died, say.
    Problem {
        vm: String,
        backend: String,
        problem: String,
        /// Unix time in seconds.
        at: u64,
    },
}

/// One VM's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmResult {
    pub name: String,
    #[serde(flatten)]
    pub answer: Answer,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Answer {
    Ok(Outcome),
    Error { kind: ErrorKind, message: String },
}

impl VmResult {
    pub fn new(name: &str, result: Result<Outcome, BackendError>) -> Self {
        Self {
            name: name.to_string(),
            answer: match result {
                Ok(outcome) => Answer::Ok(outcome),
                Err(e) => Answer::Error {
                    kind: e.kind(),
                    message: format!("{e:#}"),
                },
            },
        }
    }

    pub fn failed(name: &str, kind: ErrorKind, message: String) -> Self {
        Self {
            name: name.to_string(),
            answer: Answer::Error { kind, message },
        }
    }
}

/// What an operation produced for one VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    Up(UpOutcome),
    Down {
        stopped_by: DownPath,
    },
    Destroyed,
    /// Boxed: a status is several times the size of the other outcomes.
    Status(Box<VmStatus>),
    Plan(Plan),
    SshEndpoint(Endpoint),
    Exec(ExecOutcome),
    HostKey(HostKey),
    FileRead {
        #[serde(with = "crate::serde_b64")]
        data: Vec<u8>,
    },
    FileWritten {
        bytes: usize,
    },
    Screenshot {
        width: u32,
        height: u32,
    },
    Snapshots {
        snapshots: Vec<SnapshotInfo>,
    },
    SerialLog {
        path: PathBuf,
    },
    Spice(SpiceAccess),
    /// How far the guest clock was off before it was set (guest minus host).
    ClockSynced {
        drift_ms: i64,
    },
    Forwards {
        forwards: Vec<ForwardStatus>,
    },
    Egress(EgressReport),
    /// What `SystemChanged` changed about how the VM boots, if anything.
    SystemChanged {
        boot: Option<String>,
    },
    Forked(ForkOutcome),
    /// The VMs made independent of the flattened VM's disk.
    Flattened {
        vms: Vec<String>,
    },
    Built(Built),
    Pushed(PushedImage),
}

/// What `agentvm egress NAME` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EgressReport {
    pub policy: crate::spec::Egress,
    /// The proxy's tunnel into the guest; `None` when no proxy runs for it.
    pub tunnel: Option<TunnelStatus>,
    /// Recent connections through the proxy, oldest first.
    pub connections: Vec<crate::egress_proxy::EgressEvent>,
}

/// Whether a VM's egress proxy is reachable from the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelStatus {
    pub up: bool,
    /// `up since …`, `connecting`, or why it is down.
    pub detail: String,
    /// The proxy's socket on the host.
    pub socket: PathBuf,
}

/// What `image build` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Built {
    pub digest: String,
    pub path: PathBuf,
    /// False when the flake and what it reads were unchanged since the last build.
    pub built: bool,
}

/// What `image push` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushedImage {
    pub image: String,
    pub backend: String,
    /// The template's VMID and node.
    pub vmid: u32,
    pub node: String,
    /// `sha256:<hex>` of the image's disk.
    pub digest: String,
    pub action: PushAction,
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
            request: Request::Vms {
                backends: Vec::new(),
                vms: vec![VmRef {
                    name: "drago".into(),
                    spec: None,
                    image: None,
                }],
                action: Op::Destroy,
                no_block: true,
            },
        });
        match parse_request(&line[..line.len() - 1]).unwrap() {
            Request::Vms {
                vms,
                no_block,
                action,
                ..
            } => {
                assert_eq!(vms[0].name, "drago");
                assert!(matches!(action, Op::Destroy));
                assert!(no_block);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn file_calls_take_old_fields_and_a_chunk_fits_a_request() {
        let line = br#"{"version":3,"request":{"op":"vms","backends":[],"vms":[],"no_block":false,"action":{"verb":"read-file","path":"/etc/hosts"}}}"#;
        match parse_request(line).unwrap() {
            Request::Vms {
                action: Op::ReadFile { offset, length, .. },
                ..
            } => assert_eq!((offset, length), (0, None)),
            other => panic!("{other:?}"),
        }
        let line = encode(&Envelope {
            version: PROTOCOL_VERSION,
            request: Request::Vms {
                backends: Vec::new(),
                vms: Vec::new(),
                action: Op::WriteFile {
                    path: "/tmp/x".into(),
                    data: vec![0xff; FILE_CHUNK_BYTES],
                    mode: Some(0o600),
                    append: true,
                },
                no_block: false,
            },
        });
        assert!(line.len() < MAX_REQUEST_BYTES, "{} bytes", line.len());
        match parse_request(&line[..line.len() - 1]).unwrap() {
            Request::Vms {
                action: Op::WriteFile { data, append, .. },
                ..
            } => assert!(append && data == vec![0xff; FILE_CHUNK_BYTES]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn another_version_is_named() {
        let err = parse_request(br#"{"version":7,"request":{"op":"teleport"}}"#).unwrap_err();
        assert_eq!(err, ParseError::Version(7));
        assert!(err.to_string().contains("protocol version 3, the client 7"));
    }

    #[test]
    fn bad_requests_are_errors() {
        assert!(matches!(
            parse_request(b"not json"),
            Err(ParseError::NotJson(_))
        ));
        assert_eq!(parse_request(b"{}").unwrap_err(), ParseError::NoVersion);
        assert!(matches!(
            parse_request(br#"{"version":3,"request":{"op":"format-disk"}}"#),
            Err(ParseError::Malformed(_))
        ));
        assert!(matches!(
            parse_request(br#"{"version":3,"request":{"op":"hello","build":"x","extra":1}}"#),
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
