//! The `agentvm-daemon` executable: the only one that talks to libvirt. The
//! `agentvm` CLI starts it on demand (and `agentvm daemon` runs it), so the
//! CLI itself loads no libvirt and starts in a millisecond or two.

fn main() {
    std::process::exit(agentvm::daemon::entry::main());
}
