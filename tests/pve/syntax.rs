//! PVE's value syntaxes as the schema checker applies them: integers, numbers, booleans, the
//! named formats agentvm meets, API token headers, and the schema's Perl patterns.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Mutex, OnceLock};

use regex::Regex;

/// The parts of a `PVEAPIToken=USER@REALM!TOKENID=SECRET` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenAuth {
    /// `user@realm`
    pub userid: String,
    /// The token name after `!`.
    pub tokenid: String,
    pub secret: String,
}

impl TokenAuth {
    /// `user@realm!tokenid`, as PVE names the token.
    pub fn full_tokenid(&self) -> String {
        format!("{}!{}", self.userid, self.tokenid)
    }
}

/// Compiled patterns may be this large: `\w` and `\s` are Unicode classes, and a bounded
/// repetition of them (the SDN vnet alias pattern's `[\(\)-_.\w\d\s]{0,256}`) needs more than
/// the `regex` crate's default limit of 10 MiB.
const PATTERN_SIZE_LIMIT: usize = 64 << 20;

/// A schema pattern (Perl syntax) as the anchored `regex` PVE applies: PVE checks a value with
/// `m/^$pattern$/`. See [`perl_to_rust`] for the rewriting.
pub fn compile_pattern(pattern: &str) -> Result<Regex, String> {
    let rust = perl_to_rust(pattern)?;
    regex::RegexBuilder::new(&format!("^(?:{rust})$"))
        .octal(true)
        .size_limit(PATTERN_SIZE_LIMIT)
        .build()
        .map_err(|e| e.to_string())
}

/// Rewrites the Perl-only syntax of the schema's patterns for the `regex` crate:
/// - `(?^FLAGS:…)`, Perl's "default flags plus FLAGS" group, becomes `(?FLAGS-OTHERS:…)` where
///   OTHERS are the rest of `imsx` (Perl's `^` turns them off); other Perl flags are refused.
/// - `\0` (NUL) is an octal escape, which [`compile_pattern`] enables.
///
/// One difference stays: Perl's `$` also matches before a final newline, so PVE accepts a
/// trailing newline where this checker does not.
pub fn perl_to_rust(pattern: &str) -> Result<String, String> {
    let mut out = String::with_capacity(pattern.len());
    let mut rest = pattern;
    while let Some(at) = rest.find("(?^") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 3..];
        let flags_end = after
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(after.len());
        let (flags, tail) = after.split_at(flags_end);
        let Some(tail) = tail.strip_prefix(':') else {
            return Err(format!("Perl group (?^{flags} is not followed by ':'"));
        };
        if let Some(bad) = flags.chars().find(|c| !"imsx".contains(*c)) {
            return Err(format!(
                "Perl flag '{bad}' in (?^{flags}: has no translation"
            ));
        }
        let off: String = "imsx".chars().filter(|c| !flags.contains(*c)).collect();
        if off.is_empty() {
            out.push_str(&format!("(?{flags}:"));
        } else {
            out.push_str(&format!("(?{flags}-{off}:"));
        }
        rest = tail;
    }
    out.push_str(rest);
    Ok(out)
}

/// Parses `PVEAPIToken=USER@REALM!TOKENID=SECRET`.
pub fn parse_token_header(header: Option<&str>) -> Result<TokenAuth, String> {
    let header = header.ok_or("missing (expected PVEAPIToken=USER@REALM!TOKENID=SECRET)")?;
    let rest = header
        .strip_prefix("PVEAPIToken=")
        .ok_or_else(|| format!("{header:?} does not start with 'PVEAPIToken='"))?;
    if rest.chars().any(char::is_whitespace) {
        return Err("contains whitespace".into());
    }
    let (full_id, secret) = rest
        .split_once('=')
        .ok_or("no '=SECRET' after the token id")?;
    let (userid, tokenid) = full_id
        .split_once('!')
        .ok_or_else(|| format!("token id {full_id:?} is not USER@REALM!TOKENID"))?;
    if !is_userid(userid) {
        return Err(format!("user {userid:?} is not a valid USER@REALM"));
    }
    if !regex_is_match(r"^[A-Za-z][A-Za-z0-9.\-_]+$", tokenid) {
        return Err(format!("token name {tokenid:?} is not valid"));
    }
    if !regex_is_match(r"^[A-Za-z0-9][A-Za-z0-9._~+/=-]*$", secret) {
        return Err("secret is empty or has invalid characters".into());
    }
    Ok(TokenAuth {
        userid: userid.to_string(),
        tokenid: tokenid.to_string(),
        secret: secret.to_string(),
    })
}

/// The header value a client sends for a token.
pub fn token_header(full_tokenid: &str, secret: &str) -> String {
    format!("PVEAPIToken={full_tokenid}={secret}")
}

