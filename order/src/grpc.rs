//! `shop.order.v1.OrderService` over gRPC.

use shop_proto::order::{
    CreateOrderRequest, GetOrderRequest, Order, order_service_server::OrderService,
};
use tonic::{Request, Response, Status};

use crate::api::OrderApi;

pub struct OrderGrpc(pub OrderApi);

#[tonic::async_trait]
impl OrderService for OrderGrpc {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        Ok(Response::new(self.0.create(request.get_ref()).await?))
    }

    async fn get_order(
        &self,
        request: Request<GetOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        Ok(Response::new(
            self.0.get(&request.get_ref().order_id).await?,
        ))
    }
}
