//! Fail-points for crash-safety tests: when `AGENTVM_FAILPOINT` names a step,
//! the process kills itself with SIGKILL on reaching it, exactly as an
//! outside `kill -9` at that moment would.

use crate::paths::{ENV_FAILPOINT, non_empty_env};

/// The steps of `up` a fail-point can name, in order.
pub const UP_STEPS: &[&str] = &[
    "up:image-imported",
    "up:disk-created",
    "up:defined",
    "up:started",
];
/// The steps of `destroy` a fail-point can name, in order.
pub const DESTROY_STEPS: &[&str] = &["destroy:stopped", "destroy:undefined"];

pub fn hit(step: &str) {
    if non_empty_env(ENV_FAILPOINT).as_deref() == Some(step) {
        tracing::error!("fail-point {step}: killing this process");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
