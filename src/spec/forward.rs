//! Port forwards: `forwards = ["8080:80", "127.0.0.1:5432:5432"]` makes host TCP
//! ports reach ports in the guest.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

/// The lowest host port an unprivileged user may listen on.
pub const MIN_HOST_PORT: u16 = 1024;

/// One forward: connections to `host_addr:host_port` reach the guest's `guest_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Forward {
    pub host_addr: IpAddr,
    pub host_port: u16,
    pub guest_port: u16,
}

impl Forward {
    /// `HOSTPORT:GUESTPORT` (bound on 127.0.0.1) or `ADDR:HOSTPORT:GUESTPORT`,
    /// where ADDR is an IP literal (IPv6 may be written in brackets).
    pub fn parse(text: &str) -> Result<Self, String> {
        let syntax = || format!("{text:?} is not HOSTPORT:GUESTPORT or ADDR:HOSTPORT:GUESTPORT");
        let mut parts = text.rsplitn(3, ':');
        let guest = parts.next().ok_or_else(syntax)?;
        let host = parts.next().ok_or_else(syntax)?;
        let host_addr = match parts.next() {
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(addr) => {
                let bare = addr
                    .strip_prefix('[')
                    .and_then(|a| a.strip_suffix(']'))
                    .unwrap_or(addr);
                bare.parse::<IpAddr>()
                    .map_err(|_| format!("{text:?}: {addr:?} is not an IP address"))?
            }
        };
        let host_port = port(text, "host", host)?;
        let guest_port = port(text, "guest", guest)?;
        if host_port < MIN_HOST_PORT {
            return Err(format!(
                "{text:?}: host port {host_port} is below {MIN_HOST_PORT}; agentvm runs unprivileged, use {MIN_HOST_PORT} to 65535"
            ));
        }
        Ok(Self {
            host_addr,
            host_port,
            guest_port,
        })
    }

    /// The address as QEMU's `hostfwd` and libvirt want it (IPv6 in brackets
    /// for `hostfwd`).
    pub fn hostfwd_addr(&self) -> String {
        match self.host_addr {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        }
    }

    /// `tcp:ADDR:HOST-:GUEST`, as QEMU's `hostfwd=` and `hostfwd_add` take it.
    pub fn hostfwd(&self) -> String {
        format!(
            "tcp:{}:{}-:{}",
            self.hostfwd_addr(),
            self.host_port,
            self.guest_port
        )
    }
}

fn port(text: &str, which: &str, value: &str) -> Result<u16, String> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{text:?} is not HOSTPORT:GUESTPORT or ADDR:HOSTPORT:GUESTPORT ({which} port {value:?} is not a number)"
        ));
    }
    match value.parse::<u32>() {
        Ok(n @ 1..=65535) => Ok(n as u16),
        _ => Err(format!(
            "{text:?}: {which} port {value} is out of range (1 to 65535)"
        )),
    }
}

impl std::str::FromStr for Forward {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}",
            self.hostfwd_addr(),
            self.host_port,
            self.guest_port
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() {
        assert_eq!(
            Forward::parse("8080:80").unwrap(),
            Forward {
                host_addr: "127.0.0.1".parse().unwrap(),
                host_port: 8080,
                guest_port: 80
            }
        );
        let f = Forward::parse("0.0.0.0:5432:5432").unwrap();
        assert_eq!(f.host_addr, "0.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(f.hostfwd(), "tcp:0.0.0.0:5432-:5432");
        let v6 = Forward::parse("[::1]:8443:443").unwrap();
        assert_eq!(v6.hostfwd(), "tcp:[::1]:8443-:443");
        assert_eq!(Forward::parse("::1:8443:443").unwrap(), v6);
        assert_eq!(v6.to_string().parse::<Forward>().unwrap(), v6);
    }

    #[test]
    fn refuses_bad_entries() {
        for (text, says) in [
            ("8080", "is not HOSTPORT:GUESTPORT"),
            ("", "is not HOSTPORT:GUESTPORT"),
            ("a:80", "host port \"a\" is not a number"),
            ("8080:", "guest port \"\" is not a number"),
            ("8080:+80", "not a number"),
            ("0:80", "host port 0 is out of range"),
            ("8080:0", "guest port 0 is out of range"),
            ("70000:80", "host port 70000 is out of range"),
            ("8080:65536", "guest port 65536 is out of range"),
            ("80:80", "host port 80 is below 1024"),
            ("localhost:8080:80", "\"localhost\" is not an IP address"),
            ("1.2.3:8080:80", "is not an IP address"),
        ] {
            let err = Forward::parse(text).unwrap_err();
            assert!(err.contains(says), "{text:?}: {err}");
        }
    }
}
