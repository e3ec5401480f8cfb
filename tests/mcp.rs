//! `agentvm mcp` driven as an MCP client would, with raw JSON-RPC lines on its
//! stdin/stdout: against the real test guest, and against the fake Proxmox.

mod common;
#[path = "lab/mod.rs"]
mod lab;
#[path = "pve/mod.rs"]
mod pve;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};

use common::{Env, GUEST_TIMEOUT};
use lab::{Lab, REMOTE};
use pve::FakeOptions;
use serde_json::{Value, json};

/// An `agentvm mcp` child, initialized.
struct Mcp {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    next_id: u64,
}

impl Mcp {
    fn start(env: &Env) -> Self {
        let mut child = env
            .command(&["mcp"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting agentvm mcp");
        let mut mcp = Mcp {
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
            next_id: 1,
        };
        let init = mcp.request(
            "initialize",
            json!({
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "agentvm-tests", "version": "0"},
            }),
        );
        assert_eq!(init["result"]["serverInfo"]["name"], "agentvm", "{init}");
        mcp.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        mcp
    }

    fn send(&mut self, message: &Value) {
        writeln!(self.stdin, "{message}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Sends a request; its response (notifications in between are skipped).
    fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).unwrap();
            assert!(
                n > 0,
                "agentvm mcp closed stdout while {method} was pending"
            );
            let message: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not JSON on stdout ({e}): {line}"));
            if message["id"] == id {
                return message;
            }
        }
    }

    /// Calls a tool: (is_error, the text of its result).
    fn call(&mut self, tool: &str, arguments: Value) -> (bool, String) {
        let reply = self.request("tools/call", json!({"name": tool, "arguments": arguments}));
        let result = &reply["result"];
        assert!(result.is_object(), "{tool}: {reply}");
        let text = result["content"][0]["text"]
            .as_str()
            .unwrap_or_else(|| panic!("{tool}: no text content: {reply}"))
            .to_string();
        (result["isError"] == true, text)
    }

    /// Calls a tool that must succeed; its JSON result.
    fn ok(&mut self, tool: &str, arguments: Value) -> Value {
        let (is_error, text) = self.call(tool, arguments);
        assert!(!is_error, "{tool} failed: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{tool}: not JSON ({e}): {text}"))
    }
}

impl Drop for Mcp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn mcp_tools_list_exec_and_files_on_a_local_guest() {
    let env = Env::new();
    let name = "g-mcp-tools";
    env.write_fleet(&format!("[vms.{name}]\n"));
    env.owns(&[name]);
    env.ok(&["up", name, "--timeout", GUEST_TIMEOUT]);

