//! A service never fails silently: when one of its long-running tasks
//! cannot go on, the process says why, reports `NOT_SERVING` and exits
//! non-zero, so that its supervisor (systemd, Kubernetes) restarts it.
//!
//! The service runs as its real binary; its dependency is taken away for
//! good by dropping its database, which no retry can cure.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use e2e::{DEADLINE, NOT_SERVING, binary, brokers, create_database, free_addr, unique_id};
use sqlx::{Connection, PgConnection};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_whose_database_is_gone_for_good_exits_non_zero() {
    let id = unique_id();
    let database = format!("t_{id}_payments");
    let url = create_database(database.clone()).await;
    let grpc = free_addr();
    let log_path = std::env::temp_dir().join(format!("shop-supervision-{id}.log"));
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new(binary("payment"))
        .env("GRPC_ADDR", grpc.to_string())
        .env("DATABASE_URL", &url)
        .env("KAFKA_BROKERS", brokers())
        .env("KAFKA_TOPIC_PREFIX", format!("t{id}."))
        .env("KAFKA_GROUP_ID", format!("t{id}-payment"))
        .env("KAFKA_PARTITIONS", "3")
        .env("HEALTH_CHECK_INTERVAL_MS", "200")
        .env("OUTBOX_POLL_INTERVAL_MS", "50")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start the payment binary");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    e2e::wait_serving(grpc, "").await;

    let mut admin = PgConnection::connect(&e2e::admin_url())
        .await
        .expect("admin connection");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE \"{database}\" WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .expect("drop the service's database");

    e2e::eventually("NOT_SERVING once the database is gone", || async {
        (e2e::health(grpc, "").await == Some(NOT_SERVING)).then_some(())
    })
    .await;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!(
                "the service still runs {DEADLINE:?} after its database was dropped:\n{}",
                log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = log();
    assert_eq!(status.code(), Some(1), "exit status {status}; log:\n{log}");
    assert!(
        log.contains("outbox relay") && log.contains("does not exist"),
        "the log names the task and the cause:\n{log}"
    );
    assert!(
        log.contains("exiting non-zero"),
        "the log says the process exits on a failure:\n{log}"
    );
    let _ = std::fs::remove_file(&log_path);
}
