//! Tasks (UPIDs): how the fake starts them, reports their status and serves their log.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::model::FakeTask;
use super::state::{Caller, Fail, Params, State, fail, fail_param};
use super::syntax::parse_bool;

impl State {
    /// Creates a task; unless [`FakeOptions::fail_task`] names its type, `work` runs now and its
    /// error (if any) becomes the task's exit status, as a failing PVE worker's would.
    pub(super) fn start_task(
        &mut self,
        kind: &str,
        id: &str,
        user: &str,
        work: impl FnOnce(&mut State) -> Result<Vec<String>, String>,
    ) -> String {
        let n = self.next_counter();
        let now = unix_now();
        let upid = format!(
            "UPID:{}:{:08X}:{:08X}:{:08X}:{kind}:{id}:{user}:",
            self.here,
            0x1000 + n,
            0x0010_0000 + n * 100,
            now
        );
        let mut log = Vec::new();
        let exitstatus = match &self.opts.fail_task {
            Some((k, status)) if k == kind => {
                log.push(status.clone());
                status.clone()
            }
            _ => match work(self) {
                Ok(lines) => {
                    log.extend(lines);
                    "OK".to_string()
                }
                Err(e) => {
                    log.push(e.clone());
                    e
                }
            },
        };
        let task = FakeTask {
            upid: upid.clone(),
            kind: kind.to_string(),
            id: id.to_string(),
            user: user.to_string(),
            exitstatus,
            log,
            polls: 0,
            lock_vmid: None,
            finished: false,
        };
        self.tasks.insert(upid.clone(), task);
        upid
    }

    /// A task of the node of the request (pve-manager reads it from that node's task folder).
    pub(super) fn task(&self, upid: &str) -> Result<&FakeTask, Fail> {
        if !upid.starts_with("UPID:") {
            return fail_param("upid", "unable to parse worker upid");
        }
        match self.tasks.get(upid) {
            Some(task) if upid.split(':').nth(1) == Some(self.here.as_str()) => Ok(task),
            _ => fail_param("upid", "no such task"),
        }
    }

    pub(super) fn task_status(&mut self, caller: &Caller, upid: &str) -> Result<Value, Fail> {
        let task = self.task(upid)?;
        if task.user != caller.token {
            caller.require(&format!("/nodes/{}", self.here), "Sys.Audit")?;
        }
        let task = self.tasks.get_mut(upid).unwrap();
        task.polls += 1;
        let running = task.running(self.opts.task_polls);
        let mut r = task_json(task);
        r["status"] = json!(if running { "running" } else { "stopped" });
        if !running {
            r["exitstatus"] = json!(task.exitstatus);
            self.release_lock(upid);
        }
        Ok(r)
    }

    /// Ends a task now, as if it had been polled to its end, e.g. while its UPID was lost.
    pub(super) fn finish_task(&mut self, upid: &str) {
        if let Some(task) = self.tasks.get_mut(upid) {
            task.finished = true;
        }
        self.release_lock(upid);
    }

    /// Unlocks the VM a stopped task held locked.
    fn release_lock(&mut self, upid: &str) {
        if let Some(vmid) = self.tasks.get_mut(upid).and_then(|t| t.lock_vmid.take())
            && let Some(vm) = self.vms.get_mut(&vmid)
        {
            vm.config.remove("lock");
        }
    }

    /// `GET /nodes/{node}/tasks`: the caller's tasks (everyone's with `Sys.Audit`), newest first.
    /// `source` `archive` (the default) lists stopped tasks, `active` running ones, `all` both.
    pub(super) fn list_tasks(&self, caller: &Caller, p: &Params) -> Result<Value, Fail> {
        let audit = caller.has("Sys.Audit");
        let source = p.get("source").map_or("archive", String::as_str);
        let errors_only = p.get("errors").and_then(|v| parse_bool(v)) == Some(true);
        let start: usize = p.get("start").and_then(|s| s.parse().ok()).unwrap_or(0);
        let limit: usize = p.get("limit").and_then(|s| s.parse().ok()).unwrap_or(50);
        let mut tasks: Vec<&FakeTask> = self
            .tasks
            .values()
            .filter(|t| {
                let running = t.running(self.opts.task_polls);
                (audit || t.user == caller.token)
                    && t.upid.split(':').nth(1) == Some(self.here.as_str())
                    && match source {
                        "active" => running,
                        "all" => true,
                        _ => !running,
                    }
                    && p.get("vmid").is_none_or(|v| *v == t.id)
                    && p.get("typefilter").is_none_or(|k| *k == t.kind)
                    && p.get("userfilter")
                        .is_none_or(|u| t.user.contains(u.as_str()))
                    && (!errors_only || (!running && t.exitstatus != "OK"))
            })
            .collect();
        tasks.sort_by_key(|t| std::cmp::Reverse(upid_hex(&t.upid, 2)));
        let list = tasks
            .into_iter()
            .skip(start)
            .take(limit)
            .map(|t| {
                let mut r = task_json(t);
                if !t.running(self.opts.task_polls) {
                    r["status"] = json!(t.exitstatus);
                    r["endtime"] = r["starttime"].clone();
                }
                r
            })
            .collect();
        Ok(Value::Array(list))
    }

    pub(super) fn task_log(&self, caller: &Caller, upid: &str, p: &Params) -> Result<Value, Fail> {
        let task = self.task(upid)?;
        if task.user != caller.token {
            caller.require(&format!("/nodes/{}", self.here), "Sys.Audit")?;
        }
        let mut lines = task.log.clone();
        if !task.running(self.opts.task_polls) {
            lines.push(if task.exitstatus == "OK" {
                "TASK OK".to_string()
            } else {
                format!("TASK ERROR: {}", task.exitstatus)
            });
        }
        let start: usize = p.get("start").and_then(|s| s.parse().ok()).unwrap_or(0);
        let limit: usize = p.get("limit").and_then(|s| s.parse().ok()).unwrap_or(50);
        let out: Vec<Value> = lines
            .iter()
            .enumerate()
            .skip(start)
            .take(limit)
            .map(|(i, t)| json!({ "n": i + 1, "t": t }))
            .collect();
        Ok(Value::Array(out))
    }
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What PVE reports of every task: the fields of its UPID.
fn task_json(task: &FakeTask) -> Value {
    let upid = &task.upid;
    json!({
        "upid": upid,
        "node": upid.split(':').nth(1),
        "pid": upid_hex(upid, 2),
        "pstart": upid_hex(upid, 3),
        "starttime": upid_hex(upid, 4),
        "type": task.kind,
        "id": task.id,
        "user": task.user,
    })
}

/// Field `i` of a UPID, a hex number (`pid`, `pstart`, `starttime`).
fn upid_hex(upid: &str, i: usize) -> i64 {
    upid.split(':')
        .nth(i)
        .and_then(|f| i64::from_str_radix(f, 16).ok())
        .unwrap_or(0)
}
