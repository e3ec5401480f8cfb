//! The pool, user, API token, role and ACL handlers of the fake PVE.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::time::SystemTime;

use serde_json::{Value, json};

use super::model::{FakeAcl, FakeToken, FakeUser, all_privileges};
use super::qemu::vmid_of;
use super::state::{Caller, Fail, Params, State, fail};
use super::syntax::parse_bool;

impl State {
    pub(super) fn pool_json(&self, poolid: &str, with_members: bool) -> Value {
        let mut r = json!({ "poolid": poolid });
        if let Some(Some(comment)) = self.pools.get(poolid) {
            r["comment"] = json!(comment);
        }
        if with_members {
            let members: Vec<Value> = self
                .pool_members(poolid)
                .iter()
                .map(|vmid| {
                    let vm = &self.vms[vmid];
                    json!({
                        "id": format!("qemu/{vmid}"), "type": "qemu", "vmid": vmid,
                        "node": vm.node, "name": vm.name,
                        "status": if vm.running { "running" } else { "stopped" },
                        "template": u8::from(vm.template),
                    })
                })
                .collect();
            r["members"] = Value::Array(members);
        }
        r
    }

    pub(super) fn list_pools(&self, caller: &Caller, p: &Params) -> Result<Value, Fail> {
        if !caller.has("Pool.Audit") {
            return Ok(json!([]));
        }
        if let Some(poolid) = p.get("poolid") {
            if !self.pools.contains_key(poolid) {
                return fail(500, format!("pool '{poolid}' does not exist"));
            }
            return Ok(json!([self.pool_json(poolid, true)]));
        }
        Ok(Value::Array(
            self.pools
                .keys()
                .map(|id| self.pool_json(id, false))
                .collect(),
        ))
    }

    pub(super) fn get_pool(&self, caller: &Caller, poolid: &str) -> Result<Value, Fail> {
        caller.require(&format!("/pool/{poolid}"), "Pool.Audit")?;
        if !self.pools.contains_key(poolid) {
            return fail(500, format!("pool '{poolid}' does not exist"));
        }
        let mut r = self.pool_json(poolid, true);
        r.as_object_mut().unwrap().remove("poolid");
        Ok(r)
    }

    pub(super) fn create_pool(&mut self, caller: &Caller, p: &Params) -> Result<Value, Fail> {
        let poolid = &p["poolid"];
        caller.require(&format!("/pool/{poolid}"), "Pool.Allocate")?;
        if self.pools.contains_key(poolid) {
            return fail(500, format!("pool '{poolid}' already exists"));
        }
        self.pools.insert(poolid.clone(), p.get("comment").cloned());
        Ok(Value::Null)
    }

    pub(super) fn update_pool(
        &mut self,
        caller: &Caller,
        poolid: &str,
        p: &Params,
    ) -> Result<Value, Fail> {
        caller.require(&format!("/pool/{poolid}"), "Pool.Allocate")?;
        if !self.pools.contains_key(poolid) {
            return fail(500, format!("pool '{poolid}' does not exist"));
        }
        let delete = p.get("delete").and_then(|v| parse_bool(v)) == Some(true);
        let allow_move = p.get("allow-move").and_then(|v| parse_bool(v)) == Some(true);
        let vmids: Vec<u32> = p
            .get("vms")
            .map(|v| {
                v.split([',', ';', ' '])
                    .filter(|s| !s.is_empty())
                    .map(vmid_of)
                    .collect()
            })
            .unwrap_or_default();
        for vmid in &vmids {
            let Some(vm) = self.vms.get(vmid) else {
                return fail(500, format!("VM {vmid} does not exist"));
            };
            match (&vm.pool, delete) {
                (Some(other), false) if other != poolid && !allow_move => {
                    return fail(500, format!("VM {vmid} is already a pool member"));
                }
                (pool, true) if pool.as_deref() != Some(poolid) => {
                    return fail(500, format!("VM {vmid} is not a pool member"));
                }
                _ => {}
            }
        }
        for vmid in vmids {
            self.vms.get_mut(&vmid).unwrap().pool = (!delete).then(|| poolid.to_string());
        }
        if let Some(comment) = p.get("comment") {
            self.pools.insert(poolid.to_string(), Some(comment.clone()));
        }
        Ok(Value::Null)
    }

    pub(super) fn delete_pool(&mut self, caller: &Caller, poolid: &str) -> Result<Value, Fail> {
        caller.require(&format!("/pool/{poolid}"), "Pool.Allocate")?;
        if !self.pools.contains_key(poolid) {
            return fail(500, format!("pool '{poolid}' does not exist"));
        }
        if !self.pool_members(poolid).is_empty() {
            return fail(500, format!("pool '{poolid}' is not empty"));
        }
        self.pools.remove(poolid);
        Ok(Value::Null)
    }

