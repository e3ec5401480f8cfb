//! The privileges each API call agentvm makes needs, as PVE 9.1's API schema
//! states them (`permissions`), so a 403 can say which one the token lacks.
//! `tests/pve_privileges.rs` checks this table against the schema.

/// (method, path as the schema writes it, the privileges — any one suffices
/// where the schema says `any`, else all — and on which ACL path).
pub const PRIVILEGES: &[(&str, &str, &str)] = &[
    (
        "POST",
        "/nodes/{node}/qemu/{vmid}/clone",
        "VM.Clone on /vms/{vmid}, and VM.Allocate on /vms/{newid} or the pool (plus Datastore.AllocateSpace on the storage)",
    ),
    (
        "GET",
        "/nodes/{node}/qemu/{vmid}/config",
        "VM.Audit on /vms/{vmid}",
    ),
    (
        "POST",
        "/nodes/{node}/qemu/{vmid}/config",
        "VM.Config.* (Disk, CPU, Memory, Network, HWType, Options, Cloudinit) on /vms/{vmid}",
    ),
    (
        "PUT",
        "/nodes/{node}/qemu/{vmid}/resize",
        "VM.Config.Disk on /vms/{vmid}",
    ),
    (
        "POST",
        "/nodes/{node}/qemu/{vmid}/status/start",
        "VM.PowerMgmt on /vms/{vmid}",
    ),
    (
        "POST",
        "/nodes/{node}/qemu/{vmid}/status/stop",
        "VM.PowerMgmt on /vms/{vmid}",
    ),
    (
        "POST",
        "/nodes/{node}/qemu/{vmid}/status/shutdown",
        "VM.PowerMgmt on /vms/{vmid}",
    ),
    (
        "GET",
        "/nodes/{node}/qemu/{vmid}/status/current",
        "VM.Audit on /vms/{vmid}",
    ),
    (
        "DELETE",
        "/nodes/{node}/qemu/{vmid}",
        "VM.Allocate on /vms/{vmid}",
    ),
    (
        "POST",
        "/nodes/{node}/qemu/{vmid}/agent/ping",
        "VM.GuestAgent.Audit or VM.GuestAgent.Unrestricted on /vms/{vmid}",
    ),
    (
        "GET",
        "/nodes/{node}/qemu/{vmid}/agent/network-get-interfaces",
        "VM.GuestAgent.Audit or VM.GuestAgent.Unrestricted on /vms/{vmid}",
    ),
    (
        "POST",
        "/nodes/{node}/qemu/{vmid}/agent/shutdown",
        "VM.PowerMgmt or VM.GuestAgent.Unrestricted on /vms/{vmid}",
    ),
    (
        "POST",
        "/nodes/{node}/qemu/{vmid}/agent/exec",
        "VM.GuestAgent.Unrestricted on /vms/{vmid}",
    ),
    (
        "GET",
        "/nodes/{node}/qemu/{vmid}/agent/exec-status",
        "VM.GuestAgent.Unrestricted on /vms/{vmid}",
    ),
    (
        "GET",
        "/nodes/{node}/qemu/{vmid}/agent/file-read",
        "VM.GuestAgent.FileRead or VM.GuestAgent.Unrestricted on /vms/{vmid}",
    ),
    (
        "POST",
        "/nodes/{node}/qemu/{vmid}/agent/file-write",
        "VM.GuestAgent.FileWrite or VM.GuestAgent.Unrestricted on /vms/{vmid}",
    ),
    (
        "GET",
        "/nodes/{node}/qemu/{vmid}/snapshot",
        "VM.Audit on /vms/{vmid}",
    ),
    (
        "POST",
        "/nodes/{node}/qemu/{vmid}/snapshot",
        "VM.Snapshot on /vms/{vmid}",
    ),
    (
        "POST",
        "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/rollback",
        "VM.Snapshot or VM.Snapshot.Rollback on /vms/{vmid}",
    ),
    (
        "DELETE",
        "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}",
        "VM.Snapshot on /vms/{vmid}",
    ),
    (
        "POST",
        "/nodes/{node}/qemu/{vmid}/spiceproxy",
        "VM.Console on /vms/{vmid}",
    ),
    (
        "POST",
        "/nodes/{node}/qemu/{vmid}/template",
        "VM.Allocate on /vms/{vmid}",
    ),
    (
        "POST",
        "/nodes/{node}/qemu",
        "VM.Allocate on /vms/{vmid} or the pool (plus Datastore.AllocateSpace on the storage)",
    ),
    (
        "POST",
        "/nodes/{node}/storage/{storage}/upload",
        "Datastore.AllocateTemplate on /storage/{storage}",
    ),
    (
        "DELETE",
        "/nodes/{node}/storage/{storage}/content/{volume}",
        "Datastore.Allocate on /storage/{storage}",
    ),
    (
        "GET",
        "/nodes/{node}/tasks/{upid}/status",
        "Sys.Audit on /nodes/{node} (for tasks of other users)",
    ),
    ("POST", "/pools", "Pool.Allocate on /pool/{poolid}"),
];

/// What `method path` (a concrete path such as `/nodes/pve/qemu/100/config`)
/// needs, if agentvm knows the call.
pub fn required(method: &str, path: &str) -> Option<&'static str> {
    let concrete: Vec<&str> = path.trim_matches('/').split('/').collect();
    PRIVILEGES
        .iter()
        .find(|(m, pattern, _)| {
            let parts: Vec<&str> = pattern.trim_matches('/').split('/').collect();
            *m == method
                && parts.len() == concrete.len()
                && parts
                    .iter()
                    .zip(&concrete)
                    .all(|(p, c)| p.starts_with('{') || p == c)
        })
        .map(|(_, _, privileges)| *privileges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concrete_paths_find_their_privileges() {
        assert_eq!(
            required("POST", "/nodes/pve2/qemu/101/agent/exec"),
            Some("VM.GuestAgent.Unrestricted on /vms/{vmid}")
        );
        assert_eq!(
            required("DELETE", "/nodes/pve/qemu/101"),
            Some("VM.Allocate on /vms/{vmid}")
        );
        assert_eq!(required("GET", "/nodes/pve/qemu/101/unknown"), None);
    }
}
