//! `inventory` binary: configuration from the environment (see README.md),
//! runs until SIGTERM or Ctrl-C.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::telemetry::init();
    let config = inventory::Config::from_env()?;
    let shutdown = common::shutdown::on_signal();
    inventory::Application::build(config, shutdown)
        .await?
        .run()
        .await;
    Ok(())
}