    // ----- users, tokens, roles, ACLs -----

    pub(super) fn list_users(&self, caller: &Caller) -> Result<Value, Fail> {
        if !caller.has("Sys.Audit") && !caller.has("User.Modify") {
            return Ok(json!([]));
        }
        let list = self
            .users
            .iter()
            .map(|(id, u)| {
                let mut r = json!({ "userid": id, "enable": u8::from(u.enable) });
                if let Some(c) = &u.comment {
                    r["comment"] = json!(c);
                }
                r
            })
            .collect();
        Ok(Value::Array(list))
    }

    pub(super) fn create_user(&mut self, caller: &Caller, p: &Params) -> Result<Value, Fail> {
        let userid = &p["userid"];
        let realm = userid.rsplit_once('@').map_or("", |(_, r)| r);
        caller.require(&format!("/access/realm/{realm}"), "Realm.AllocateUser")?;
        if self.users.contains_key(userid) {
            return fail(
                500,
                format!("create user failed: user '{userid}' already exists"),
            );
        }
        let user = FakeUser {
            comment: p.get("comment").cloned(),
            enable: p.get("enable").and_then(|v| parse_bool(v)).unwrap_or(true),
            tokens: BTreeMap::new(),
        };
        self.users.insert(userid.clone(), user);
        Ok(Value::Null)
    }

    pub(super) fn create_token(
        &mut self,
        caller: &Caller,
        userid: &str,
        tokenid: &str,
        p: &Params,
    ) -> Result<Value, Fail> {
        caller.require(&format!("/access/users/{userid}"), "User.Modify")?;
        let n = self.next_counter();
        let Some(user) = self.users.get_mut(userid) else {
            return fail(500, format!("no such user ('{userid}')"));
        };
        if user.tokens.contains_key(tokenid) {
            return fail(500, "Token already exists.");
        }
        let token = FakeToken {
            secret: fake_uuid(n),
            privsep: p.get("privsep").and_then(|v| parse_bool(v)).unwrap_or(true),
            comment: p.get("comment").cloned(),
        };
        let reply = json!({
            "full-tokenid": format!("{userid}!{tokenid}"),
            "info": token_info(&token),
            "value": token.secret,
        });
        user.tokens.insert(tokenid.to_string(), token);
        Ok(reply)
    }

    pub(super) fn get_token(
        &self,
        caller: &Caller,
        userid: &str,
        tokenid: &str,
    ) -> Result<Value, Fail> {
        caller.require(&format!("/access/users/{userid}"), "User.Modify")?;
        let token = self
            .users
            .get(userid)
            .and_then(|u| u.tokens.get(tokenid))
            .ok_or_else(|| {
                (
                    500,
                    format!("no such token '{tokenid}' for user '{userid}'"),
                )
            })?;
        Ok(token_info(token))
    }

    pub(super) fn delete_token(
        &mut self,
        caller: &Caller,
        userid: &str,
        tokenid: &str,
    ) -> Result<Value, Fail> {
        caller.require(&format!("/access/users/{userid}"), "User.Modify")?;
        let full = format!("{userid}!{tokenid}");
        self.users
            .get_mut(userid)
            .and_then(|u| u.tokens.remove(tokenid))
            .ok_or_else(|| {
                (
                    500,
                    format!("no such token '{tokenid}' for user '{userid}'"),
                )
            })?;
        self.acls.retain(|a| !(a.kind == "token" && a.ugid == full));
        Ok(Value::Null)
    }

    pub(super) fn list_acls(&self, caller: &Caller) -> Result<Value, Fail> {
        if !caller.has("Permissions.Modify") && !caller.has("Sys.Audit") {
            return Ok(json!([]));
        }
        let list = self
            .acls
            .iter()
            .map(|a| {
                json!({ "path": a.path, "roleid": a.roleid, "type": a.kind, "ugid": a.ugid,
                        "propagate": u8::from(a.propagate) })
            })
            .collect();
        Ok(Value::Array(list))
    }

