//! URL encoding as PVE's HTTP server does it, and a tiny HTTP client for tests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

/// Decodes `%XX` escapes (and, when `plus_is_space`, `+` as a space).
pub fn percent_decode(s: &str, plus_is_space: bool) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// Percent-encodes everything but RFC 3986's unreserved characters (so a space is `%20`).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `application/x-www-form-urlencoded` pairs.
pub fn form_decode(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let d = |x: &str| String::from_utf8_lossy(&percent_decode(x, true)).into_owned();
            (d(k), d(v))
        })
        .collect()
}

pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

// ----- a tiny HTTP client for tests -----

/// One request to a fake PVE: `params` go in the query for GET/DELETE and in a form body for
/// POST/PUT. Returns the HTTP status and the JSON body.
pub fn raw_call(
    base_url: &str,
    method: &str,
    path: &str,
    params: &[(&str, &str)],
    auth: Option<&str>,
) -> (u16, Value) {
    let addr = base_url
        .strip_prefix("http://")
        .expect("raw_call: http:// URL");
    let encoded = form_encode(params);
    let (target, body) = match method {
        "GET" | "DELETE" if !encoded.is_empty() => {
            (format!("/api2/json{path}?{encoded}"), String::new())
        }
        "GET" | "DELETE" => (format!("/api2/json{path}"), String::new()),
        _ => (format!("/api2/json{path}"), encoded),
    };
    let content_type = (!body.is_empty()).then_some("application/x-www-form-urlencoded");
    send(addr, method, &target, content_type, auth, body.as_bytes())
}

/// An upload as PVE's web UI sends it: `multipart/form-data` with the `fields` first (e.g.
/// `content`, `checksum-algorithm`, `checksum`), then the file part named `filename`.
pub fn raw_call_multipart(
    base_url: &str,
    path: &str,
    fields: &[(&str, &str)],
    filename: &str,
    data: &[u8],
    auth: Option<&str>,
) -> (u16, Value) {
    let addr = base_url
        .strip_prefix("http://")
        .expect("raw_call_multipart: http:// URL");
    let boundary = "----fakepveFormBoundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"filename\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let target = format!("/api2/json{path}");
    send(addr, "POST", &target, Some(&content_type), auth, &body)
}

/// Sends one HTTP/1.1 request (`Connection: close`); the status and the JSON body (`null` when
/// the body is empty or not JSON).
pub fn send(
    addr: &str,
    method: &str,
    target: &str,
    content_type: Option<&str>,
    auth: Option<&str>,
    body: &[u8],
) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).expect("raw_call: connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(content_type) = content_type {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    if let Some(auth) = auth {
        head.push_str(&format!("Authorization: {auth}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("raw_call: read");
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .expect("raw_call: HTTP response");
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("raw_call: status line");
    let json = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, json)
}
