//! `agentvm proxmox bootstrap-user`: a least-privilege user, pool and token.

use anyhow::{Context, anyhow};

use super::{Client, PveError};
use crate::spec::ProxmoxSpec;

/// What `agentvm proxmox bootstrap-user` made.
#[derive(Debug, serde::Serialize)]
pub struct Bootstrapped {
    pub user: String,
    pub pool: String,
    pub token_id: String,
    /// The secret, shown once: Proxmox does not show it again.
    pub token: String,
}

/// With backend `backend`'s (admin) token: a user, a pool `pool-USER`, the
/// `PVEVMAdmin` role on that pool for the user and its new API token, and the
/// token itself. VMs are then made with the user's token, not the admin's.
pub fn bootstrap_user(
    backend: &str,
    spec: &ProxmoxSpec,
    token: &str,
    user: &str,
) -> anyhow::Result<Bootstrapped> {
    let client = Client::new(backend, spec, token)?;
    let userid = if user.contains('@') {
        user.to_string()
    } else {
        format!("{user}@pve")
    };
    let short = userid.split('@').next().unwrap_or(user).to_string();
    let pool = format!("pool-{short}");
    let tokenid = "agentvm";
    let api = |e: PveError| anyhow!(e);
    client
        .post(
            "/access/users",
            &[
                ("userid", userid.clone()),
                ("comment", "agentvm user".into()),
            ],
        )
        .map_err(api)?;
    client
        .post(
            "/pools",
            &[
                ("poolid", pool.clone()),
                ("comment", format!("agentvm VMs of {userid}")),
            ],
        )
        .map_err(api)?;
    let created = client
        .post(
            &format!("/access/users/{userid}/token/{tokenid}"),
            &[("privsep", "1".into()), ("comment", "agentvm".into())],
        )
        .map_err(api)?;
    let full = created["full-tokenid"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| format!("{userid}!{tokenid}"));
    let secret = created["value"]
        .as_str()
        .context("the new token has no value")?
        .to_string();
    client
        .put(
            "/access/acl",
            &[
                ("path", format!("/pool/{pool}")),
                ("roles", "PVEVMAdmin".into()),
                ("users", userid.clone()),
                ("tokens", full.clone()),
                ("propagate", "1".into()),
            ],
        )
        .map_err(api)?;
    Ok(Bootstrapped {
        user: userid,
        pool,
        token: format!("{full}={secret}"),
        token_id: full,
    })
}
