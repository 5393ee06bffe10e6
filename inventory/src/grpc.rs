//! `shop.inventory.v1.InventoryService` over gRPC: read and set stock.

use shop_proto::inventory::{
    GetStockRequest, SetStockRequest, Stock, inventory_service_server::InventoryService,
};
use sqlx::PgPool;
use tonic::{Request, Response, Status};

use crate::{domain, error::InventoryError, store};

pub struct InventoryGrpc {
    pub pool: PgPool,
}

impl InventoryGrpc {
    async fn get(&self, req: &GetStockRequest) -> Result<Stock, InventoryError> {
        let product_id = domain::product_id(&req.product_id)?;
        store::get_stock(&self.pool, product_id)
            .await?
            .ok_or_else(|| InventoryError::NotFound(product_id.to_owned()))
    }

    async fn set(&self, req: &SetStockRequest) -> Result<Stock, InventoryError> {
        let product_id = domain::product_id(&req.product_id)?;
        let available = domain::available(req.available)?;
        let stock = store::set_stock(&self.pool, product_id, available).await?;
        tracing::info!(product_id, available, "stock set");
        Ok(stock)
    }
}

#[tonic::async_trait]
impl InventoryService for InventoryGrpc {
    async fn get_stock(
        &self,
        request: Request<GetStockRequest>,
    ) -> Result<Response<Stock>, Status> {
        Ok(Response::new(self.get(request.get_ref()).await?))
    }

    async fn set_stock(
        &self,
        request: Request<SetStockRequest>,
    ) -> Result<Response<Stock>, Status> {
        Ok(Response::new(self.set(request.get_ref()).await?))
    }
}
