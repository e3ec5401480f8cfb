//! Proxmox task ids (UPIDs): parsing them as PVE does, and where a task's
//! status and log are.

use std::fmt;

/// A Proxmox task id, `UPID:$node:$pid:$pstart:$starttime:$dtype:$id:$user:`, as PVE's
/// `PVE::Tools::upid_decode` accepts it: pid and starttime are 8 hex digits, pstart 8 or 9.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upid {
    text: String,
    /// The node the task runs on: its status is at `/nodes/{node}/tasks/{upid}/status`.
    pub node: String,
}

impl Upid {
    pub fn parse(text: &str) -> Option<Upid> {
        let fields: Vec<&str> = text
            .strip_prefix("UPID:")?
            .strip_suffix(':')?
            .split(':')
            .collect();
        let [node, pid, pstart, starttime, dtype, id, user] = fields[..] else {
            return None;
        };
        let hex = |s: &str, lengths: std::ops::RangeInclusive<usize>| {
            lengths.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
        };
        let no_space = |s: &str| !s.chars().any(char::is_whitespace);
        let valid = is_node_name(node)
            && hex(pid, 8..=8)
            && hex(pstart, 8..=9)
            && hex(starttime, 8..=8)
            && !dtype.is_empty()
            && no_space(dtype)
            && no_space(id)
            && !user.is_empty()
            && no_space(user);
        valid.then(|| Upid {
            text: text.to_string(),
            node: node.to_string(),
        })
    }

    /// `/nodes/{node}/tasks/{upid}{rest}`, the UPID percent-encoded.
    pub(super) fn path(&self, rest: &str) -> String {
        let encoded =
            percent_encoding::utf8_percent_encode(&self.text, percent_encoding::NON_ALPHANUMERIC);
        format!("/nodes/{}/tasks/{encoded}{rest}", self.node)
    }
}

impl fmt::Display for Upid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// PVE's node names: `[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?`.
fn is_node_name(s: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    alnum(s.chars().next())
        && alnum(s.chars().last())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}
