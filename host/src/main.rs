fn main() -> std::process::ExitCode {
    vlmhost::cli::main()
}
