//! Unit tests of the Proxmox client.
use super::*;

#[test]
fn ssh_keys_are_percent_encoded_without_plus() {
    let encoded = encode_ssh_keys(&["ssh-ed25519 AAAA+b/c= me@x".into(), "ssh-rsa BBBB".into()]);
    assert_eq!(
        encoded,
        "ssh-ed25519%20AAAA%2Bb%2Fc%3D%20me%40x%0Assh-rsa%20BBBB"
    );
    assert!(!encoded.contains('+') && !encoded.contains(' '));
}

#[test]
fn tokens_must_have_the_proxmox_shape() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t");
    std::fs::write(&file, "alice@pve!agentvm=0b1c-secret\n").unwrap();
    assert_eq!(
        read_token("b", &TokenSource::File(file.clone())).unwrap(),
        "alice@pve!agentvm=0b1c-secret"
    );
    std::fs::write(&file, "just-a-password").unwrap();
    let err = read_token("b", &TokenSource::File(file))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("USER@REALM!TOKENID=SECRET") && !err.contains("just-a-password"),
        "{err}"
    );
}

fn api(status: u16, message: &str) -> PveError {
    PveError::Api {
        method: "POST".into(),
        path: "/nodes/pve/qemu/9000/clone".into(),
        status,
        message: message.into(),
    }
}

fn bad_reply(status: u16) -> PveError {
    PveError::BadReply {
        method: "POST".into(),
        path: "/nodes/pve/qemu/9000/clone".into(),
        status,
        problem: "the reply is not JSON",
        excerpt: "<html>".into(),
    }
}

const LOCK_TIMEOUT: &str = "can't lock file '/var/lock/qemu-server/lock-9000.conf' - got timeout";

#[test]
fn excerpts_are_short_and_escape_control_characters() {
    assert_eq!(
        excerpt(b"<html>\r\n<b>502</b>\x1b[0m\t\0"),
        "<html>\\r\\n<b>502</b>\\u{1b}[0m\\t\\u{0}"
    );
    let long = excerpt("é".repeat(300).as_bytes());
    assert_eq!(long, format!("{}…", "é".repeat(200)));
    assert_eq!(excerpt(b"ok \xff"), "ok \u{fffd}");
    assert_eq!(excerpt(b""), "");
}

#[test]
fn bad_replies_name_the_request_status_and_body() {
    let e = PveError::BadReply {
        method: "GET".into(),
        path: "/cluster/nextid".into(),
        status: 502,
        problem: "the reply is not JSON",
        excerpt: excerpt(b"<html>\nBad Gateway"),
    };
    assert_eq!(
        e.to_string(),
        "GET /cluster/nextid: HTTP 502: the reply is not JSON; the body starts \"<html>\\nBad Gateway\""
    );
}

#[test]
fn upids_are_parsed_as_pve_does() {
    let text = "UPID:pve-1:00001001:00100064:65A0B0C0:qmclone:101:root@pam!agentvm:";
    let upid = Upid::parse(text).unwrap();
    assert_eq!(upid.node, "pve-1");
    assert_eq!(upid.to_string(), text);
    assert_eq!(
        upid.path("/status"),
        "/nodes/pve-1/tasks/UPID%3Apve%2D1%3A00001001%3A00100064%3A65A0B0C0%3Aqmclone%3A101%3Aroot%40pam%21agentvm%3A/status"
    );
    // An empty id and a 9-digit pstart are valid.
    assert!(Upid::parse("UPID:n:0000A1B2:1000A1B2C:65A0B0C0:vzdump::root@pam:").is_some());
    for bad in [
        "",
        "OK",
        "UPID:",
        "UPID:pve:00001001:00100064:65A0B0C0:qmclone:101:root@pam",
        "UPID:pve:00001001:00100064:65A0B0C0:qmclone:101:root@pam::",
        "UPID:-pve:00001001:00100064:65A0B0C0:qmclone:101:root@pam:",
        "UPID:pve:1001:00100064:65A0B0C0:qmclone:101:root@pam:",
        "UPID:pve:0000100G:00100064:65A0B0C0:qmclone:101:root@pam:",
        "UPID:pve:00001001:00100064:65A0B0C0::101:root@pam:",
        "UPID:pve:00001001:00100064:65A0B0C0:qmclone:101::",
        "UPID:pve:00001001:00100064:65A0B0C0:qmclone:1 01:root@pam:",
        "upid:pve:00001001:00100064:65A0B0C0:qmclone:101:root@pam:",
    ] {
        assert_eq!(Upid::parse(bad), None, "{bad:?}");
    }
}

