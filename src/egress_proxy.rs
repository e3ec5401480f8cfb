//! The egress proxy: an HTTP proxy on a unix socket that admits only the
//! host:port pairs of a VM's allow list. `CONNECT host:port` opens a tunnel;
//! a plain-HTTP request in absolute form (`GET http://host:port/…`) is passed
//! on with its target made origin-form. Every decision is reported to the
//! caller as an [`EgressEvent`].

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};

use crate::spec::{Egress, SLIRP_HOST_ADDR};

/// The longest request head the proxy reads.
pub const MAX_HEAD: usize = 16 * 1024;
/// How long a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting to an admitted target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// One connection the proxy admitted or refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressEvent {
    /// Seconds since the Unix epoch.
    pub at: u64,
    pub host: String,
    pub port: u16,
    pub admitted: bool,
    /// Why it was refused, or what became of an admitted one.
    pub note: String,
}

/// A request the proxy understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyRequest {
    /// `CONNECT host:port`: a tunnel.
    Connect { host: String, port: u16 },
    /// A plain-HTTP request; `head` is the request to send on, origin-form.
    Http {
        host: String,
        port: u16,
        head: Vec<u8>,
    },
}

impl ProxyRequest {
    pub fn target(&self) -> (&str, u16) {
        match self {
            Self::Connect { host, port } | Self::Http { host, port, .. } => (host, *port),
        }
    }
}

/// Why a request head was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("malformed request line {0:?}")]
    RequestLine(String),
    #[error("bad target {0:?}: expected HOST:PORT")]
    Target(String),
    #[error("only http:// targets can be proxied in plain form ({0:?}); use CONNECT for others")]
    Scheme(String),
}

/// Parses a request head (everything up to and including the blank line).
pub fn parse_request(head: &str) -> Result<ProxyRequest, ParseError> {
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ParseError::RequestLine(line.to_string()));
    };
    if method.is_empty() || !version.starts_with("HTTP/1.") {
        return Err(ParseError::RequestLine(line.to_string()));
    }
    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = authority(target, None)?;
        return Ok(ProxyRequest::Connect { host, port });
    }
    let rest = target
        .strip_prefix("http://")
        .or_else(|| {
            target
                .get(..7)
                .filter(|s| s.eq_ignore_ascii_case("http://"))
                .map(|_| &target[7..])
        })
        .ok_or_else(|| ParseError::Scheme(target.to_string()))?;
    let (auth, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    let (host, port) = authority(auth, Some(80))?;
    let mut out = format!("{method} {path} {version}\r\n");
    for header in lines.filter(|l| !l.is_empty()) {
        let name = header.split(':').next().unwrap_or_default().trim();
        if ["proxy-connection", "proxy-authorization", "connection"]
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h))
        {
            continue;
        }
        out.push_str(header);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    Ok(ProxyRequest::Http {
        host,
        port,
        head: out.into_bytes(),
    })
}

