//! Host ports for SSH forwards and SPICE: stable per VM, never shared by two VMs,
//! and never one that another process already listens on.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, TcpListener};

use crate::spec::Forward;

pub const SSH_PORT_BASE: u16 = 2222;
pub const SPICE_PORT_BASE: u16 = 5900;
/// How far above a base the search for a free port goes.
pub const PORT_SEARCH_SPAN: u16 = 2000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortError {
    #[error("{kind} port {port} is already used by VM {vm:?}")]
    UsedByVm {
        kind: &'static str,
        port: u16,
        vm: String,
    },
    #[error("{kind} port {port} is already in use on 127.0.0.1 by {holder}")]
    Busy {
        kind: &'static str,
        port: u16,
        holder: String,
    },
    #[error("forward {forward}: host port {port} is already used by VM {vm:?}", port = .forward.host_port)]
    ForwardUsedByVm { forward: Forward, vm: String },
    #[error("forward {forward}: host port {port} is already in use on {addr} by {holder}", port = .forward.host_port, addr = .forward.host_addr)]
    ForwardBusy { forward: Forward, holder: String },
    #[error("no free {kind} port between {from} and {to}")]
    Exhausted {
        kind: &'static str,
        from: u16,
        to: u16,
    },
}

/// Ports held by agentvm VMs (from their metadata), port → VM name.
#[derive(Debug, Default, Clone)]
pub struct Claims {
    held: BTreeMap<u16, String>,
}

impl Claims {
    pub fn add(&mut self, port: u16, vm: &str) {
        self.held.insert(port, vm.to_string());
    }

    fn owner(&self, port: u16) -> Option<&str> {
        self.held.get(&port).map(String::as_str)
    }
}

/// Checks that `forward`'s host port is held by no other VM (whatever address
/// either binds: ports are claimed per number) and free on its address.
pub fn check_forward(vm: &str, forward: &Forward, claims: &Claims) -> Result<(), PortError> {
    if let Some(owner) = claims.owner(forward.host_port).filter(|owner| *owner != vm) {
        return Err(PortError::ForwardUsedByVm {
            forward: *forward,
            vm: owner.to_string(),
        });
    }
    if !is_free_on(forward.host_addr, forward.host_port) {
        return Err(PortError::ForwardBusy {
            forward: *forward,
            holder: holder_of(forward.host_port),
        });
    }
    Ok(())
}

/// Chooses a port for `vm`: the pinned one (which must be free), else the one it
/// already has if still usable, else the lowest free one from `base`.
pub fn choose(
    kind: &'static str,
    base: u16,
    vm: &str,
    pinned: Option<u16>,
    current: Option<u16>,
    claims: &Claims,
) -> Result<u16, PortError> {
    let usable = |port: u16| -> Result<u16, PortError> {
        if let Some(owner) = claims.owner(port).filter(|owner| *owner != vm) {
            return Err(PortError::UsedByVm {
                kind,
                port,
                vm: owner.to_string(),
            });
        }
        if !is_free(port) {
            return Err(PortError::Busy {
                kind,
                port,
                holder: holder_of(port),
            });
        }
        Ok(port)
    };
    if let Some(port) = pinned {
        return usable(port);
    }
    if let Some(port) = current
        && usable(port).is_ok()
    {
        return Ok(port);
    }
    let to = base.saturating_add(PORT_SEARCH_SPAN);
    (base..=to)
        .find(|&port| usable(port).is_ok())
        .ok_or(PortError::Exhausted {
            kind,
            from: base,
            to,
        })
}

/// True when nothing listens on 127.0.0.1:`port` (or on the wildcard address).
pub fn is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// True when nothing listens on `addr`:`port` (or on the wildcard address).
/// An address this host does not have is not free either.
pub fn is_free_on(addr: IpAddr, port: u16) -> bool {
    TcpListener::bind((addr, port)).is_ok()
}

