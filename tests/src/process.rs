//! A service run as its real binary, for tests that need what only a
//! process has: its exit status, its own tracer (`service.name`), signals.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::{DEADLINE, binary, brokers, free_addr};

/// One service process; killed when dropped.
pub struct ServiceProcess {
    child: Child,
    log: PathBuf,
    /// Its gRPC address.
    pub grpc: SocketAddr,
    /// Its REST address (order only).
    pub http: SocketAddr,
    /// Its Prometheus endpoint.
    pub metrics: SocketAddr,
    service: String,
}

impl ServiceProcess {
    /// Starts `service` (`order`, `payment`, `inventory`) on `database_url`,
    /// with test `id`'s topics and groups on the shared broker, fast health
    /// checks and relay polls, plus `env`.
    #[must_use]
    pub fn start(service: &str, id: &str, database_url: &str, env: &[(&str, String)]) -> Self {
        let (grpc, http, metrics) = (free_addr(), free_addr(), free_addr());
        let log = std::env::temp_dir().join(format!("shop-{service}-{id}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(binary(service))
            .env("GRPC_ADDR", grpc.to_string())
            .env("HTTP_ADDR", http.to_string())
            .env("METRICS_ADDR", metrics.to_string())
            .env("DATABASE_URL", database_url)
            .env("KAFKA_BROKERS", brokers())
            .env("KAFKA_TOPIC_PREFIX", format!("t{id}."))
            .env("KAFKA_GROUP_ID", format!("t{id}-{service}"))
            .env("KAFKA_PARTITIONS", "3")
            .env("HEALTH_CHECK_INTERVAL_MS", "200")
            .env("OUTBOX_POLL_INTERVAL_MS", "50")
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {service}: {e}"));
        Self {
            child,
            log,
            grpc,
            http,
            metrics,
            service: service.to_owned(),
        }
    }

    /// Its addresses, to keep while the process itself is borrowed
    /// mutably.
    #[must_use]
    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            grpc: self.grpc,
            http: self.http,
            metrics: self.metrics,
        }
    }

    /// Fails the test, with its log, if it exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!("{} exited ({status}); log:\n{}", self.service, self.log());
        }
    }

    /// Everything it logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (up to [`DEADLINE`]) for it to exit by itself.
    pub async fn exit_status(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "still running after {DEADLINE:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then waits for it to exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.exit_status().await
    }
}

/// Where a [`ServiceProcess`] listens.
#[derive(Clone, Copy, Debug)]
pub struct Endpoints {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub metrics: SocketAddr,
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}
