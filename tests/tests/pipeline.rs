//! The order pipeline end to end: real Kafka, real PostgreSQL, the three
//! services in-process on loopback ports.

use std::time::Duration;

use e2e::{Pipeline, eventually, order_request};
use prost::Message as _;
use rdkafka::{
    ClientConfig, Message,
    consumer::{Consumer, StreamConsumer},
};
use shop_proto::{
    common::Money,
    events,
    inventory::{GetStockRequest, SetStockRequest},
    order::{CreateOrderRequest, GetOrderRequest, LineItem, OrderStatus},
    payment::{GetAccountRequest, GetPaymentRequest, PaymentStatus, SetCreditLimitRequest},
};
use tonic::Code;

async fn available(p: &Pipeline, product: &str) -> i64 {
    p.inventory()
        .await
        .get_stock(GetStockRequest {
            product_id: product.into(),
        })
        .await
        .expect("GetStock")
        .into_inner()
        .available
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_order_is_confirmed_paid_and_reserved() {
    let p = Pipeline::start().await;
    let before = available(&p, "PROD001").await;
    let request = CreateOrderRequest {
        customer_id: "CUST001".into(),
        items: vec![
            LineItem {
                product_id: "PROD001".into(),
                quantity: 2,
            },
            LineItem {
                product_id: "PROD002".into(),
                quantity: 1,
            },
        ],
        ..Default::default()
    };
    let created = p
        .orders()
        .await
        .create_order(request)
        .await
        .expect("CreateOrder")
        .into_inner();
    assert_eq!(created.status, OrderStatus::Pending as i32);
    assert_eq!(created.customer_id, "CUST001");
    // Prices come from the catalog fixture: PROD001 24.99, PROD002 89.99.
    assert_eq!(
        created.total,
        Some(Money {
            currency: "USD".into(),
            units: 2 * 2499 + 8999
        })
    );
    assert_eq!(
        created.items[0].line_total.as_ref().unwrap().units,
        2 * 2499
    );

    let done = p.final_order(&created.order_id).await;
    assert_eq!(
        done.status,
        OrderStatus::Confirmed as i32,
        "reason: {}",
        done.reason
    );
    assert!(done.reason.is_empty());

    let payment = p
        .payments()
        .await
        .get_payment(GetPaymentRequest {
            order_id: created.order_id.clone(),
        })
        .await
        .expect("GetPayment")
        .into_inner();
    assert_eq!(payment.status, PaymentStatus::Approved as i32);
    assert_eq!(payment.amount, created.total);
    let account = p
        .payments()
        .await
        .get_account(GetAccountRequest {
            customer_id: "CUST001".into(),
        })
        .await
        .expect("GetAccount")
        .into_inner();
    assert_eq!(account.used.unwrap().units, 2 * 2499 + 8999);
    assert_eq!(available(&p, "PROD001").await, before - 2);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_order_like_the_original_system_is_confirmed() {
    let p = Pipeline::start().await;
    let http = reqwest::Client::new();
    let response = http
        .post(p.rest_url("/api/v1/orders"))
        .header("Content-Type", "application/json")
        .body(r#"{"customer_id":"CUST001","product_id":"PROD001","quantity":2}"#)
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body: serde_json::Value = response.json().await.unwrap();
    let order_id = body["orderId"]
        .as_str()
        .expect("orderId in canonical JSON")
        .to_owned();
    assert_eq!(body["status"], "ORDER_STATUS_PENDING");
    // int64 is a string in proto3 JSON.
    assert_eq!(body["total"]["units"], "4998");
    assert_eq!(location, format!("/api/v1/orders/{order_id}"));

    let confirmed = eventually("REST order to be confirmed", || {
        let http = http.clone();
        let url = p.rest_url(&location);
        async move {
            let body: serde_json::Value = http.get(url).send().await.ok()?.json().await.ok()?;
            (body["status"] != "ORDER_STATUS_PENDING").then_some(body)
        }
    })
    .await;
    assert_eq!(confirmed["status"], "ORDER_STATUS_CONFIRMED", "{confirmed}");

    // lowerCamelCase input is accepted too.
    let camel = http
        .post(p.rest_url("/api/v1/orders"))
        .json(&serde_json::json!({"customerId": "CUST002", "items": [{"productId": "PROD003", "quantity": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(camel.status(), 201);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn order_created_record_is_keyed_by_customer_and_decodes() {
    let p = Pipeline::start().await;
    let created = p.create(order_request("CUST-KEY-1", "PROD004", 1)).await;

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", e2e::brokers())
        .set("group.id", format!("t{}-inspector", p.id))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[&p.topic("orders")]).unwrap();
    let record = tokio::time::timeout(e2e::DEADLINE, async {
        loop {
            let m = consumer.recv().await.expect("consume").detach();
            let headers = m.headers().expect("headers");
            let event_type = common::kafka::header_str(headers, "event-type").unwrap_or_default();
            if event_type == "shop.events.v1.OrderCreated" {
                return m;
            }
        }
    })
    .await
    .expect("OrderCreated on the orders topic");
    assert_eq!(record.key(), Some("CUST-KEY-1".as_bytes()));
    let headers = record.headers().unwrap();
    assert_eq!(
        common::kafka::header_str(headers, "content-type"),
        Some("application/x-protobuf")
    );
    let event = events::OrderCreated::decode(record.payload().unwrap()).expect("prost decodes");
    assert_eq!(event.order_id, created.order_id);
    assert_eq!(event.customer_id, "CUST-KEY-1");
    assert_eq!(
        common::kafka::header_str(headers, "event-id"),
        Some(event.event_id.as_str())
    );
    assert_eq!(event.items.len(), 1);
    assert_eq!(event.items[0].product_id, "PROD004");
    assert_eq!(event.total, created.total);
    assert!(
        uuid::Uuid::parse_str(&event.event_id)
            .unwrap()
            .get_version_num()
            == 7
    );
    assert!(event.occurred_at.is_some());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn declined_payment_cancels_and_releases_stock() {
    let p = Pipeline::start().await;
    p.payments()
        .await
        .set_credit_limit(SetCreditLimitRequest {
            customer_id: "CUST-POOR".into(),
            limit: Some(Money {
                currency: "USD".into(),
                units: 1000,
            }),
        })
        .await
        .expect("SetCreditLimit");
    let before = available(&p, "PROD005").await;
    let (created, done) = p.place(order_request("CUST-POOR", "PROD005", 1)).await;
    assert_eq!(done.status, OrderStatus::Cancelled as i32);
    assert!(done.reason.contains("payment declined"), "{}", done.reason);
    assert!(done.reason.contains("credit"), "{}", done.reason);
    // Inventory reserved, then released on OrderCancelled (or, had the
    // cancellation overtaken the order, reserved nothing): wait for its
    // final word, not for a stock level it also had before reserving.
    let order_id: uuid::Uuid = created.order_id.parse().unwrap();
    eventually("inventory's final word on the order", || async {
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM reservations WHERE order_id = $1")
                .bind(order_id)
                .fetch_optional(&p.inventory_db)
                .await
                .unwrap();
        matches!(status.as_deref(), Some("RELEASED" | "REJECTED")).then_some(())
    })
    .await;
    assert_eq!(available(&p, "PROD005").await, before, "stock given back");
    let reserved: i64 =
        sqlx::query_scalar("SELECT reserved FROM stock WHERE product_id = 'PROD005'")
            .fetch_one(&p.inventory_db)
            .await
            .unwrap();
    assert_eq!(reserved, 0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn out_of_stock_cancels_and_refunds_payment() {
    let p = Pipeline::start().await;
    p.inventory()
        .await
        .set_stock(SetStockRequest {
            product_id: "PROD020".into(),
            available: 1,
        })
        .await
        .expect("SetStock");
    let (created, done) = p.place(order_request("CUST-OOS", "PROD020", 2)).await;
    assert_eq!(done.status, OrderStatus::Cancelled as i32);
    assert!(
        done.reason.contains("inventory rejected"),
        "{}",
        done.reason
    );
    assert!(done.reason.contains("PROD020"), "{}", done.reason);
    let refunded = p.refunded_payment(&created.order_id).await;
    assert_eq!(refunded.amount, created.total);
    let account = p
        .payments()
        .await
        .get_account(GetAccountRequest {
            customer_id: "CUST-OOS".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(account.used.unwrap().units, 0, "credit restored");
    assert_eq!(available(&p, "PROD020").await, 1, "nothing reserved");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn last_unit_goes_to_exactly_one_of_two_concurrent_orders() {
    let p = Pipeline::start().await;
    p.inventory()
        .await
        .set_stock(SetStockRequest {
            product_id: "PROD019".into(),
            available: 1,
        })
        .await
        .unwrap();
    let (a, b) = tokio::join!(
        async {
            p.orders()
                .await
                .create_order(order_request("CUST-A", "PROD019", 1))
                .await
        },
        async {
            p.orders()
                .await
                .create_order(order_request("CUST-B", "PROD019", 1))
                .await
        },
    );
    let (a, b) = (a.unwrap().into_inner(), b.unwrap().into_inner());
    let (a, b) = tokio::join!(p.final_order(&a.order_id), p.final_order(&b.order_id));
    let confirmed = [&a, &b]
        .iter()
        .filter(|o| o.status == OrderStatus::Confirmed as i32)
        .count();
    assert_eq!(
        confirmed, 1,
        "a: {} {}, b: {} {}",
        a.status, a.reason, b.status, b.reason
    );
    let loser = if a.status == OrderStatus::Confirmed as i32 {
        &b
    } else {
        &a
    };
    assert!(loser.reason.contains("PROD019"), "{}", loser.reason);
    assert_eq!(available(&p, "PROD019").await, 0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_rejects_bad_input_with_status_codes() {
    let p = Pipeline::start().await;
    let mut client = p.orders().await;
    let cases = [
        (
            order_request("", "PROD001", 1),
            Code::InvalidArgument,
            "customer_id is required",
        ),
        (
            order_request("C1", "", 1),
            Code::InvalidArgument,
            "needs items",
        ),
        (
            order_request("C1", "PROD001", 0),
            Code::InvalidArgument,
            "must be positive",
        ),
        (
            order_request("C1", "PROD001", -1),
            Code::InvalidArgument,
            "must be positive",
        ),
        (
            order_request("C1", "PROD001", 1_000_000),
            Code::InvalidArgument,
            "at most",
        ),
        (
            order_request("C1", "PROD999", 1),
            Code::NotFound,
            "unknown product PROD999",
        ),
    ];
    for (request, code, message) in cases {
        let status = client
            .create_order(request.clone())
            .await
            .expect_err("rejected");
        assert_eq!(status.code(), code, "{request:?}: {status:?}");
        assert!(
            status.message().contains(message),
            "{request:?}: {status:?}"
        );
    }
    let missing = client
        .get_order(GetOrderRequest {
            order_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let malformed = client
        .get_order(GetOrderRequest {
            order_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);
    // Nothing was stored for the rejected requests.
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&p.orders_db)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_rejects_bad_input_as_json_errors() {
    let p = Pipeline::start().await;
    let http = reqwest::Client::new();
    let huge = format!(
        r#"{{"customer_id":"{}","product_id":"PROD001","quantity":1}}"#,
        "x".repeat(100_000)
    );
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "invalid JSON"),
        (
            r#"{"customer_id":"C1","product_id":"PROD001","quantity":"two"}"#.into(),
            400,
            "invalid JSON",
        ),
        (
            r#"{"customer_id":42,"product_id":"PROD001","quantity":1}"#.into(),
            400,
            "invalid JSON",
        ),
        (
            r#"{"product_id":"PROD001","quantity":1}"#.into(),
            400,
            "customer_id is required",
        ),
        (
            r#"{"customer_id":"C1","quantity":1}"#.into(),
            400,
            "needs items",
        ),
        (
            r#"{"customer_id":"C1","product_id":"PROD001"}"#.into(),
            400,
            "must be positive",
        ),
        (
            r#"{"customer_id":"C1","product_id":"PROD001","quantity":0}"#.into(),
            400,
            "must be positive",
        ),
        (
            r#"{"customer_id":"C1","product_id":"PROD001","quantity":99999999}"#.into(),
            400,
            "at most",
        ),
        (
            r#"{"customer_id":"C1","product_id":"PROD001","quantity":99999999999}"#.into(),
            400,
            "invalid JSON",
        ),
        (huge, 400, "larger than"),
        (
            r#"{"customer_id":"C1","product_id":"PROD999","quantity":1}"#.into(),
            404,
            "unknown product",
        ),
    ];
    for (body, status, message) in cases {
        let response = http
            .post(p.rest_url("/api/v1/orders"))
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let short = &body[..body.len().min(80)];
        assert_eq!(response.status().as_u16(), status, "{short}");
        let error: serde_json::Value = response.json().await.expect("JSON error body");
        let expected_code = if status == 404 {
            Code::NotFound
        } else {
            Code::InvalidArgument
        };
        assert_eq!(error["code"], expected_code as i32, "{short}: {error}");
        assert!(
            error["message"].as_str().unwrap().contains(message),
            "{short}: {error}"
        );
        assert!(error["details"].is_array());
    }
    let missing = http
        .get(p.rest_url(&format!("/api/v1/orders/{}", uuid::Uuid::now_v7())))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let malformed = http
        .get(p.rest_url("/api/v1/orders/not-a-uuid"))
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    let wrong_method = http
        .delete(p.rest_url("/api/v1/orders"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
    let body: serde_json::Value = wrong_method.json().await.unwrap();
    assert_eq!(body["code"], Code::Unimplemented as i32);
    let no_route = http
        .get(p.rest_url("/api/v2/nothing"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_route.status(), 404);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_service_serves_health_and_reflection() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let p = Pipeline::start().await;
    for (addr, service) in [
        (p.order_grpc, "shop.order.v1.OrderService"),
        (p.payment_grpc, "shop.payment.v1.PaymentService"),
        (p.inventory_grpc, "shop.inventory.v1.InventoryService"),
    ] {
        assert_eq!(e2e::health(addr, "").await, Some(e2e::SERVING));
        assert_eq!(e2e::health(addr, service).await, Some(e2e::SERVING));
        let mut reflection = ServerReflectionClient::new(e2e::channel(addr).await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut replies = reflection
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("reflection")
            .into_inner();
        let reply = replies.message().await.unwrap().expect("a reply");
        let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
            panic!("unexpected reflection reply");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&service), "{names:?}");
        assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
        // Only what this server serves is advertised...
        let shop_services = names.iter().filter(|n| n.starts_with("shop.")).count();
        assert_eq!(shop_services, 1, "{names:?}");
        // ...and each advertised service resolves to its descriptor (k6 and
        // grpcurl ask for all of them, reflection included).
        for name in &names {
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol(name.to_string())),
            };
            let mut replies = reflection
                .server_reflection_info(tokio_stream::iter([request]))
                .await
                .expect("reflection")
                .into_inner();
            let reply = replies.message().await.unwrap().expect("a reply");
            assert!(
                matches!(
                    reply.message_response,
                    Some(MessageResponse::FileDescriptorResponse(_))
                ),
                "{name}: {:?}",
                reply.message_response
            );
        }
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_is_not_serving_while_the_database_is_down() {
    common::telemetry::init_for_tests();
    let pg = e2e::scratch_postgres::ScratchPostgres::start();
    let id = e2e::unique_id();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut cfg = payment::Config::from_env().unwrap();
    cfg.grpc_addr = ([127, 0, 0, 1], 0).into();
    // Not the default 9465: up.sh's payment may hold it.
    cfg.metrics_addr = ([127, 0, 0, 1], 0).into();
    cfg.db = common::config::DbConfig {
        url: pg.url().into(),
        max_connections: 3,
    };
    cfg.kafka = e2e::test_kafka_config(&id, "payment");
    cfg.pipeline = e2e::test_pipeline_config();
    let app = payment::build(cfg, shutdown.clone()).await.expect("starts");
    let addr = app.grpc_addr();
    let running = tokio::spawn(app.run());
    e2e::wait_serving(addr, "").await;

    pg.stop_server();
    eventually("NOT_SERVING after the database stopped", || async {
        (e2e::health(addr, "").await == Some(e2e::NOT_SERVING)).then_some(())
    })
    .await;
    assert_eq!(
        e2e::health(addr, "shop.payment.v1.PaymentService").await,
        Some(e2e::NOT_SERVING)
    );

    pg.start_server();
    eventually("SERVING after the database returned", || async {
        (e2e::health(addr, "").await == Some(e2e::SERVING)).then_some(())
    })
    .await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("graceful shutdown within 30 s")
        .unwrap()
        .expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_started_without_its_database_answers_not_serving_until_it_can_serve() {
    common::telemetry::init_for_tests();
    let pg = e2e::scratch_postgres::ScratchPostgres::start();
    pg.stop_server();
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut cfg = payment::Config::from_env().unwrap();
    cfg.grpc_addr = addr;
    // Not the default 9465: up.sh's payment may hold it.
    cfg.metrics_addr = ([127, 0, 0, 1], 0).into();
    cfg.db = common::config::DbConfig {
        url: pg.url().into(),
        max_connections: 3,
    };
    cfg.kafka = e2e::test_kafka_config(&e2e::unique_id(), "payment");
    cfg.pipeline = e2e::test_pipeline_config();
    // Start-up waits for the database; meanwhile the port answers.
    let building = tokio::spawn(payment::build(cfg, shutdown.clone()));
    eventually(
        "NOT_SERVING from a service still waiting for its database",
        || async { (e2e::health(addr, "").await == Some(e2e::NOT_SERVING)).then_some(()) },
    )
    .await;
    assert_eq!(
        e2e::health(addr, "shop.payment.v1.PaymentService").await,
        Some(e2e::NOT_SERVING)
    );
    let mut client = shop_proto::payment::payment_service_client::PaymentServiceClient::new(
        e2e::channel(addr).await,
    );
    let starting = client
        .get_account(GetAccountRequest {
            customer_id: "C1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(starting.code(), Code::Unavailable, "{starting:?}");
    assert!(!building.is_finished());

    pg.start_server();
    let app = tokio::time::timeout(e2e::DEADLINE, building)
        .await
        .expect("start-up finishes once the database is back")
        .unwrap()
        .expect("starts");
    let running = tokio::spawn(app.run());
    e2e::wait_serving(addr, "").await;
    let account = client
        .get_account(GetAccountRequest {
            customer_id: "C1".into(),
        })
        .await
        .expect("API answers");
    assert_eq!(account.into_inner().credit_limit.unwrap().units, 100_000);
    shutdown.cancel();
    running.await.unwrap().expect("clean shutdown");
}