/// Checks the named formats that matter for agentvm; unknown formats pass. `X-list` formats are
/// split like PVE does (on `,`, `;`, whitespace and NUL) and each item checked as `X`.
pub(super) fn check_format(format: &str, value: &str) -> Result<(), String> {
    if let Some(item_format) = format.strip_suffix("-list") {
        for item in value
            .split([',', ';', ' ', '\t', '\n', '\0'])
            .filter(|s| !s.is_empty())
        {
            check_format(item_format, item).map_err(|e| format!("list item {item:?}: {e}"))?;
        }
        return Ok(());
    }
    let ok = match format {
        "pve-vmid" => parse_integer(value).is_some_and(|n| (100..=999_999_999).contains(&n)),
        "pve-node" => regex_is_match(r"^[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?$", value),
        "pve-configid" | "pve-storage-id" => regex_is_match(r"^[a-zA-Z][a-zA-Z0-9\-_]+$", value),
        "pve-poolid" => regex_is_match(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+){0,2}$", value),
        "pve-userid" => value.len() <= 64 && is_userid(value),
        "pve-tokenid" => value
            .split_once('!')
            .is_some_and(|(u, t)| is_userid(u) && regex_is_match(r"^[A-Za-z][A-Za-z0-9.\-_]+$", t)),
        "pve-roleid" | "pve-groupid" => regex_is_match(r"^[A-Za-z0-9.\-_]+$", value),
        "pve-priv" => regex_is_match(r"^[A-Za-z][A-Za-z.]*[A-Za-z]$", value),
        "dns-name" => regex_is_match(
            r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9\-]*[a-zA-Z0-9])?\.)*[a-zA-Z0-9](?:[a-zA-Z0-9\-]*[a-zA-Z0-9])?$",
            value,
        ),
        // PVE::JSONSchema::pve_verify_urlencoded: /^[-%a-zA-Z0-9_.!~*'()]*$/ — so '+' and raw
        // spaces are rejected (cloud-init sshkeys must encode a space as %20). Also require each
        // '%' to start a valid escape, or PVE's uri_unescape would mangle the value.
        "urlencoded" => {
            regex_is_match(r"^[-%a-zA-Z0-9_.!~*'()]*$", value)
                && regex_is_match(r"^(?:[^%]|%[0-9A-Fa-f]{2})*$", value)
        }
        "pve-qm-ipconfig" => return check_ipconfig(value),
        "ip" => value.parse::<IpAddr>().is_ok(),
        "ipv4" => value.parse::<Ipv4Addr>().is_ok(),
        "ipv6" => value.parse::<Ipv6Addr>().is_ok(),
        "CIDR" => is_cidr(value, true, true),
        "CIDRv4" => is_cidr(value, true, false),
        "CIDRv6" => is_cidr(value, false, true),
        "mac-addr" => regex_is_match(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$", value),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("not a valid {format}"))
    }
}

/// `pve-qm-ipconfig`: `[gw=<IPv4>] [,gw6=<IPv6>] [,ip=<IPv4/CIDR|dhcp>] [,ip6=<IPv6/CIDR|dhcp|auto>]`.
fn check_ipconfig(value: &str) -> Result<(), String> {
    let mut seen = Vec::new();
    for part in value.split(',') {
        let (key, val) = part
            .split_once('=')
            .ok_or_else(|| format!("ipconfig part {part:?} is not key=value"))?;
        let ok = match key {
            "ip" => val == "dhcp" || is_cidr(val, true, false),
            "ip6" => val == "dhcp" || val == "auto" || is_cidr(val, false, true),
            "gw" => val.parse::<Ipv4Addr>().is_ok(),
            "gw6" => val.parse::<Ipv6Addr>().is_ok(),
            _ => return Err(format!("ipconfig key {key:?} unknown (ip, gw, ip6, gw6)")),
        };
        if !ok {
            return Err(format!("ipconfig {key}={val:?} is invalid"));
        }
        if seen.contains(&key) {
            return Err(format!("ipconfig key {key:?} given twice"));
        }
        seen.push(key);
    }
    Ok(())
}

fn is_cidr(value: &str, v4: bool, v6: bool) -> bool {
    let Some((ip, prefix)) = value.split_once('/') else {
        return false;
    };
    let Ok(prefix) = prefix.parse::<u8>() else {
        return false;
    };
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => v4 && prefix <= 32,
        Ok(IpAddr::V6(_)) => v6 && prefix <= 128,
        Err(_) => false,
    }
}

fn is_userid(value: &str) -> bool {
    regex_is_match(r"^[^\s:/@]+@[A-Za-z][A-Za-z0-9.\-_]+$", value)
}

fn regex_is_match(pattern: &str, value: &str) -> bool {
    static CACHE: OnceLock<Mutex<HashMap<String, Regex>>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap();
    cache
        .entry(pattern.to_string())
        .or_insert_with(|| Regex::new(pattern).expect("built-in pattern"))
        .is_match(value)
}

/// PVE's integer syntax: `^-?\d+$`.
pub fn parse_integer(value: &str) -> Option<i64> {
    let digits = value.strip_prefix('-').unwrap_or(value);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// PVE's number syntax: `^-?\d+(\.\d+)?([eE][-+]?\d+)?$` (no `inf`, `nan`, `.5`, `5.`).
pub fn parse_number(value: &str) -> Option<f64> {
    regex_is_match(r"^-?\d+(\.\d+)?([eE][-+]?\d+)?$", value)
        .then(|| value.parse().ok())
        .flatten()
}

/// PVE's boolean syntax: `1|true|yes|on` and `0|false|no|off`, any case.
pub fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}
