//! Egress policy: `egress = "open"` (the default), `"none"`, or a list of
//! `HOST:PORT` entries the guest may reach through the host's proxy
//! (`"github.com:443"`, `"*.crates.io:443"`, `"10.0.2.2:8000"`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// The address under which QEMU's user network shows the guest the host.
pub const SLIRP_HOST_ADDR: &str = "10.0.2.2";

/// The guest port the host's egress proxy is reached on (guest loopback).
pub const GUEST_PROXY_PORT: u16 = 3128;

/// What a VM may reach outside itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// Anything, as the user network allows.
    #[default]
    Open,
    /// Nothing: the guest's own connections out are refused.
    None,
    /// Only these host:port pairs, through the host's proxy.
    Allow(Vec<EgressRule>),
}

impl Egress {
    pub fn is_open(&self) -> bool {
        matches!(self, Self::Open)
    }

    /// The rules of an allow list (none for `open` and `none`).
    pub fn rules(&self) -> &[EgressRule] {
        match self {
            Self::Allow(rules) => rules,
            _ => &[],
        }
    }

    /// Whether a connection to `host:port` through the proxy is admitted.
    pub fn admits(&self, host: &str, port: u16) -> bool {
        self.rules().iter().any(|rule| rule.matches(host, port))
    }
}

impl super::VmSpec {
    /// The env the guest gets: `env`, and for an allow list the proxy
    /// variables (`http_proxy`, `https_proxy`, their upper-case forms and
    /// `no_proxy`) naming the proxy on the guest's loopback. They are not
    /// secret, and they win over the same names in `env`.
    pub fn guest_env(&self) -> std::collections::BTreeMap<String, String> {
        let mut env = self.env.clone();
        if let Egress::Allow(_) = self.egress {
            let proxy = format!("http://127.0.0.1:{GUEST_PROXY_PORT}");
            for key in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"] {
                env.insert(key.to_string(), proxy.clone());
            }
            for key in ["no_proxy", "NO_PROXY"] {
                env.insert(key.to_string(), "localhost,127.0.0.1".to_string());
            }
        }
        env
    }

    /// Whether the guest gets an env file at all.
    pub fn has_guest_env(&self) -> bool {
        !self.env.is_empty() || !self.pass_env.is_empty() || !self.egress.rules().is_empty()
    }
}

impl fmt::Display for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open => f.write_str("open"),
            Self::None => f.write_str("none"),
            Self::Allow(rules) => {
                let list: Vec<String> = rules.iter().map(ToString::to_string).collect();
                write!(f, "[{}]", list.join(", "))
            }
        }
    }
}

/// Which hosts a rule names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// This host name or address exactly (names compared without case).
    Exact(String),
    /// `*.DOMAIN`: any subdomain of DOMAIN, not DOMAIN itself.
    Subdomains(String),
}

/// One allow-list entry: a host pattern and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EgressRule {
    pub host: HostPattern,
    pub port: u16,
}

impl EgressRule {
    /// `HOST:PORT`, `*.DOMAIN:PORT` or `[IPV6]:PORT`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "open" || text == "none" {
            return Err(format!(
                "{text:?} is a whole policy, not a list entry: write egress = {text:?}"
            ));
        }
        let (host, port) = text
            .rsplit_once(':')
            .filter(|(host, _)| !host.ends_with(':') || host.starts_with('['))
            .ok_or_else(|| format!("{text:?} has no port: write HOST:PORT, like \"{text}:443\""))?;
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{text:?}: port {port:?} is not a number"));
        }
        let port = match port.parse::<u32>() {
            Ok(n @ 1..=65535) => n as u16,
            _ => {
                return Err(format!(
                    "{text:?}: port {port} is out of range (1 to 65535)"
                ));
            }
        };
        let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        if bracketed.is_some_and(|h| !h.is_empty() && h.parse::<std::net::Ipv6Addr>().is_err())
            || (bracketed.is_none() && host.contains(':'))
        {
            return Err(format!(
                "{text:?}: {host:?} is not a host name or an IP address (IPv6 goes in brackets: \"[::1]:443\")"
            ));
        }
        let host = bracketed.unwrap_or(host);
        if host.is_empty() {
            return Err(format!("{text:?} has an empty host"));
        }
        let (pattern, bare) = match host.strip_prefix("*.") {
            Some(domain) => (HostPattern::Subdomains(domain.to_ascii_lowercase()), domain),
            None => (HostPattern::Exact(host.to_ascii_lowercase()), host),
        };
        if bare.contains('*') {
            return Err(format!(
                "{text:?}: a wildcard may only start the host, as in \"*.example.com:443\""
            ));
        }
        if bare.is_empty()
            || bare.starts_with('.')
            || bare.ends_with('.')
            || bare.contains("..")
            || !bare
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
        {
            return Err(format!(
                "{text:?}: {host:?} is not a host name or an IP address"
            ));
        }
        Ok(Self {
            host: pattern,
            port,
        })
    }

    /// Whether this rule admits `host:port` (a name as the client wrote it).
    pub fn matches(&self, host: &str, port: u16) -> bool {
        if port != self.port {
            return false;
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&host);
        match &self.host {
            HostPattern::Exact(name) => host == name,
            HostPattern::Subdomains(domain) => host
                .strip_suffix(domain.as_str())
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
        }
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            HostPattern::Exact(host) if host.contains(':') => write!(f, "[{host}]:{}", self.port),
            HostPattern::Exact(host) => write!(f, "{host}:{}", self.port),
            HostPattern::Subdomains(domain) => write!(f, "*.{domain}:{}", self.port),
        }
    }
}