    pub(super) fn update_acl(&mut self, caller: &Caller, p: &Params) -> Result<Value, Fail> {
        let path = &p["path"];
        caller.require(path, "Permissions.Modify")?;
        let acl_path = regex::Regex::new(
            r"^/(?:|vms(?:/\d+)?|pool(?:/[A-Za-z0-9_\-]+)*|storage(?:/[A-Za-z0-9_\-]+)?|nodes(?:/[A-Za-z0-9\-]+)?|access(?:/.*)?|sdn(?:/.*)?|mapping(?:/.*)?)$",
        )
        .unwrap();
        if !acl_path.is_match(path) {
            return fail(400, format!("invalid ACL path '{path}'"));
        }
        let list = |key: &str| -> Vec<String> {
            p.get(key)
                .map(|v| {
                    v.split([',', ';', ' '])
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        let roles = list("roles");
        for role in &roles {
            if self.role_privileges(role).is_none() {
                return fail(500, format!("role '{role}' does not exist"));
            }
        }
        let mut subjects = Vec::new();
        for user in list("users") {
            let known = self.users.contains_key(&user)
                || self
                    .opts
                    .tokens
                    .iter()
                    .any(|(id, _, _)| id.starts_with(&format!("{user}!")));
            if !known {
                return fail(500, format!("user '{user}' does not exist"));
            }
            subjects.push(("user", user));
        }
        for token in list("tokens") {
            let known = self.opts.tokens.iter().any(|(id, _, _)| *id == token)
                || token
                    .split_once('!')
                    .and_then(|(u, t)| self.users.get(u)?.tokens.get(t))
                    .is_some();
            if !known {
                return fail(500, format!("no such token '{token}'"));
            }
            subjects.push(("token", token));
        }
        for group in list("groups") {
            subjects.push(("group", group));
        }
        let delete = p.get("delete").and_then(|v| parse_bool(v)) == Some(true);
        let propagate = p
            .get("propagate")
            .and_then(|v| parse_bool(v))
            .unwrap_or(true);
        for (kind, ugid) in subjects {
            for role in &roles {
                self.acls.retain(|a| {
                    !(a.path == *path && a.kind == kind && a.ugid == ugid && a.roleid == *role)
                });
                if !delete {
                    self.acls.push(FakeAcl {
                        path: path.clone(),
                        roleid: role.clone(),
                        kind: kind.to_string(),
                        ugid: ugid.clone(),
                        propagate,
                    });
                }
            }
        }
        Ok(Value::Null)
    }

    pub(super) fn list_roles(&self) -> Result<Value, Fail> {
        let builtin = [
            "Administrator",
            "NoAccess",
            "PVEAdmin",
            "PVEAuditor",
            "PVEVMAdmin",
            "PVEVMUser",
            "PVETemplateUser",
            "PVEPoolAdmin",
            "PVEPoolUser",
            "PVEUserAdmin",
            "PVEDatastoreAdmin",
            "PVEDatastoreUser",
            "PVESDNUser",
        ];
        let mut out: Vec<Value> = builtin
            .iter()
            .map(|r| {
                let privs: Vec<String> = self.role_privileges(r).unwrap().into_iter().collect();
                json!({ "roleid": r, "privs": privs.join(","), "special": 1 })
            })
            .collect();
        for (r, privs) in &self.roles {
            let privs: Vec<&str> = privs.iter().map(String::as_str).collect();
            out.push(json!({ "roleid": r, "privs": privs.join(","), "special": 0 }));
        }
        Ok(Value::Array(out))
    }

    pub(super) fn parse_privs(p: &Params) -> Result<BTreeSet<String>, Fail> {
        let all = all_privileges();
        let mut out = BTreeSet::new();
        for privilege in p
            .get("privs")
            .map(String::as_str)
            .unwrap_or("")
            .split([',', ';', ' '])
            .filter(|s| !s.is_empty())
        {
            if !all.iter().any(|a| a == privilege) {
                return fail(500, format!("invalid privilege '{privilege}'"));
            }
            out.insert(privilege.to_string());
        }
        Ok(out)
    }

    pub(super) fn create_role(&mut self, caller: &Caller, p: &Params) -> Result<Value, Fail> {
        caller.require("/access", "Sys.Modify")?;
        let roleid = &p["roleid"];
        if self.role_privileges(roleid).is_some() {
            return fail(500, format!("role '{roleid}' already exists"));
        }
        let privs = Self::parse_privs(p)?;
        self.roles.insert(roleid.clone(), privs);
        Ok(Value::Null)
    }

    pub(super) fn update_role(
        &mut self,
        caller: &Caller,
        roleid: &str,
        p: &Params,
    ) -> Result<Value, Fail> {
        caller.require("/access", "Sys.Modify")?;
        let privs = Self::parse_privs(p)?;
        let append = p.get("append").and_then(|v| parse_bool(v)) == Some(true);
        let Some(role) = self.roles.get_mut(roleid) else {
            return fail(500, format!("role '{roleid}' does not exist"));
        };
        if !append {
            role.clear();
        }
        role.extend(privs);
        Ok(Value::Null)
    }
}

pub(super) fn token_info(token: &FakeToken) -> Value {
    let mut info = json!({ "privsep": u8::from(token.privsep), "expire": 0 });
    if let Some(c) = &token.comment {
        info["comment"] = json!(c);
    }
    info
}

/// A random-looking UUID (v4 layout) for token secrets.
pub(super) fn fake_uuid(n: u64) -> String {
    let mut h = DefaultHasher::new();
    (n, SystemTime::now()).hash(&mut h);
    let a = h.finish();
    a.hash(&mut h);
    let b = h.finish();
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}
