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
