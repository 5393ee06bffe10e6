//! `shop.order.v1.OrderService` over gRPC.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use shop_proto::order::{
    CreateOrderRequest, GetOrderRequest, Order, WatchOrderRequest,
    order_service_server::OrderService,
};
use tonic::{Request, Response, Status};

use crate::{api::OrderApi, intake};

pub struct OrderGrpc(pub OrderApi);

#[tonic::async_trait]
impl OrderService for OrderGrpc {
    type WatchOrderStream = Pin<Box<dyn Stream<Item = Result<Order, Status>> + Send + 'static>>;

    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        // The leaf of the chain the client presented over mTLS.
        let certificate = request
            .peer_certs()
            .and_then(|chain| chain.first().map(|leaf| common::tls::fingerprint(leaf)));
        let client = intake::client_key(
            certificate.as_deref(),
            request
                .metadata()
                .get(intake::CLIENT_ID_HEADER)
                .and_then(|v| v.to_str().ok()),
            request.remote_addr().map(|a| a.ip()),
        );
        Ok(Response::new(
            self.0.create(request.get_ref(), &client).await?,
        ))
    }

    async fn get_order(
        &self,
        request: Request<GetOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        Ok(Response::new(
            self.0.get(&request.get_ref().order_id).await?,
        ))
    }

    async fn watch_order(
        &self,
        request: Request<WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        let states = self.0.watch(&request.get_ref().order_id).await?;
        Ok(Response::new(Box::pin(
            states.map(|s| s.map_err(Status::from)),
        )))
    }
}
