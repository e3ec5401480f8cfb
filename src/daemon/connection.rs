//! One client connection: the peer check, request lines (bounded), and each
//! request dispatched to its operation while replies stream back.

use std::ops::Deref;
use std::os::fd::AsFd;
use std::sync::Arc;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc};

use super::{Shared, ops};
use crate::protocol::{
    BUILD, MAX_REQUEST_BYTES, PROTOCOL_VERSION, Reply, Request, encode, parse_request,
};

fn peer_uid(stream: &UnixStream) -> Option<u32> {
    getsockopt(&stream.as_fd(), PeerCredentials)
        .ok()
        .map(|cred| cred.uid())
}

/// The shared state, keeping the daemon from idle exit while held (by an open
/// connection, or an operation in flight).
pub(super) struct Held(Arc<Shared>);

impl Held {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        shared.activity.enter();
        Self(shared)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.activity.leave();
    }
}

impl Deref for Held {
    type Target = Arc<Shared>;

    fn deref(&self) -> &Arc<Shared> {
        &self.0
    }
}

pub(super) async fn handle(stream: UnixStream, held: Held) {
    let shared: Arc<Shared> = Arc::clone(&held);
    let peer = peer_uid(&stream);
    let (read, mut write) = stream.into_split();
    if peer != Some(shared.uid) {
        tracing::warn!("refused a connection from uid {peer:?}");
        let refusal = Reply::Error {
            message: format!(
                "refused: this agentvm daemon serves uid {} only (you are uid {})",
                shared.uid,
                peer.map_or_else(|| "unknown".to_string(), |u| u.to_string())
            ),
        };
        let _ = write.write_all(&encode(&refusal)).await;
        return;
    }
    let mut reader = BufReader::new(read);
    loop {
        let line = match read_line_limited(&mut reader).await {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(LineError::TooLong) => {
                let message = format!("request larger than {MAX_REQUEST_BYTES} bytes");
                let _ = write.write_all(&encode(&Reply::Error { message })).await;
                return;
            }
            Err(LineError::Io) => return,
        };
        let request = match parse_request(&line) {
            Ok(request) => request,
            Err(e) => {
                let reply = Reply::Error {
                    message: e.to_string(),
                };
                if write.write_all(&encode(&reply)).await.is_err() {
                    return;
                }
                continue;
            }
        };
        // An events stream has no end of its own: the client hanging up ends it.
        let endless = matches!(request, Request::Events { .. });
        let (tx, mut rx) = mpsc::unbounded_channel();
        // The operation runs on its own task: a client that goes away
        // mid-operation neither cancels nor corrupts it.
        tokio::spawn(dispatch(Held::new(shared.clone()), request, tx));
        // Forward its replies, watching an events client for hanging up
        // (another client may only have shut down its sending side).
        let mut watching = endless;
        loop {
            tokio::select! {
                reply = rx.recv() => match reply {
                    Some(reply) => {
                        if write.write_all(&encode(&reply)).await.is_err() {
                            return;
                        }
                    }
                    None => break,
                },
                gone = client_gone(&mut reader), if watching => {
                    if gone {
                        return;
                    }
                    // It sent more: that is read after this stream.
                    watching = false;
                }
            }
        }
    }
}

/// Waits until the client hangs up (true) or sends more (false).
async fn client_gone(reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> bool {
    match reader.fill_buf().await {
        Ok(buf) => buf.is_empty(),
        Err(_) => true,
    }
}

enum LineError {
    TooLong,
    Io,
}

async fn read_line_limited(
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> Result<Option<Vec<u8>>, LineError> {
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await.map_err(|_| LineError::Io)?;
        if buf.is_empty() {
            return Ok(if line.is_empty() { None } else { Some(line) });
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if line.len() + chunk.len() > MAX_REQUEST_BYTES {
            return Err(LineError::TooLong);
        }
        line.extend_from_slice(chunk);
        let used = done.unwrap_or(buf.len());
        reader.consume(used);
        if done.is_some() {
            return Ok(Some(line));
        }
    }
}

async fn dispatch(held: Held, request: Request, tx: mpsc::UnboundedSender<Reply>) {
    let shared: Arc<Shared> = Arc::clone(&held);
    let reply = match request {
        Request::Hello { build } => {
            if build != BUILD {
                tracing::info!("a client of build {build} said hello (this daemon is {BUILD})");
            }
            Reply::Hello {
                version: PROTOCOL_VERSION,
                build: BUILD.to_string(),
                pid: std::process::id(),
                home: shared.home.clone(),
                uri: shared.uri.clone(),
            }
        }
        Request::Events { backends } => {
            // The watcher follows every backend built so far: make the client's.
            let registered = {
                let shared = shared.clone();
                tokio::task::spawn_blocking(move || shared.registry.view(&backends).map(drop)).await
            };
            match registered {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let _ = tx.send(Reply::Error {
                        message: format!("{e:#}"),
                    });
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Reply::Error {
                        message: e.to_string(),
                    });
                    return;
                }
            }
            let mut events = shared.lifecycle.subscribe();
            loop {
                let received = tokio::select! {
                    received = events.recv() => received,
                    // The connection ended: stop following.
                    () = tx.closed() => return,
                };
                match received {
                    Ok(event) => {
                        if tx.send(Reply::Event(event)).is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(
                            "an events client fell {n} events behind; they were dropped"
                        );
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
        Request::Vms {
            backends,
            vms,
            action,
            no_block,
        } => match ops::run_vms(shared, backends, vms, action, no_block, tx.clone()).await {
            Ok(results) => Reply::Done { results },
            Err(message) => Reply::Error { message },
        },
        Request::List { backends, specs } => match ops::list(shared, backends, specs).await {
            Ok((rows, failed)) => Reply::Listed { rows, failed },
            Err(message) => Reply::Error { message },
        },
        Request::ImageBuild { image, rebuild } => Reply::Done {
            results: ops::build_image(shared, image, rebuild, tx.clone()).await,
        },
        Request::ImagePush {
            image,
            backend,
            backends,
        } => Reply::Done {
            results: ops::push_image(shared, image, backend, backends, tx.clone()).await,
        },
    };
    let _ = tx.send(reply);
}