/// `host:port` or `[v6]:port`; the port may be left out only with a default.
fn authority(text: &str, default_port: Option<u16>) -> Result<(String, u16), ParseError> {
    let bad = || ParseError::Target(text.to_string());
    let (host, port) = if let Some(v6) = text.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        match after.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if after.is_empty() => (host, None),
            None => return Err(bad()),
        }
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') => (host, Some(port)),
            Some(_) => return Err(bad()),
            None => (text, None),
        }
    };
    let port = match port {
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(bad)?
        }
        None => default_port.ok_or_else(bad)?,
        Some(_) => return Err(bad()),
    };
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'))
    {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// Where the proxy connects for `host`: the guest's name for the host
/// (10.0.2.2) is the host's loopback.
pub fn dial_host(host: &str) -> &str {
    if host == SLIRP_HOST_ADDR {
        "127.0.0.1"
    } else {
        host
    }
}

/// Receives each decision the proxy makes.
pub type Record = Arc<dyn Fn(EgressEvent) + Send + Sync>;

/// Serves `listener` for `vm` under `policy` until the task is dropped.
pub async fn serve(listener: UnixListener, vm: String, policy: Egress, record: Record) {
    let policy = Arc::new(policy);
    let vm: Arc<str> = vm.into();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let (policy, vm, record) = (policy.clone(), vm.clone(), record.clone());
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &vm, &policy, &record).await {
                        tracing::debug!("{vm}: egress proxy connection: {e:#}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("{vm}: egress proxy accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn handle(
    mut client: UnixStream,
    vm: &str,
    policy: &Egress,
    record: &Record,
) -> anyhow::Result<()> {
    let (head, extra) = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client)).await??;
    let request = match std::str::from_utf8(&head)
        .map_err(|_| ParseError::RequestLine("(not UTF-8)".into()))
        .and_then(parse_request)
    {
        Ok(request) => request,
        Err(e) => {
            respond(&mut client, "400 Bad Request", &e.to_string()).await?;
            return Ok(());
        }
    };
    let (host, port) = request.target();
    let event = |admitted: bool, note: String| EgressEvent {
        at: now(),
        host: host.to_string(),
        port,
        admitted,
        note,
    };
    if !policy.admits(host, port) {
        tracing::warn!(
            vm,
            host,
            port,
            "egress refused: {host}:{port} is not in the allow list"
        );
        record(event(false, "not in the allow list".into()));
        respond(
            &mut client,
            "403 Forbidden",
            &format!("{host}:{port} is not in this VM's egress allow list"),
        )
        .await?;
        return Ok(());
    }
    let dialed = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((dial_host(host), port)))
        .await
        .map_err(|_| anyhow::anyhow!("timed out"))
        .and_then(|r| r.map_err(anyhow::Error::from));
    let mut upstream = match dialed {
        Ok(stream) => stream,
        Err(e) => {
            tracing::info!(
                vm,
                host,
                port,
                "egress admitted, but connecting failed: {e}"
            );
            record(event(true, format!("connecting failed: {e}")));
            respond(
                &mut client,
                "502 Bad Gateway",
                &format!("connecting to {host}:{port}: {e}"),
            )
            .await?;
            return Ok(());
        }
    };
    tracing::info!(vm, host, port, "egress admitted");
    record(event(true, "connected".into()));
    match &request {
        ProxyRequest::Connect { .. } => {
            client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await?;
        }
        ProxyRequest::Http { head, .. } => upstream.write_all(head).await?,
    }
    upstream.write_all(&extra).await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// Reads up to the end of the head; returns it and any bytes read past it.
async fn read_head(client: &mut UnixStream) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let extra = buf.split_off(end + 4);
            return Ok((buf, extra));
        }
        if buf.len() > MAX_HEAD {
            anyhow::bail!("request head over {MAX_HEAD} bytes");
        }
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            anyhow::bail!("closed before the end of the request head");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn respond(client: &mut UnixStream, status: &str, body: &str) -> std::io::Result<()> {
    let body = format!("{body}\n");
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    client.write_all(reply.as_bytes()).await?;
    client.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_targets_need_a_port() {
        assert_eq!(
            parse_request("CONNECT github.com:443 HTTP/1.1\r\nHost: github.com:443\r\n\r\n"),
            Ok(ProxyRequest::Connect {
                host: "github.com".into(),
                port: 443
            })
        );
        assert_eq!(
            parse_request("connect [::1]:8443 HTTP/1.0\r\n\r\n"),
            Ok(ProxyRequest::Connect {
                host: "::1".into(),
                port: 8443
            })
        );
        for bad in [
            "CONNECT github.com HTTP/1.1\r\n\r\n",
            "CONNECT github.com:0 HTTP/1.1\r\n\r\n",
            "CONNECT github.com:70000 HTTP/1.1\r\n\r\n",
            "CONNECT :443 HTTP/1.1\r\n\r\n",
            "CONNECT a b:443 HTTP/1.1\r\n\r\n",
            "CONNECT github.com:443\r\n\r\n",
            "CONNECT github.com:443 SMTP\r\n\r\n",
            "CONNECT ::1:443 HTTP/1.1\r\n\r\n",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn plain_requests_become_origin_form() {
        let req = parse_request(
            "GET http://10.0.2.2:8000/a/b?c=1 HTTP/1.1\r\nHost: 10.0.2.2:8000\r\n\
             Proxy-Connection: keep-alive\r\nConnection: keep-alive\r\nAccept: */*\r\n\r\n",
        )
        .unwrap();
        let ProxyRequest::Http { host, port, head } = req else {
            panic!("not a plain request");
        };
        assert_eq!((host.as_str(), port), ("10.0.2.2", 8000));
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "GET /a/b?c=1 HTTP/1.1\r\nHost: 10.0.2.2:8000\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        let ProxyRequest::Http { port, head, .. } =
            parse_request("HEAD http://example.com HTTP/1.1\r\n\r\n").unwrap()
        else {
            panic!("not a plain request");
        };
        assert_eq!(port, 80);
        assert!(head.starts_with(b"HEAD / HTTP/1.1\r\n"));
        assert!(matches!(
            parse_request("GET https://example.com/ HTTP/1.1\r\n\r\n"),
            Err(ParseError::Scheme(_))
        ));
        assert!(matches!(
            parse_request("GET /local HTTP/1.1\r\n\r\n"),
            Err(ParseError::Scheme(_))
        ));
    }

    #[test]
    fn the_slirp_host_is_the_hosts_loopback() {
        assert_eq!(dial_host("10.0.2.2"), "127.0.0.1");
        assert_eq!(dial_host("github.com"), "github.com");
    }
}
