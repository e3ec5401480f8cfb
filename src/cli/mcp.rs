//! `agentvm mcp`: the Model Context Protocol on stdin/stdout. A client of the
//! daemon like every other verb: each tool call sends the same typed request
//! the CLI sends (through [`App`]) and answers with the CLI's JSON, or with
//! the CLI's error message as a tool error.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{ErrorData, ServerHandler, ServiceExt, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{App, lifecycle, load_fleet, one, output, status};
use crate::backend::{SnapshotAction, Stream};
use crate::paths::Home;
use crate::protocol::{Answer, Event, FILE_CHUNK_BYTES, Op, Outcome, VmResult};

/// Serves MCP until the client closes stdin.
pub fn serve(file: Option<PathBuf>, uri: String) -> Result<i32> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the MCP server's runtime")?;
    runtime.block_on(async move {
        let server = Server {
            settings: Arc::new(Settings { file, uri }),
            tool_router: Server::tool_router(),
        };
        let running = server
            .serve(rmcp::transport::stdio())
            .await
            .context("starting the MCP session")?;
        running.waiting().await.context("serving MCP")?;
        Ok(0)
    })
}

/// What each tool call builds its [`App`] from: the fleet file is read anew
/// on every call, so edits to it count without restarting the server.
struct Settings {
    file: Option<PathBuf>,
    uri: String,
}

impl Settings {
    fn app(&self) -> Result<App> {
        Ok(App {
            json: true,
            uri: self.uri.clone(),
            home: Home::from_env()?,
            fleet: load_fleet(self.file.as_deref(), false)?,
        })
    }
}

