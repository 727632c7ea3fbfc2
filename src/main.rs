//! The `retail-agent` binary: parses the command line and runs a command.

fn main() -> std::process::ExitCode {
    retail_agent::cli::main()
}