/// A description of the process listening on `port`, as far as /proc shows it.
pub fn holder_of(port: u16) -> String {
    listening_inodes(port)
        .into_iter()
        .find_map(process_with_socket)
        .map(|(pid, comm)| format!("{comm} (pid {pid})"))
        .unwrap_or_else(|| "another process (not visible to this user)".to_string())
}

/// Socket inodes in LISTEN state on `port`, from /proc/net/tcp{,6}.
fn listening_inodes(port: u16) -> Vec<u64> {
    const TCP_LISTEN: &str = "0A";
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (cols.get(1), cols.get(3), cols.get(9))
            else {
                continue;
            };
            let local_port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port)
                && *state == TCP_LISTEN
                && let Ok(inode) = inode.parse()
            {
                inodes.push(inode);
            }
        }
    }
    inodes
}

fn process_with_socket(inode: u64) -> Option<(u32, String)> {
    let target = format!("socket:[{inode}]");
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = proc_entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target.as_str())
        });
        if holds {
            let comm = std::fs::read_to_string(proc_entry.path().join("comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_else(|_| "unknown".to_string());
            return Some((pid, comm));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> (TcpListener, u16) {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        (l, port)
    }

    #[test]
    fn skips_ports_held_by_other_vms_and_processes() {
        let (_held, busy) = listener();
        let mut claims = Claims::default();
        claims.add(busy + 1, "other");
        // From `busy`: busy is taken by a process, busy+1 by another VM.
        let port = choose("ssh", busy, "me", None, None, &claims).unwrap();
        assert!(port >= busy + 2, "{port}");
        assert!(is_free(port));
    }

    #[test]
    fn keeps_the_current_port() {
        let (l, port) = listener();
        drop(l);
        let claims = Claims::default();
        assert_eq!(
            choose("ssh", 2222, "me", None, Some(port), &claims).unwrap(),
            port
        );
    }

    #[test]
    fn pinned_port_held_by_a_process_names_it() {
        let (_held, port) = listener();
        let err = choose("ssh", 2222, "me", Some(port), None, &Claims::default()).unwrap_err();
        let PortError::Busy { holder, .. } = &err else {
            panic!("{err:?}")
        };
        let me = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert!(holder.contains(me.trim()), "{holder}");
        assert!(
            holder.contains(&format!("pid {}", std::process::id())),
            "{holder}"
        );
    }

    #[test]
    fn forwards_are_checked_against_vms_and_listeners() {
        let (held, busy) = listener();
        let forward: Forward = format!("{busy}:80").parse().unwrap();
        let err = check_forward("me", &forward, &Claims::default()).unwrap_err();
        assert!(
            matches!(&err, PortError::ForwardBusy { holder, .. } if holder.contains(&format!("pid {}", std::process::id()))),
            "{err}"
        );
        assert!(
            err.to_string().starts_with(&format!(
                "forward 127.0.0.1:{busy}:80: host port {busy} is already in use on 127.0.0.1 by "
            )),
            "{err}"
        );
        drop(held);
        let mut claims = Claims::default();
        claims.add(busy, "drago");
        let err = check_forward("luce", &forward, &claims).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "forward 127.0.0.1:{busy}:80: host port {busy} is already used by VM \"drago\""
            )
        );
        assert_eq!(check_forward("drago", &forward, &claims), Ok(()));
    }

    #[test]
    fn pinned_port_of_another_vm_is_refused() {
        let (l, port) = listener();
        drop(l);
        let mut claims = Claims::default();
        claims.add(port, "drago");
        assert_eq!(
            choose("spice", 5900, "luce", Some(port), None, &claims),
            Err(PortError::UsedByVm {
                kind: "spice",
                port,
                vm: "drago".into()
            })
        );
        // The VM that holds it may keep it.
        assert_eq!(
            choose("spice", 5900, "drago", Some(port), None, &claims),
            Ok(port)
        );
    }
}
