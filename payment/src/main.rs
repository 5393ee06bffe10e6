//! `payment` binary: configuration from the environment (see README.md),
//! runs until SIGTERM or Ctrl-C; exits non-zero if a task of the service
//! dies (see `common::service::main`).

/// mimalloc rather than glibc's malloc: the services allocate and free many
/// small buffers per request and per event from several threads, and glibc's
/// malloc and free were about half of order's CPU samples at saturation
/// (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    common::service::main("payment", payment::Config::from_env, payment::build).await
}
