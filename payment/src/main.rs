//! `payment` binary: configuration from the environment (see README.md),
//! runs until SIGTERM or Ctrl-C; exits non-zero if a task of the service
//! dies (see `common::service::main`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    common::service::main("payment", payment::Config::from_env, payment::build).await
}
