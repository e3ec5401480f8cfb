//! Log output of both executables: `AGENTVM_LOG` (an `EnvFilter`) or `default`.

pub fn init(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AGENTVM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