#[derive(Clone)]
pub struct Server {
    settings: Arc<Settings>,
    tool_router: ToolRouter<Self>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct NameArgs {
    /// The VM's name.
    name: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct UpArgs {
    /// The VMs to create (if absent) and start; each needs a [vms.NAME] in agentvm.toml.
    names: Vec<String>,
    /// Wait for SSH and the guest agent (default true).
    wait: Option<bool>,
    /// Seconds to wait for SSH (default 300).
    timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct DownArgs {
    /// The VMs to shut down.
    names: Vec<String>,
    /// Force off at once (default false).
    force: Option<bool>,
    /// Seconds to wait for a graceful shutdown before forcing off (default 60).
    timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ExecArgs {
    /// The VM's name.
    name: String,
    /// The program and its arguments, run directly (no shell): ["/bin/sh", "-c", "…"] for one.
    command: Vec<String>,
    /// Seconds the command may run (default 300).
    timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ReadFileArgs {
    /// The VM's name.
    name: String,
    /// Absolute path of the file in the guest.
    path: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct WriteFileArgs {
    /// The VM's name.
    name: String,
    /// Absolute path of the file in the guest (made or replaced).
    path: String,
    /// The file's content: text, or base64 when `encoding` is "base64".
    content: String,
    /// "utf-8" (default) or "base64".
    encoding: Option<Encoding>,
    /// Permission bits in octal, such as "600" or "0755".
    mode: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
pub enum Encoding {
    #[serde(rename = "utf-8")]
    Utf8,
    #[serde(rename = "base64")]
    Base64,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotVerb {
    Create,
    List,
    Revert,
    Delete,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SnapshotArgs {
    /// The VM's name.
    name: String,
    /// What to do.
    action: SnapshotVerb,
    /// The snapshot: needed by revert and delete; create names one snap-<time> without it.
    snapshot: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ForkArgs {
    /// The running local VM to copy.
    source: String,
    /// The names of the new VMs (one or more).
    new: Vec<String>,
    /// Wait until every new VM answers on SSH (default true).
    wait: Option<bool>,
    /// How long to wait, in seconds (default 300).
    timeout_secs: Option<u64>,
    /// Give the new VMs new SSH host keys and machine-id (default false).
    new_identity: Option<bool>,
}

#[tool_router]
impl Server {
    #[tool(
        description = "Every VM of every backend and of agentvm.toml, as `agentvm list --json` prints them: name, state, backend, ssh_port, image, addresses, …"
    )]
    async fn list(&self) -> Result<CallToolResult, ErrorData> {
        self.run(|app| {
            let (rows, _) = status::all_rows(&app)?;
            Ok(serde_json::to_value(rows)?)
        })
        .await
    }

    #[tool(description = "One VM's status, as `agentvm status NAME --json` prints it.")]
    async fn status(
        &self,
        Parameters(args): Parameters<NameArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        self.run(move |app| Ok(serde_json::to_value(status::one_row(&app, &args.name)?)?))
            .await
    }

    #[tool(
        description = "Create (if absent) and start VMs of agentvm.toml, or start existing VMs that have no entry there (forks) as they were defined; waits for SSH unless wait is false. Returns one result per VM."
    )]
    async fn up(&self, Parameters(args): Parameters<UpArgs>) -> Result<CallToolResult, ErrorData> {
        self.run(move |app| {
            let wait = args
                .wait
                .unwrap_or(true)
                .then_some(args.timeout_secs.unwrap_or(300));
            results_json(lifecycle::up_results(&app, &args.names, wait, false, None)?)
        })
        .await
    }

    #[tool(
        description = "Shut VMs down (guest agent, then ACPI), forcing them off after the timeout. Returns how each stopped."
    )]
    async fn down(
        &self,
        Parameters(args): Parameters<DownArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        self.run(move |app| {
            let op = Op::Down {
                force: args.force.unwrap_or(false),
                timeout_secs: args.timeout_secs.unwrap_or(60),
            };
            results_json(app.call(&args.names, op, false)?)
        })
        .await
    }

    #[tool(
        description = "Run a command in a running VM through its guest agent. Returns {stdout, stderr, exit_code, signal}; a non-zero exit code is a result, not an error."
    )]
    async fn exec(
        &self,
        Parameters(args): Parameters<ExecArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        self.run(move |app| {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let op = Op::Exec {
                argv: args.command,
                stdin: None,
                timeout_secs: args.timeout_secs.unwrap_or(300),
                stream: false,
            };
            let results =
                app.call_with(std::slice::from_ref(&args.name), op, false, &mut |event| {
                    if let Event::Output { stream, data, .. } = event {
                        match stream {
                            Stream::Stdout => out.extend_from_slice(&data),
                            Stream::Stderr => err.extend_from_slice(&data),
                        }
                    }
                })?;
            let outcome = match one(results, &args.name)? {
                Outcome::Exec(outcome) => outcome,
                other => bail!("{}: unexpected answer {other:?}", args.name),
            };
            Ok(json!({
                "stdout": String::from_utf8_lossy(&out),
                "stderr": String::from_utf8_lossy(&err),
                "exit_code": outcome.exit_code,
                "signal": outcome.signal,
            }))
        })
        .await
    }

    #[tool(
        description = "Read a file of a running VM through its guest agent. Returns {path, encoding, content}: encoding is \"utf-8\" when the file is UTF-8 text, else \"base64\" and content is its bytes in base64."
    )]
    async fn read_file(
        &self,
        Parameters(args): Parameters<ReadFileArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        self.run(move |app| {
            let op = Op::ReadFile {
                path: args.path.clone(),
                offset: 0,
                length: None,
            };
            let data = match app.call_one(&args.name, op)? {
                Outcome::FileRead { data } => data,
                other => bail!("{}: unexpected answer {other:?}", args.name),
            };
            let (encoding, content) = match String::from_utf8(data) {
                Ok(text) => ("utf-8", text),
                Err(e) => (
                    "base64",
                    base64::engine::general_purpose::STANDARD.encode(e.into_bytes()),
                ),
            };
            Ok(json!({ "path": args.path, "encoding": encoding, "content": content }))
        })
        .await
    }

