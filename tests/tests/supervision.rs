//! A service never fails silently: when one of its long-running tasks
//! cannot go on, the process says why, reports `NOT_SERVING` and exits
//! non-zero, so that its supervisor (systemd, Kubernetes) restarts it.
//!
//! The service runs as its real binary; its dependency is taken away for
//! good by dropping its database, which no retry can cure.

use e2e::{NOT_SERVING, create_database, process::ServiceProcess, unique_id};
use sqlx::{Connection, PgConnection};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_whose_database_is_gone_for_good_exits_non_zero() {
    let id = unique_id();
    let database = format!("t_{id}_payments");
    let url = create_database(database.clone()).await;
    let mut payment = ServiceProcess::start("payment", &id, &url, &[]);
    e2e::wait_serving(payment.grpc, "").await;

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
        (e2e::health(payment.grpc, "").await == Some(NOT_SERVING)).then_some(())
    })
    .await;
    let status = payment.exit_status().await;
    let log = payment.log();
    assert_eq!(status.code(), Some(1), "exit status {status}; log:\n{log}");
    assert!(
        log.contains("outbox relay") && log.contains("does not exist"),
        "the log names the task and the cause:\n{log}"
    );
    assert!(
        log.contains("exiting non-zero"),
        "the log says the process exits on a failure:\n{log}"
    );
}
