//! Resolving `shares` (a VM's own, else `[defaults]`) into [`Share`]s.

use toml::Spanned;

use super::raw::RawShare;
use super::resolve::Resolver;
use super::share::guest_path;
use super::*;

impl Resolver<'_> {
    /// The VM's shares: `own` if it lists any, else `defaults`. Host paths are
    /// made absolute (`~` and paths relative to the fleet file work); whether the
    /// folder exists is checked when the VM starts, where it matters.
    pub(super) fn shares(
        &self,
        name: &Name,
        backend: &str,
        own: Option<&Spanned<Vec<RawShare>>>,
        defaults: Option<&Spanned<Vec<RawShare>>>,
    ) -> Result<Vec<Share>, SpecError> {
        let (entries, field) = match (own, defaults) {
            (Some(v), _) => (v, format!("vms.{name}.shares")),
            (None, Some(d)) => (d, "defaults.shares".to_string()),
            (None, None) => return Ok(Vec::new()),
        };
        let fail = |index: Option<usize>, message: String| {
            let field = match index {
                Some(i) => format!("{field}[{i}]"),
                None => field.clone(),
            };
            self.at.error(Some(entries.span()), &field, message)
        };
        if backend != LOCAL_BACKEND && !entries.get_ref().is_empty() {
            return Err(fail(
                None,
                format!(
                    "VM {name} is on backend {backend:?}: a shared folder must be on the machine \
                     that runs the VM; copy files with `agentvm cp` instead \
                     (set shares = [] on this VM to override [defaults])"
                ),
            ));
        }
        let mut shares: Vec<Share> = Vec::new();
        for (i, raw) in entries.get_ref().iter().enumerate() {
            if raw.host.trim().is_empty() {
                return Err(fail(
                    Some(i),
                    "host is empty: name a host folder".to_string(),
                ));
            }
            let guest = guest_path(&raw.guest).map_err(|m| fail(Some(i), format!("guest: {m}")))?;
            if let Some(j) = shares.iter().position(|s| s.guest == guest) {
                return Err(fail(
                    Some(i),
                    format!(
                        "guest: {guest} is also the guest path of shares[{j}]; each share needs its own"
                    ),
                ));
            }
            if let Some(j) = shares.iter().position(|s| {
                guest.starts_with(&format!("{}/", s.guest))
                    || s.guest.starts_with(&format!("{guest}/"))
            }) {
                return Err(fail(
                    Some(i),
                    format!(
                        "guest: {guest} and {} (shares[{j}]) are inside one another; give them separate paths",
                        shares[j].guest
                    ),
                ));
            }
            let uid = raw.uid.unwrap_or(DEFAULT_SHARE_UID);
            shares.push(Share {
                host: self.path(&raw.host),
                guest,
                readonly: raw.readonly,
                kind: raw.kind,
                uid,
                gid: raw.gid.unwrap_or(uid),
            });
        }
        Ok(shares)
    }
}