#[test]
fn a_post_once_is_retried_only_after_a_lock_timeout() {
    assert!(worth_retrying(Retry::LockTimeout, &api(500, LOCK_TIMEOUT)));
    for e in [
        api(500, "got timeout"),
        api(500, "proxy timeout"),
        api(503, "Service Unavailable"),
        api(500, "unable to create VM 101: config file already exists"),
        bad_reply(502),
        bad_reply(200),
    ] {
        assert!(!worth_retrying(Retry::LockTimeout, &e), "{e}");
    }
}

#[test]
fn repeatable_requests_keep_their_retries() {
    for e in [
        api(500, LOCK_TIMEOUT),
        api(400, "can't lock file 'x' - oops"),
        api(503, "Service Unavailable"),
        bad_reply(502),
    ] {
        assert!(worth_retrying(Retry::Transient, &e), "{e}");
    }
    for e in [
        api(500, "unable to create VM 101: config file already exists"),
        api(400, "Parameter verification failed."),
        bad_reply(200),
        bad_reply(404),
        PveError::Transport {
            method: "GET".into(),
            path: "/version".into(),
            message: "connection reset".into(),
            connected: true,
        },
    ] {
        assert!(!worth_retrying(Retry::Transient, &e), "{e}");
    }
}

#[test]
fn failures_that_may_have_taken_effect() {
    for e in [
        api(500, "proxy timeout"),
        api(502, "Bad Gateway"),
        bad_reply(200),
        bad_reply(504),
        PveError::Transport {
            method: "POST".into(),
            path: "/nodes/pve/qemu/9000/clone".into(),
            message: "operation timed out".into(),
            connected: true,
        },
    ] {
        assert!(e.outcome_unknown(), "{e}");
    }
    for e in [
        api(500, LOCK_TIMEOUT),
        api(500, "unable to create VM 101: config file already exists"),
        api(400, "Parameter verification failed."),
        bad_reply(404),
        PveError::Transport {
            method: "POST".into(),
            path: "/nodes/pve/qemu/9000/clone".into(),
            message: "connection refused".into(),
            connected: false,
        },
        PveError::Unauthorized {
            method: "POST".into(),
            path: "/nodes/pve/qemu/9000/clone".into(),
        },
    ] {
        assert!(!e.outcome_unknown(), "{e}");
    }
}

#[test]
fn transient_errors() {
    assert!(transient(
        500,
        "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout"
    ));
    assert!(transient(503, "service unavailable"));
    assert!(!transient(
        500,
        "unable to create VM 100: config file already exists"
    ));
    assert!(!transient(500, "QEMU guest agent is not running"));
    assert!(!transient(400, "parameter verification failed"));
}

/// Serves one request on 127.0.0.1, answering `reply`; returns the URL and a
/// handle to the raw request (headers and body, as sent).
fn one_request(reply: &'static str) -> (String, std::thread::JoinHandle<Vec<u8>>) {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut raw = Vec::new();
        let mut buf = [0u8; 65536];
        let header_end = loop {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "the client hung up mid-request");
            raw.extend_from_slice(&buf[..n]);
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&raw[..header_end]).to_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .expect("pveproxy refuses uploads without a Content-Length")
            .trim()
            .parse()
            .unwrap();
        while raw.len() < header_end + length {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "the body is shorter than its Content-Length");
            raw.extend_from_slice(&buf[..n]);
        }
        let body = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
            reply.len()
        );
        stream.write_all(body.as_bytes()).unwrap();
        raw
    });
    (url, handle)
}

