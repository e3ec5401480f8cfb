//! Test support for the Proxmox VE backend: a checker for the PVE 9.1 API schema and a fake PVE
//! API server that runs every request through it (see README.md). Include with
//! `#[path = "pve/mod.rs"] mod pve;`.
//!
//! - `schema.rs`: the checker; `syntax.rs`: the value syntaxes it knows (numbers, booleans,
//!   formats, token headers, Perl patterns).
//! - `server.rs`: the fake's HTTP side and its API for tests ([`FakePve`]).
//! - `model.rs`: options and the data tests inspect ([`FakeOptions`], [`FakeVm`], …).
//! - `state.rs`: the fake's state, callers and privileges, and the router.
//! - the handlers: `cluster.rs` (next VMID, resources, nodes), `qemu.rs` (VMs: list, clone,
//!   config, resize, power, status, destroy), `create.rs` (VM creation, SPICE proxy),
//!   `snapshots.rs` (snapshots, templates), `agent.rs` (guest agent), `storage.rs` (storages,
//!   content, uploads and their multipart parser), `tasks.rs` (tasks), `access.rs` (pools,
//!   users, tokens, roles and ACLs).
//! - `guest.rs`: what a guest holds (files, agent-reported addresses, processes run on this
//!   host) and base64.
//! - `http.rs`: URL encoding and a tiny HTTP client ([`raw_call`], [`raw_call_multipart`]).

#![allow(dead_code, unused_imports)]

mod access;
mod agent;
mod cluster;
mod create;
pub mod guest;
pub mod http;
pub mod model;
mod qemu;
pub mod schema;
pub mod server;
mod snapshots;
mod state;
mod storage;
pub mod syntax;
mod tasks;

pub use guest::{base64_decode, base64_encode, host_key_line};
pub use http::{raw_call, raw_call_multipart};
pub use model::{
    DEFAULT_TOKEN_ID, DEFAULT_TOKEN_SECRET, FakeAcl, FakeNode, FakeOptions, FakePool, FakeSnapshot,
    FakeStorage, FakeTask, FakeToken, FakeUser, FakeVm, Recorded, all_privileges,
};
pub use schema::Schema;
pub use server::FakePve;
pub use syntax::{TokenAuth, parse_token_header, token_header};
