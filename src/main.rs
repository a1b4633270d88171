//! The `lorastream` binary: a thin shell over [`lorastream::cli`].

fn main() -> std::process::ExitCode {
    lorastream::cli::main()
}