/// What PVE's upload handler (pve-http-server's `file_upload_multipart`)
/// makes of a body: the fields it reads in its order, the file part's name
/// and data. Its steps, with the regular expressions it uses.
fn as_pveproxy_reads(body: &[u8], boundary: &str) -> (Vec<(String, String)>, String, Vec<u8>) {
    use regex::bytes::Regex;
    let b = regex::escape(boundary);
    let delim = format!(r"--{b}\r?\n");
    let mut rest = Regex::new(&format!(r"(?s-u)^.*?({delim})"))
        .unwrap()
        .replace(body, "$1".as_bytes())
        .into_owned();
    let until_data = Regex::new(r"(?s-u)^.*?(\r?\n){2}").unwrap();
    let mut fields = Vec::new();
    for name in ["content", "checksum-algorithm", "checksum"] {
        let part = Regex::new(&format!(
            r#"(?s-u)^{delim}.*?Content-Disposition: (.*?); name="{name}"(.*?{delim})"#
        ))
        .unwrap();
        // `s/…/$2/`: the match becomes its second group, the rest stays.
        let found = part.captures(&rest).map(|c| {
            assert_eq!(&c[1], b"form-data");
            [&c[2], &rest[c[0].len()..]].concat()
        });
        if let Some(found) = found {
            rest = found;
            rest = until_data.replace(&rest, &b""[..]).into_owned();
            let value = Regex::new(&format!(r"(?s-u)^(.*?)({delim})")).unwrap();
            let len = {
                let c = value.captures(&rest).unwrap();
                fields.push((
                    name.to_string(),
                    String::from_utf8_lossy(&c[1]).trim().to_string(),
                ));
                c[1].len()
            };
            rest.drain(..len);
        }
    }
    let file = Regex::new(&format!(
        r#"(?s-u)^{delim}Content-Disposition: (.*?); name="(.*?)"; filename="([^"]+)""#
    ))
    .unwrap();
    let c = file
        .captures(&rest)
        .expect("the file part follows the fields, its Content-Disposition first");
    assert_eq!(&c[1], b"form-data");
    assert_eq!(
        &c[2], b"filename",
        "pveproxy wants the file as the part `filename`"
    );
    let file_name = String::from_utf8_lossy(&c[3]).to_string();
    let rest = until_data
        .replace(&rest[c[0].len()..], &b""[..])
        .into_owned();
    let end = Regex::new(&format!(r"(?s-u)^(.*?)(\r?\n)?--{b}--")).unwrap();
    let data = end.captures(&rest).expect("the closing delimiter")[1].to_vec();
    (fields, file_name, data)
}

#[derive(Default)]
struct Recorded(std::sync::Mutex<Vec<(String, u64, u64)>>);

impl Reporter for Recorded {
    fn step(&self, _: &str, _: &str) {}
    fn bytes(&self, label: &str, done: u64, total: u64) {
        self.0
            .lock()
            .unwrap()
            .push((label.to_string(), done, total));
    }
    fn bytes_done(&self, label: &str) {
        self.0.lock().unwrap().push((format!("{label} done"), 0, 0));
    }
}

#[test]
fn uploads_are_multipart_as_pveproxy_reads_them() {
    let (url, server) =
        one_request(r#"{"data":"UPID:pve:00001000:00100000:00000000:imgcopy::root@pam:"}"#);
    let spec = ProxmoxSpec {
        endpoint: url,
        node: "pve".into(),
        token: TokenSource::Env("UNUSED".into()),
        template: None,
        storage: None,
        pool: None,
        full_clone: false,
        tls: TlsMode::Verified,
        ssh_port: 22,
        import_storage: None,
        bridge: None,
    };
    let client = Client::new("lab", &spec, "root@pam!t=s3cret").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.qcow2");
    // Large enough to be read in several pieces, with a line that looks like a delimiter.
    let mut data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    data.extend_from_slice(b"\r\n--not-the-boundary--\r\n");
    std::fs::write(&path, &data).unwrap();
    let progress = Recorded::default();
    let reply = client
        .upload(
            "/nodes/pve/storage/local/upload",
            &[
                ("content", "import".into()),
                ("checksum-algorithm", "sha256".into()),
                ("checksum", "ab12".into()),
            ],
            (
                std::fs::File::open(&path).unwrap(),
                data.len() as u64,
                "agentvm-x-ab12.qcow2",
            ),
            &progress,
            "uploading",
        )
        .unwrap();
    assert!(reply.as_str().unwrap().starts_with("UPID:pve:"));
    let raw = server.join().unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    assert!(
        head.starts_with("POST /api2/json/nodes/pve/storage/local/upload HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.contains("authorization: PVEAPIToken=root@pam!t=s3cret\r\n"),
        "{head}"
    );
    assert!(!head.to_lowercase().contains("transfer-encoding"), "{head}");
    let boundary = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: multipart/form-data; boundary="))
        .expect("a multipart/form-data body")
        .to_string();
    let (fields, file_name, sent) = as_pveproxy_reads(&raw[split..], &boundary);
    assert_eq!(
        fields,
        [
            ("content".to_string(), "import".to_string()),
            ("checksum-algorithm".into(), "sha256".into()),
            ("checksum".into(), "ab12".into()),
        ]
    );
    assert_eq!(file_name, "agentvm-x-ab12.qcow2");
    assert!(sent == data, "the file arrives as it is on disk");
    let seen = progress.0.lock().unwrap().clone();
    let total = data.len() as u64;
    assert_eq!(
        seen[seen.len() - 2..],
        [
            ("uploading".to_string(), total, total),
            ("uploading done".to_string(), 0, 0)
        ]
    );
    assert!(seen.iter().all(|(_, done, of)| done <= of));
}
