//! The CLI's side of the daemon protocol: connect to the home's daemon
//! (starting it on demand), check its build, send a request, stream events.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::backend::VmStatus;
use crate::paths::{self, Home};
use crate::protocol::{
    BUILD, BackendFailure, Envelope, Event, PROTOCOL_VERSION, Reply, Request, VmResult, encode,
};

/// Connections tried before giving up on a daemon that keeps going away.
const CONNECT_ATTEMPTS: u32 = 3;

/// The daemon closed the connection without answering.
#[derive(Debug, thiserror::Error)]
#[error("connection closed by the daemon")]
struct Gone;

/// How long a daemon started on demand has to open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    log: PathBuf,
}

impl Client {
    /// Connects to the daemon of `home`, starting one (detached, logging to
    /// `$AGENTVM_HOME/daemon.log`) if none is running. A daemon started here
    /// does not inherit the variables named in `withhold` (the `pass_env`
    /// values, which reach it through requests, for `up` only).
    pub fn connect_or_start(home: &Home, uri: &str, withhold: &[String]) -> Result<Self> {
        let socket = paths::socket_path(home)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let stream = match UnixStream::connect(&socket) {
                Ok(stream) => stream,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    start_daemon(home, uri, &socket, withhold)?
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("connecting to {}", socket.display()));
                }
            };
            let mut client = Self {
                reader: BufReader::new(stream.try_clone()?),
                writer: stream,
                log: home.daemon_log(),
            };
            match client.check_daemon(home, uri) {
                Ok(()) => return Ok(client),
                // A daemon that was dying when we connected (its socket still
                // queued us) resets or closes the connection: try afresh.
                Err(e) if attempt < CONNECT_ATTEMPTS && e.downcast_ref::<Gone>().is_some() => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn check_daemon(&mut self, home: &Home, uri: &str) -> Result<()> {
        self.send(Request::Hello {
            build: BUILD.to_string(),
        })?;
        match self.next_reply()? {
            Reply::Hello {
                pid,
                build,
                home: daemon_home,
                uri: daemon_uri,
                ..
            } => {
                if build != BUILD {
                    bail!(
                        "the running agentvm daemon (pid {pid}) is build {build}, this agentvm is {BUILD}: \
                         restart the daemon (agentvm daemon --stop; the next command starts the new one)"
                    );
                }
                // The socket is the home's own unless AGENTVM_SOCKET forces
                // one: then it may be another home's daemon.
                let ours = home.root().display().to_string();
                let same_home = !paths::socket_forced()
                    || paths::canonical_home(&Home::at(&daemon_home))?
                        == paths::canonical_home(home)?;
                if !same_home || daemon_uri != uri {
                    bail!(
                        "the running agentvm daemon (pid {pid}) serves {daemon_home} on {daemon_uri}, not {ours} on {uri}: \
                         stop it with `agentvm daemon --stop`{}",
                        if paths::socket_forced() {
                            format!(", or give this one its own {}", paths::ENV_SOCKET)
                        } else {
                            String::new()
                        }
                    );
                }
                Ok(())
            }
            Reply::Error { message } => bail!("the daemon refused: {message}"),
            other => bail!("unexpected answer from the daemon: {other:?}"),
        }
    }

    fn send(&mut self, request: Request) -> Result<()> {
        let line = encode(&Envelope {
            version: PROTOCOL_VERSION,
            request,
        });
        self.writer
            .write_all(&line)
            .context("sending a request to the daemon")
    }

    fn next_reply(&mut self) -> Result<Reply> {
        let mut line = String::new();
        let n = match self.reader.read_line(&mut line) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(e) => return Err(e).context("reading from the daemon"),
        };
        if n == 0 {
            return Err(anyhow::Error::new(Gone).context(format!(
                "the daemon stopped before answering (see {})",
                self.log.display()
            )));
        }
        serde_json::from_str(&line)
            .with_context(|| format!("unreadable answer from the daemon: {line}"))
    }

    /// Sends `request` and returns its per-VM results, passing events on as they come.
    pub fn call(
        &mut self,
        request: Request,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Vec<VmResult>> {
        self.send(request)?;
        loop {
            match self.next_reply()? {
                Reply::Event(event) => on_event(event),
                Reply::Done { results } => return Ok(results),
                Reply::Error { message } => bail!("{message}"),
                other => bail!("unexpected answer from the daemon: {other:?}"),
            }
        }
    }

    /// Sends a `List` request: every VM's status, and the backends that failed.
    pub fn list(&mut self, request: Request) -> Result<(Vec<VmStatus>, Vec<BackendFailure>)> {
        self.send(request)?;
        loop {
            match self.next_reply()? {
                Reply::Event(_) => {}
                Reply::Listed { rows, failed } => return Ok((rows, failed)),
                Reply::Error { message } => bail!("{message}"),
                other => bail!("unexpected answer from the daemon: {other:?}"),
            }
        }
    }

    /// Follows lifecycle events until the daemon goes away.
    pub fn follow_events(
        &mut self,
        request: Request,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<()> {
        self.call(request, on_event).map(drop)
    }
}

fn start_daemon(home: &Home, uri: &str, socket: &Path, withhold: &[String]) -> Result<UnixStream> {
    home.ensure()?;
    let log_path = home.daemon_log();
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut command = Command::new(crate::daemon::entry::daemon_exe()?);
    for var in withhold {
        command.env_remove(var);
    }
    let mut child = command
        .args(["--connect", uri])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C in this terminal does not reach it.
        .process_group(0)
        .spawn()
        .context("starting the agentvm daemon")?;
    let deadline = Instant::now() + START_TIMEOUT;
    let mut exited = None;
    loop {
        match UnixStream::connect(socket) {
            Ok(stream) => return Ok(stream),
            // Another client may have started a daemon at the same moment; ours
            // then exits, and theirs answers: keep trying until the deadline.
            Err(_) if Instant::now() < deadline => {
                if exited.is_none() {
                    exited = child.try_wait().ok().flatten();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                let tail = std::fs::read_to_string(&log_path)
                    .map(|t| {
                        t.lines()
                            .rev()
                            .take(10)
                            .collect::<Vec<_>>()
                            .into_iter()
                            .rev()
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default();
                bail!(
                    "the agentvm daemon did not open {} ({e}){}; its log {} ends with:\n{tail}",
                    socket.display(),
                    exited
                        .map(|s| format!(" and exited with {s}"))
                        .unwrap_or_default(),
                    log_path.display()
                );
            }
        }
    }
}
