//! `shop.payment.v1.PaymentService` over gRPC: reads payments and accounts,
//! and sets credit limits. Payments themselves are made by [`crate::saga`].

use shop_proto::payment::{
    Account, GetAccountRequest, GetPaymentRequest, Payment, SetCreditLimitRequest,
    payment_service_server::PaymentService,
};
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    domain::{self, AccountDefaults, Invalid},
    error::PaymentError,
    store,
};

pub struct PaymentGrpc {
    pub pool: PgPool,
    /// How accounts that do not exist yet are shown and created.
    pub defaults: AccountDefaults,
}

impl PaymentGrpc {
    /// `NOT_FOUND` until the order has been processed; `INVALID_ARGUMENT` if
    /// `order_id` is not a UUID.
    pub async fn payment(&self, order_id: &str) -> Result<Payment, PaymentError> {
        let id = Uuid::parse_str(order_id.trim())
            .map_err(|_| Invalid(format!("order_id {order_id:?} is not a UUID")))?;
        store::load_payment(&self.pool, id)
            .await?
            .ok_or_else(|| PaymentError::NotFound(id.to_string()))
    }

    /// A customer without an account is shown the account they would get,
    /// without creating it: reads stay reads.
    pub async fn account(&self, customer_id: &str) -> Result<Account, PaymentError> {
        let customer_id = domain::customer_id(customer_id)?;
        store::get_account(&self.pool, customer_id, &self.defaults).await
    }
}

#[tonic::async_trait]
impl PaymentService for PaymentGrpc {
    async fn get_payment(
        &self,
        request: Request<GetPaymentRequest>,
    ) -> Result<Response<Payment>, Status> {
        Ok(Response::new(
            self.payment(&request.get_ref().order_id).await?,
        ))
    }

    async fn get_account(
        &self,
        request: Request<GetAccountRequest>,
    ) -> Result<Response<Account>, Status> {
        Ok(Response::new(
            self.account(&request.get_ref().customer_id).await?,
        ))
    }

    async fn set_credit_limit(
        &self,
        request: Request<SetCreditLimitRequest>,
    ) -> Result<Response<Account>, Status> {
        let req = request.get_ref();
        let customer_id = domain::customer_id(&req.customer_id).map_err(PaymentError::from)?;
        let account =
            store::set_credit_limit(&self.pool, customer_id, req.limit.as_ref(), &self.defaults)
                .await?;
        Ok(Response::new(account))
    }
}