impl std::str::FromStr for EgressRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl Serialize for EgressRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EgressRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> Egress {
        Egress::Allow(
            entries
                .iter()
                .map(|e| EgressRule::parse(e).unwrap())
                .collect(),
        )
    }

    #[test]
    fn exact_hosts_match_name_and_port_only() {
        let egress = list(&["github.com:443", "10.0.2.2:8000", "[::1]:9000"]);
        assert!(egress.admits("github.com", 443));
        assert!(egress.admits("GitHub.com.", 443));
        assert!(!egress.admits("github.com", 80));
        assert!(!egress.admits("api.github.com", 443));
        assert!(!egress.admits("evilgithub.com", 443));
        assert!(egress.admits("10.0.2.2", 8000));
        assert!(!egress.admits("10.0.2.2", 8001));
        assert!(egress.admits("::1", 9000));
        assert!(egress.admits("[::1]", 9000));
        assert!(!Egress::None.admits("github.com", 443));
        assert!(!Egress::Open.admits("github.com", 443));
    }

    #[test]
    fn wildcards_match_subdomains_not_the_domain() {
        let egress = list(&["*.crates.io:443"]);
        assert!(egress.admits("static.crates.io", 443));
        assert!(egress.admits("a.b.crates.io", 443));
        assert!(!egress.admits("crates.io", 443));
        assert!(!egress.admits("notcrates.io", 443));
        assert!(!egress.admits(".crates.io", 443));
        assert!(!egress.admits("static.crates.io", 80));
    }

    #[test]
    fn entries_print_as_written() {
        for text in [
            "github.com:443",
            "*.crates.io:443",
            "10.0.2.2:8000",
            "[::1]:9000",
        ] {
            assert_eq!(EgressRule::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(list(&["a.io:1", "b.io:2"]).to_string(), "[a.io:1, b.io:2]");
        let json = serde_json::to_string(&list(&["*.crates.io:443"])).unwrap();
        assert_eq!(json, r#"{"allow":["*.crates.io:443"]}"#);
        assert_eq!(
            serde_json::from_str::<Egress>(&json).unwrap(),
            list(&["*.crates.io:443"])
        );
        assert_eq!(serde_json::to_string(&Egress::None).unwrap(), r#""none""#);
    }

    #[test]
    fn refuses_bad_entries() {
        for (text, says) in [
            ("github.com", "has no port"),
            ("::1", "has no port"),
            ("github.com:", "is not a number"),
            ("github.com:https", "is not a number"),
            ("github.com:0", "out of range"),
            ("github.com:65536", "out of range"),
            ("github.com:+443", "is not a number"),
            (":443", "empty host"),
            ("[]:443", "empty host"),
            ("open", "whole policy"),
            ("none", "whole policy"),
            ("api.*.github.com:443", "wildcard may only start"),
            ("*github.com:443", "wildcard may only start"),
            ("*.:443", "is not a host name"),
            ("git hub.com:443", "is not a host name"),
            ("a..b:443", "is not a host name"),
            ("github.com:443:80", "is not a host name"),
            ("[github.com]:443", "is not a host name"),
        ] {
            let err = EgressRule::parse(text).unwrap_err();
            assert!(err.contains(says), "{text:?}: {err}");
        }
    }
}
