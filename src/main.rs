fn main() {
    std::process::exit(agentvm::cli::main());
}
