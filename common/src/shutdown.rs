//! Shutdown as a value: one `CancellationToken` cancelled on SIGTERM or
//! Ctrl-C, passed to every task, which stops taking new work, finishes what
//! it holds, commits and returns.

use tokio_util::sync::CancellationToken;

/// Returns a token cancelled by the first SIGTERM or SIGINT. The handlers
/// are installed before this returns, so a failure to install them is a
/// start-up error rather than a panic in a background task.
pub fn on_signal() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let cancel = token.clone();
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown signal received; finishing in-flight work");
        cancel.cancel();
    });
    Ok(token)
}
