//! `bench-echo`: the ceiling the benchmark compares `CreateOrder` with
//! (issue 11, target 4). It serves `shop.order.v1.OrderService` through the
//! very router order uses (`common::grpc`: metrics layer, request spans,
//! health, reflection, `TCP_NODELAY`), so ghz drives it with the same config
//! and payload; its `CreateOrder` turns the request into a PENDING order
//! without validating, storing or publishing anything. The ratio of
//! CreateOrder/s to echo/s is what the order's own work costs.
//!
//! usage: `bench-echo [ADDR]` (default `127.0.0.1:50099`); stops on Ctrl-C
//! or SIGTERM.

use std::{net::SocketAddr, pin::Pin};

use futures::Stream;
use shop_proto::{
    common::Money,
    order::{
        CreateOrderRequest, GetOrderRequest, Order, OrderItem, OrderStatus, WatchOrderRequest,
        order_service_server::{OrderService, OrderServiceServer},
    },
};
use tonic::{Request, Response, Status};

/// A fixed price, so the echo builds an order as large as order's reply.
const UNIT_PRICE: i64 = 1_000;

struct Echo;

#[tonic::async_trait]
impl OrderService for Echo {
    type WatchOrderStream = Pin<Box<dyn Stream<Item = Result<Order, Status>> + Send + 'static>>;

    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        Ok(Response::new(echo(request.into_inner())))
    }

    async fn get_order(&self, _: Request<GetOrderRequest>) -> Result<Response<Order>, Status> {
        Err(Status::unimplemented("bench-echo serves CreateOrder only"))
    }

    async fn watch_order(
        &self,
        _: Request<WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        Err(Status::unimplemented("bench-echo serves CreateOrder only"))
    }
}

/// The request as a PENDING order, priced at [`UNIT_PRICE`] a unit.
fn echo(req: CreateOrderRequest) -> Order {
    let money = |units| {
        Some(Money {
            currency: "USD".to_owned(),
            units,
        })
    };
    let items: Vec<OrderItem> = req
        .items
        .into_iter()
        .map(|line| OrderItem {
            unit_price: money(UNIT_PRICE),
            line_total: money(UNIT_PRICE * i64::from(line.quantity)),
            product_id: line.product_id,
            quantity: line.quantity,
        })
        .collect();
    let total = items
        .iter()
        .map(|i| UNIT_PRICE * i64::from(i.quantity))
        .sum();
    let now = Some(common::time::now());
    Order {
        order_id: String::new(),
        customer_id: req.customer_id,
        items,
        total: money(total),
        status: OrderStatus::Pending as i32,
        reason: String::new(),
        created_at: now,
        updated_at: now,
    }
}

/// The services' allocator, so that the ceiling is served the way order is.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .as_deref()
        .unwrap_or("127.0.0.1:50099")
        .parse()?;
    let (router, _health) = common::grpc::router("shop.order.v1.OrderService", None)?;
    let router = router.add_service(OrderServiceServer::new(Echo));
    let (listener, bound) = common::grpc::bind(addr).await?;
    let shutdown = common::shutdown::on_signal()?;
    println!("bench-echo serving shop.order.v1.OrderService/CreateOrder on {bound}");
    common::grpc::serve(router, listener, shutdown).await?;
    Ok(())
}
