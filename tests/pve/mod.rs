//! Test support for the Proxmox VE backend: a checker for the PVE 9.1 API schema and a fake PVE
//! API server that runs every request through it (see README.md). Include with
//! `#[path = "pve/mod.rs"] mod pve;`.
//!
//! - `schema.rs`: the checker; `syntax.rs`: the value syntaxes it knows (numbers, booleans,
//!   formats, token headers, Perl patterns).
//! - `server.rs`: the fake's HTTP side and its API for tests ([`FakePve`]).
//! - `model.rs`: options and the data tests inspect ([`FakeOptions`], [`FakeVm`], …).
//! - `state.rs`: the fake's state, callers and privileges, and the router.
//! - `qemu.rs`, `tasks.rs`, `access.rs`: the handlers (cluster and VMs; tasks; pools, users,
//!   tokens, roles and ACLs).
//! - `http.rs`: URL encoding and a tiny HTTP client ([`raw_call`]).

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