    #[tool(
        description = "Write (make or replace) a file of a running VM through its guest agent, optionally setting its mode. Returns {path, bytes}. On Proxmox a file may be at most 46080 bytes."
    )]
    async fn write_file(
        &self,
        Parameters(args): Parameters<WriteFileArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        self.run(move |app| {
            let data = match args.encoding.unwrap_or(Encoding::Utf8) {
                Encoding::Utf8 => args.content.into_bytes(),
                Encoding::Base64 => base64::engine::general_purpose::STANDARD
                    .decode(args.content.trim())
                    .context("content is not base64")?,
            };
            let mode = args
                .mode
                .as_deref()
                .map(|m| {
                    u32::from_str_radix(m, 8)
                        .ok()
                        .filter(|m| *m <= 0o7777)
                        .with_context(|| {
                            format!("mode {m:?} is not octal permission bits such as \"600\"")
                        })
                })
                .transpose()?;
            // In chunks, each request well under the daemon's limit; the
            // mode goes with the last.
            let chunks: Vec<&[u8]> = if data.is_empty() {
                vec![&[]]
            } else {
                data.chunks(FILE_CHUNK_BYTES).collect()
            };
            let mut bytes = 0;
            for (i, chunk) in chunks.iter().enumerate() {
                let op = Op::WriteFile {
                    path: args.path.clone(),
                    data: chunk.to_vec(),
                    mode: mode.filter(|_| i + 1 == chunks.len()),
                    append: i > 0,
                };
                bytes += match app.call_one(&args.name, op)? {
                    Outcome::FileWritten { bytes } => bytes,
                    other => bail!("{}: unexpected answer {other:?}", args.name),
                };
            }
            Ok(json!({ "path": args.path, "bytes": bytes }))
        })
        .await
    }

    #[tool(
        description = "Running copies of a running VM (memory, processes, disk) while it keeps running: one new VM per name. Returns each new VM's name, ports and readiness."
    )]
    async fn fork(
        &self,
        Parameters(args): Parameters<ForkArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        self.run(move |app| {
            if args.new.is_empty() {
                bail!("fork needs at least one new VM name");
            }
            let op = Op::Fork {
                new: args.new.clone(),
                wait_secs: args
                    .wait
                    .unwrap_or(true)
                    .then_some(args.timeout_secs.unwrap_or(300)),
                new_identity: args.new_identity.unwrap_or(false),
            };
            match app.call_one(&args.source, op)? {
                Outcome::Forked(outcome) => Ok(serde_json::to_value(outcome)?),
                other => bail!("{}: unexpected answer {other:?}", args.source),
            }
        })
        .await
    }

    #[tool(
        description = "Snapshots of a VM: create (snapshot name optional), list, revert or delete (snapshot name needed). Returns the VM's snapshots after the action."
    )]
    async fn snapshot(
        &self,
        Parameters(args): Parameters<SnapshotArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        self.run(move |app| {
            let needed = |verb: &str| {
                args.snapshot
                    .clone()
                    .with_context(|| format!("snapshot {verb} needs the snapshot's name"))
            };
            let action = match args.action {
                SnapshotVerb::Create => SnapshotAction::Create {
                    name: args.snapshot.clone(),
                },
                SnapshotVerb::List => SnapshotAction::List,
                SnapshotVerb::Revert => SnapshotAction::Revert {
                    name: needed("revert")?,
                },
                SnapshotVerb::Delete => SnapshotAction::Delete {
                    name: needed("delete")?,
                },
            };
            match app.call_one(&args.name, Op::Snapshot { action })? {
                Outcome::Snapshots { snapshots } => Ok(serde_json::to_value(snapshots)?),
                other => bail!("{}: unexpected answer {other:?}", args.name),
            }
        })
        .await
    }
}

impl Server {
    /// Runs a tool's blocking work (daemon calls) off the async runtime; its
    /// value is the tool's JSON result, its error a tool error with the CLI's message.
    async fn run(
        &self,
        work: impl FnOnce(App) -> Result<Value> + Send + 'static,
    ) -> Result<CallToolResult, ErrorData> {
        let settings = self.settings.clone();
        let result = tokio::task::spawn_blocking(move || work(settings.app()?))
            .await
            .map_err(|e| ErrorData::internal_error(format!("the tool failed: {e}"), None))?;
        Ok(match result {
            Ok(value) => CallToolResult::success(vec![ContentBlock::text(
                serde_json::to_string_pretty(&value).unwrap_or_default(),
            )]),
            Err(e) => CallToolResult::error(vec![ContentBlock::text(format!("{e:#}"))]),
        })
    }
}

/// Per-VM results as the CLI's `--json` prints them; any failure makes the
/// whole call an error naming each failed VM (as the CLI's stderr does).
fn results_json(results: Vec<VmResult>) -> Result<Value> {
    let mut values = Vec::new();
    let mut failures = Vec::new();
    for result in results {
        match &result.answer {
            Answer::Ok(outcome) => values.push(output::outcome_json(&result.name, outcome)?),
            Answer::Error { message, .. } => failures.push(output::vm_error(&result.name, message)),
        }
    }
    if !failures.is_empty() {
        let mut text = failures.join("\n");
        if !values.is_empty() {
            text += &format!("\nsucceeded: {}", serde_json::to_string(&values)?);
        }
        bail!("{text}");
    }
    Ok(Value::Array(values))
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Server {
    fn get_info(&self) -> ServerConfig {
        let mut info = ServerConfig::new(ServerCapabilities::builder().enable_tools().build());
        info.server_info = Implementation::new("agentvm", env!("CARGO_PKG_VERSION"));
        info.instructions = Some(
            "Agent VMs of agentvm.toml on libvirt and Proxmox VE: list, status, up, down, \
             exec commands and read/write files in guests (through the guest agent), snapshots."
                .into(),
        );
        info
    }
}
