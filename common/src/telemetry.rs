//! Logging with `tracing`: human-readable by default, JSON lines with
//! `LOG_FORMAT=json` (production, log shippers). Filter with `RUST_LOG`.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Installs the global subscriber once; later calls (tests) are no-ops.
pub fn init() {
    let filter = filter();
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = if json {
        registry
            .with(fmt::layer().json().flatten_event(true))
            .try_init()
    } else {
        // Colours only for a terminal, not for log files.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
        registry.with(fmt::layer().with_ansi(ansi)).try_init()
    };
}

/// For tests: logs go through the test harness's capture, so they show
/// only for failing tests. `RUST_LOG` still filters.
pub fn init_for_tests() {
    let _ = tracing_subscriber::registry()
        .with(filter())
        .with(fmt::layer().with_test_writer().with_ansi(false))
        .try_init();
}

/// `RUST_LOG`, or info with the chattiest dependencies at warn.
fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,rdkafka=warn,h2=warn,tower=warn"))
}
