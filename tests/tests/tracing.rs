//! One trace per order, across every hop.
//!
//! The three services run as their real binaries (each its own
//! `service.name`), exporting over OTLP/gRPC to a receiver this test
//! serves. An order placed over REST with a caller's `traceparent` must
//! come back as one trace: the REST request continues the caller's span,
//! the outbox write, the relay's publish, payment's and inventory's
//! processing of `OrderCreated` and order's status update all descend from
//! it, and the Kafka records carry the context in their headers.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use e2e::{create_database, eventually, free_addr, process::ServiceProcess, unique_id};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::Span,
};
use rdkafka::message::{Headers, Message};
use shop_proto::order::OrderStatus;

/// A span as received, with the service that sent it.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    span: Span,
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// The spans by id, for [`ancestors`].
fn by_span_id(spans: &[Received]) -> HashMap<String, &Received> {
    spans.iter().map(|r| (hex(&r.span.span_id), r)).collect()
}

/// `r`'s ancestors among the received spans, nearest first, as
/// `service:name`, and the parent id the chain ends at (the caller's span
/// when the whole chain has arrived).
fn ancestors(by_id: &HashMap<String, &Received>, r: &Received) -> (Vec<String>, String) {
    let mut chain = vec![];
    let mut parent = hex(&r.span.parent_span_id);
    while let Some(p) = by_id.get(&parent) {
        chain.push(format!("{}:{}", p.service, p.span.name));
        parent = hex(&p.span.parent_span_id);
    }
    (chain, parent)
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_order_is_one_trace_across_all_three_services() {
    let receiver = Receiver::default();
    let otlp = free_addr();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve(otlp),
    );

    let id = unique_id();
    let (orders, payments, inventory) = tokio::join!(
        create_database(format!("t_{id}_orders")),
        create_database(format!("t_{id}_payments")),
        create_database(format!("t_{id}_inventory")),
    );
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}")),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ];
    let mut services = [
        ServiceProcess::start("order", &id, &orders, &env),
        ServiceProcess::start("payment", &id, &payments, &env),
        ServiceProcess::start("inventory", &id, &inventory, &env),
    ];
    for service in &services {
        e2e::wait_serving(service.grpc, "").await;
    }

    // The caller's own trace: its span is the parent of the request's.
    let trace_id = uuid::Uuid::now_v7().simple().to_string();
    let caller_span = "00f067aa0ba902b7";
    let http = reqwest::Client::new();
    let created: serde_json::Value = http
        .post(format!("http://{}/api/v1/orders", services[0].http))
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&serde_json::json!({"customer_id": "CUST-TRACE", "product_id": "PROD001", "quantity": 1}))
        .send()
        .await
        .expect("POST order")
        .json()
        .await
        .expect("JSON");
    let order_id = created["orderId"].as_str().expect("orderId").to_owned();
    let order = eventually("the order to be confirmed", || async {
        let order: serde_json::Value = http
            .get(format!(
                "http://{}/api/v1/orders/{order_id}",
                services[0].http
            ))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (order["status"] != "ORDER_STATUS_PENDING").then_some(order)
    })
    .await;
    assert_eq!(
        order["status"],
        OrderStatus::Confirmed.as_str_name(),
        "{order}"
    );

    // Span names follow the OpenTelemetry conventions: `process <topic>`,
    // `send <topic>`, `<method> <route>`.
    let orders_process = format!("process t{id}.orders");
    let orders_send = format!("order:send t{id}.orders");
    let payments_send = format!("payment:send t{id}.payments");
    let inventory_send = format!("inventory:send t{id}.inventory");
    // Every span of the order's trace, once order has exported its status
    // updates (the last hops) and payment and inventory their sends, which
    // end at the broker's ack, after their process spans, and may reach the
    // receiver after order's status updates.
    let spans = eventually("the order's spans from all three services", || async {
        let spans: Vec<Received> = receiver
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|r| hex(&r.span.trace_id) == trace_id)
            .cloned()
            .collect();
        let count = |service: &str, name: &str| {
            spans
                .iter()
                .filter(|r| r.service == service && r.span.name == name)
                .count()
        };
        let has = |service: &str, name: &str| count(service, name) > 0;
        // A status update may reach the receiver before its ancestors (order's
        // process span ends after it, at the commit, and goes out in a later
        // export): wait until every one leads up to the caller's span.
        let by_id = by_span_id(&spans);
        let rooted = |r: &Received| ancestors(&by_id, r).1 == caller_span;
        let updates = || {
            spans
                .iter()
                .filter(|r| r.service == "order" && r.span.name == "order status update")
        };
        // One status update per side's result, in whichever order they came.
        let complete = count("order", "order status update") >= 2
            && updates().all(rooted)
            && has("payment", &orders_process)
            && has("inventory", &orders_process)
            && has("payment", &format!("send t{id}.payments"))
            && has("inventory", &format!("send t{id}.inventory"));
        drop(by_id);
        complete.then_some(spans)
    })
    .await;
    let by_id = by_span_id(&spans);

    // The trace as a tree, for the reader (`--nocapture` shows it).
    let mut lines: Vec<(Vec<String>, String)> = spans
        .iter()
        .map(|r| {
            let (mut chain, _) = ancestors(&by_id, r);
            chain.reverse();
            chain.push(format!("{}:{}", r.service, r.span.name));
            (
                chain.clone(),
                format!("{}{}", "  ".repeat(chain.len() - 1), chain.last().unwrap()),
            )
        })
        .collect();
    lines.sort();
    eprintln!("trace {trace_id}, caller span {caller_span}:");
    for (_, line) in &lines {
        eprintln!("  {line}");
    }

    // The intake: the REST request continues the caller's span.
    let intake = spans
        .iter()
        .find(|r| r.service == "order" && r.span.name == "POST /api/v1/orders")
        .expect("the REST request's span");
    assert_eq!(hex(&intake.span.parent_span_id), caller_span);
    assert_eq!(
        attribute(&intake.span, "http.route"),
        Some("/api/v1/orders")
    );

    // Each hop descends from the intake, through the outbox and Kafka.
    for (service, name, via) in [
        ("payment", orders_process.as_str(), orders_send.as_str()),
        ("inventory", orders_process.as_str(), orders_send.as_str()),
        ("order", "order status update", payments_send.as_str()),
        ("order", "order status update", inventory_send.as_str()),
    ] {
        // Order has a status update per side: take the one that continues `via`.
        let chains: Vec<_> = spans
            .iter()
            .filter(|r| r.service == service && r.span.name == name)
            .map(|r| ancestors(&by_id, r))
            .collect();
        assert!(!chains.is_empty(), "no {service} {name} span");
        let (chain, root_parent) = chains
            .iter()
            .find(|(chain, _)| chain.iter().any(|c| c == via))
            .unwrap_or_else(|| {
                panic!("no {service} {name} continues the record's producer span {via}: {chains:?}")
            });
        assert!(
            chain.iter().any(|c| c == "order:POST /api/v1/orders") && *root_parent == caller_span,
            "{service} {name} descends from the intake: {chain:?}"
        );
        assert!(
            chain.iter().any(|c| c.ends_with(":outbox write")),
            "{service} {name} descends from an outbox write: {chain:?}"
        );
    }
    let consumed = spans
        .iter()
        .find(|r| r.service == "payment" && r.span.name == orders_process)
        .unwrap();
    assert_eq!(attribute(&consumed.span, "messaging.system"), Some("kafka"));
    assert_eq!(
        attribute(&consumed.span, "messaging.destination.name"),
        Some(format!("t{id}.orders").as_str())
    );
    assert_eq!(
        attribute(&consumed.span, "messaging.kafka.message.key"),
        Some("CUST-TRACE")
    );
    assert_eq!(
        attribute(&consumed.span, "order_id"),
        Some(order_id.as_str())
    );

    // The Kafka record carries the trace context.
    let kafka = common::config::KafkaConfig {
        brokers: e2e::brokers(),
        ..e2e::test_kafka_config(&id, "test")
    };
    let records = shopctl::topic::read_all(&kafka, &format!("t{id}.orders")).expect("read orders");
    let traceparent = records
        .iter()
        .find_map(|m| common::kafka::header_str(m.headers()?, "traceparent"))
        .expect("a traceparent header on the orders topic");
    assert!(
        traceparent.starts_with(&format!("00-{trace_id}-")),
        "{traceparent}"
    );
    assert!(
        records
            .iter()
            .all(|m| m.headers().is_some_and(|h| h.count() >= 4))
    );
    // So does the decision, though order's set-based consumer writes the
    // outbox rows of a whole batch at once: each continues the trace of the
    // record that caused it.
    let decision = eventually("the OrderConfirmed record", || async {
        shopctl::topic::read_all(&kafka, &format!("t{id}.orders"))
            .ok()?
            .into_iter()
            .find(|m| {
                m.headers()
                    .and_then(|h| common::kafka::header_str(h, "event-type"))
                    == Some(
                        <shop_proto::events::OrderConfirmed as shop_proto::EventName>::EVENT_TYPE,
                    )
            })
    })
    .await;
    let traceparent = decision
        .headers()
        .and_then(|h| common::kafka::header_str(h, "traceparent"))
        .expect("a traceparent header on OrderConfirmed");
    assert!(
        traceparent.starts_with(&format!("00-{trace_id}-")),
        "{traceparent}"
    );

    for service in &mut services {
        assert!(service.terminate().await.success(), "{}", service.log());
    }
    server.abort();
}
