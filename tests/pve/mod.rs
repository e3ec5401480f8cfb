//! Test support for the Proxmox VE backend: a checker for the PVE 9.1 API schema and a fake PVE
//! API server that runs every request through it. Include with
//! `#[path = "pve/mod.rs"] mod pve;`.

#![allow(dead_code, unused_imports)]

pub mod schema;
pub mod server;

pub use schema::{Schema, TokenAuth, parse_token_header, token_header};
pub use server::{
    DEFAULT_TOKEN_ID, DEFAULT_TOKEN_SECRET, FakeAcl, FakeOptions, FakePool, FakePve, FakeTask,
    FakeToken, FakeUser, FakeVm, Recorded, all_privileges, raw_call,
};
