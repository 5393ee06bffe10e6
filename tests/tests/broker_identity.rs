//! A database never silently pairs with a broker that forgot its events.
//!
//! The scenario found by hand: databases that already hold orders are
//! started against an empty broker (another cluster). The services must
//! refuse (`NOT_SERVING`, the API saying why) instead of running on, until an
//! operator accepts the new cluster; after that the outbox rows still kept
//! are republished there, consumers drop what they applied already, new
//! orders go through, and the invariant checker holds on the new cluster.
//!
//! The second broker is a real Kafka started by `deploy/local/kafka.sh` in
//! a state directory and on ports of its own.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use e2e::{NOT_SERVING, Options, Pipeline, eventually, free_addr, order_request};
use shop_proto::order::{GetOrderRequest, OrderStatus};
use tonic::Code;

/// A second, empty Kafka cluster, stopped and removed on drop.
struct SecondBroker {
    state: PathBuf,
    port: u16,
    controller_port: u16,
}

impl SecondBroker {
    fn start() -> Self {
        let broker = Self {
            state: std::env::temp_dir().join(format!("shop-second-broker-{}", e2e::unique_id())),
            port: free_addr().port(),
            controller_port: free_addr().port(),
        };
        broker.script("start");
        broker
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn script(&self, action: &str) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/kafka.sh");
        let out = Command::new(&script)
            .arg(action)
            .env("SHOP_STATE_DIR", &self.state)
            .env("KAFKA_PORT", self.port.to_string())
            .env("KAFKA_CONTROLLER_PORT", self.controller_port.to_string())
            .env_remove("KAFKA_BROKERS")
            .output()
            .expect("run kafka.sh");
        assert!(
            out.status.success(),
            "kafka.sh {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for SecondBroker {
    fn drop(&mut self) {
        self.script("stop");
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn services_refuse_another_kafka_cluster_until_an_operator_accepts_it() {
    // The databases' first life, on the shared broker.
    let first = Pipeline::start().await;
    let before = first.create(order_request("CUST-MOVE", "PROD001", 1)).await;
    assert_eq!(
        first.final_order(&before.order_id).await.status,
        OrderStatus::Confirmed as i32
    );
    let id = first.id.clone();
    first.stop().await;

    // The same databases against an empty broker: refused.
    let broker = SecondBroker::start();
    let p = Pipeline::start_with(Options {
        reuse: Some(id),
        brokers: Some(broker.address()),
        wait_serving: false,
        ..Options::default()
    })
    .await;
    let refusal = eventually("the order API to say why it refuses", || async {
        let mut client = p.orders().await;
        let status = client
            .get_order(GetOrderRequest {
                order_id: before.order_id.clone(),
            })
            .await
            .err()?;
        (status.code() == Code::Unavailable && status.message().contains("Kafka cluster"))
            .then_some(status)
    })
    .await;
    assert!(
        refusal.message().contains("shopctl broker accept"),
        "the refusal says what to do: {}",
        refusal.message()
    );
    for addr in [p.order_grpc, p.payment_grpc, p.inventory_grpc] {
        assert_eq!(e2e::health(addr, "").await, Some(NOT_SERVING), "{addr}");
    }
    // Refusing means no relay and no consumer ran: nothing reached the new
    // cluster, and the order is still what it was.
    assert!(p.records("orders").is_empty(), "nothing published");
    let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE order_id = $1::uuid")
        .bind(&before.order_id)
        .fetch_one(&p.orders_db)
        .await
        .unwrap();
    assert_eq!(status, "CONFIRMED");

    // The operator accepts the new cluster.
    let dbs = shopctl::broker::services(
        p.orders_db.clone(),
        p.payments_db.clone(),
        p.inventory_db.clone(),
        ["order", "payment", "inventory"].map(|s| format!("t{}-{s}", p.id)),
    );
    let accepted = shopctl::broker::accept(&p.kafka(), &dbs)
        .await
        .expect("accept");
    let republished: u64 = accepted.iter().map(|a| a.accepted.republished).sum();
    // OrderCreated, PaymentCompleted, InventoryUpdated, OrderConfirmed.
    assert_eq!(republished, 4, "{accepted:?}");
    assert!(accepted.iter().all(|a| a.accepted.previous.is_some()));

    for addr in [p.order_grpc, p.payment_grpc, p.inventory_grpc] {
        p.wait_serving(addr).await;
    }
    let after = p.create(order_request("CUST-MOVE", "PROD002", 1)).await;
    assert_eq!(
        p.final_order(&after.order_id).await.status,
        OrderStatus::Confirmed as i32
    );
    let report = eventually("the invariants to hold on the new cluster", || async {
        let report = shopctl::invariants::check(&p.invariant_sources())
            .await
            .expect("checker runs");
        report.ok().then_some(report)
    })
    .await;
    assert_eq!(report.figures.orders, 2);
    assert!(
        report.figures.duplicates_suppressed >= 1,
        "republished events were recognised and dropped: {:?}",
        report.figures
    );
    p.stop().await;
    drop(broker);
}