    let mut mcp = Mcp::start(&env);
    let tools = mcp.request("tools/list", json!({}));
    let tools = tools["result"]["tools"]
        .as_array()
        .expect("a tool list")
        .clone();
    let mut names: Vec<&str> = tools.iter().filter_map(|t| t["name"].as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "down",
            "exec",
            "fork",
            "list",
            "read_file",
            "snapshot",
            "status",
            "up",
            "write_file"
        ]
    );
    let exec = tools.iter().find(|t| t["name"] == "exec").unwrap();
    assert_eq!(
        exec["inputSchema"]["properties"]["command"]["type"], "array",
        "{exec}"
    );
    assert_eq!(
        exec["inputSchema"]["properties"]["command"]["items"]["type"], "string",
        "{exec}"
    );

    // list: the same rows as `list --json`.
    let listed = mcp.ok("list", json!({}));
    let row = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed: {listed}"));
    assert_eq!(row["state"], "running", "{row}");
    assert_eq!(mcp.ok("status", json!({"name": name}))["state"], "running");

    let out = mcp.ok(
        "exec",
        json!({"name": name, "command": ["/bin/sh", "-c", "echo hi; echo oops >&2; exit 3"]}),
    );
    assert_eq!(out["stdout"], "hi\n", "{out}");
    assert_eq!(out["stderr"], "oops\n", "{out}");
    assert_eq!(out["exit_code"], 3, "{out}");

    // A round trip of UTF-8 text with a newline, and the mode it was given.
    let text = "héllo from mcp ✓\nsecond line\n";
    let written = mcp.ok(
        "write_file",
        json!({"name": name, "path": "/root/mcp-note.txt", "content": text, "mode": "640"}),
    );
    assert_eq!(written["bytes"], text.len(), "{written}");
    let read = mcp.ok(
        "read_file",
        json!({"name": name, "path": "/root/mcp-note.txt"}),
    );
    assert_eq!(read["encoding"], "utf-8", "{read}");
    assert_eq!(read["content"], text, "{read}");
    let mode = mcp.ok(
        "exec",
        json!({"name": name, "command": ["/bin/sh", "-c", "stat -c %a /root/mcp-note.txt"]}),
    );
    assert_eq!(mode["stdout"], "640\n", "{mode}");

    // Bytes that are not UTF-8 come back as base64, and say so.
    mcp.ok(
        "write_file",
        json!({"name": name, "path": "/root/mcp-bin", "content": "/wAB", "encoding": "base64"}),
    );
    let read = mcp.ok("read_file", json!({"name": name, "path": "/root/mcp-bin"}));
    assert_eq!(read["encoding"], "base64", "{read}");
    assert_eq!(read["content"], "/wAB", "{read}");

    // fork: a running copy that has the file written above.
    let fork_name = "g-mcp-fork";
    env.owns(&[fork_name]);
    let forked = mcp.ok(
        "fork",
        json!({"source": name, "new": [fork_name], "timeout_secs": 240}),
    );
    assert_eq!(forked["source"], name, "{forked}");
    assert_eq!(forked["forks"][0]["name"], fork_name, "{forked}");
    assert!(
        forked["forks"][0]["ssh_ready_seconds"].is_number(),
        "{forked}"
    );
    let copy = mcp.ok(
        "read_file",
        json!({"name": fork_name, "path": "/root/mcp-note.txt"}),
    );
    assert_eq!(copy["content"], text, "{copy}");
    let (is_error, message) = mcp.call("fork", json!({"source": name, "new": []}));
    assert!(is_error && message.contains("at least one"), "{message}");
    // The source cannot go while its fork sits on its disk: the fork goes first.
    env.ok(&["destroy", "--yes", fork_name]);

    // A missing file is a tool error naming the path.
    let (is_error, message) = mcp.call(
        "read_file",
        json!({"name": name, "path": "/root/no-such-file"}),
    );
    assert!(is_error, "{message}");
    assert!(message.contains("/root/no-such-file"), "{message}");

    // An unknown VM: a tool error with the CLI's message.
    let cli = env.fails(&["status", "g-mcp-nowhere"]);
    let (is_error, message) = mcp.call("status", json!({"name": "g-mcp-nowhere"}));
    assert!(is_error, "{message}");
    assert!(
        message.contains("no VM named \"g-mcp-nowhere\" in agentvm.toml or on any backend"),
        "{message}"
    );
    assert!(cli.contains(&message), "CLI: {cli}; MCP: {message}");
}

#[test]
fn mcp_reads_and_writes_guest_files_on_proxmox() {
    let lab = Lab::new(
        FakeOptions {
            agent_down_calls: 0,
            ..FakeOptions::default()
        },
        REMOTE,
    );
    lab.create_pool();
    lab.env.ok(&["up", "remote", "--no-wait"]);
    let (vmid, _) = lab.vm("remote");
    let mut mcp = Mcp::start(&lab.env);

    let read = mcp.ok(
        "read_file",
        json!({"name": "remote", "path": "/etc/ssh/ssh_host_ed25519_key.pub"}),
    );
    assert_eq!(read["encoding"], "utf-8", "{read}");
    assert_eq!(
        read["content"],
        format!("{}\n", pve::host_key_line(vmid, "remote")),
        "{read}"
    );

    let text = "written through MCP ✓\nline two\n";
    mcp.ok(
        "write_file",
        json!({"name": "remote", "path": "/root/note.txt", "content": text}),
    );
    assert_eq!(
        lab.fake.guest_file(vmid, "/root/note.txt").as_deref(),
        Some(text.as_bytes())
    );
    let read = mcp.ok(
        "read_file",
        json!({"name": "remote", "path": "/root/note.txt"}),
    );
    assert_eq!(read["content"], text, "{read}");

    // Bytes beyond one file-write are refused before anything is sent.
    let big = "x".repeat(46081);
    let (is_error, message) = mcp.call(
        "write_file",
        json!({"name": "remote", "path": "/root/big.txt", "content": big}),
    );
    assert!(is_error, "{message}");
    assert!(message.contains("at most 46080 bytes"), "{message}");
    assert!(lab.fake.guest_file(vmid, "/root/big.txt").is_none());

    let (is_error, message) = mcp.call(
        "read_file",
        json!({"name": "remote", "path": "/root/absent"}),
    );
    assert!(is_error, "{message}");
    assert!(message.contains("/root/absent"), "{message}");

    lab.no_violations();
}
