//! `payment` binary: configuration from the environment (see the crate
//! docs), runs until SIGTERM or Ctrl-C.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::telemetry::init();
    let config = payment::Config::from_env()?;
    let shutdown = common::shutdown::on_signal();
    payment::Application::build(config, shutdown)
        .await?
        .run()
        .await;
    Ok(())
}
