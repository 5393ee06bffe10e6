//! Order rules, free of I/O: what a valid request is, how an order is
//! priced, and what status follows from the payment and inventory results.

use std::collections::{BTreeMap, HashSet};

use shop_proto::order::CreateOrderRequest;

/// Longest accepted customer id.
pub const MAX_CUSTOMER_ID_LEN: usize = 64;
/// Most lines in one order.
pub const MAX_LINES: usize = 100;
/// Most units of one product in one order; more is taken for a typo.
pub const MAX_QUANTITY: i32 = 10_000;

pub use common::error::Invalid;

/// A validated request: who, and which products in what quantities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub customer_id: String,
    pub lines: Vec<(String, i32)>,
}

/// Checks a request and normalises it: the single-product form becomes one
/// line; product ids are trimmed.
pub fn validate(req: &CreateOrderRequest) -> Result<NewOrder, Invalid> {
    let customer_id = req.customer_id.trim();
    if customer_id.is_empty() {
        return Err(Invalid("customer_id is required".into()));
    }
    if customer_id.len() > MAX_CUSTOMER_ID_LEN {
        return Err(Invalid(format!(
            "customer_id is longer than {MAX_CUSTOMER_ID_LEN} characters"
        )));
    }
    if !customer_id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.:@".contains(c))
    {
        return Err(Invalid(
            "customer_id may contain only letters, digits and - _ . : @".into(),
        ));
    }
    let lines: Vec<(String, i32)> = if req.items.is_empty() {
        if req.product_id.trim().is_empty() {
            return Err(Invalid(
                "an order needs items, or product_id and quantity".into(),
            ));
        }
        vec![(req.product_id.trim().to_owned(), req.quantity)]
    } else {
        if !req.product_id.is_empty() {
            return Err(Invalid(
                "give either items or product_id/quantity, not both".into(),
            ));
        }
        req.items
            .iter()
            .map(|i| (i.product_id.trim().to_owned(), i.quantity))
            .collect()
    };
    if lines.len() > MAX_LINES {
        return Err(Invalid(format!("an order has at most {MAX_LINES} items")));
    }
    let mut seen = HashSet::new();
    for (i, (product_id, quantity)) in lines.iter().enumerate() {
        let what = if req.items.is_empty() {
            String::new()
        } else {
            format!("items[{i}].")
        };
        if product_id.is_empty() {
            return Err(Invalid(format!("{what}product_id is required")));
        }
        if *quantity <= 0 {
            return Err(Invalid(format!(
                "{what}quantity must be positive, got {quantity}"
            )));
        }
        if *quantity > MAX_QUANTITY {
            return Err(Invalid(format!(
                "{what}quantity must be at most {MAX_QUANTITY}, got {quantity}"
            )));
        }
        if !seen.insert(product_id.as_str()) {
            return Err(Invalid(format!(
                "product {product_id} appears more than once; sum its quantities"
            )));
        }
    }
    Ok(NewOrder {
        customer_id: customer_id.to_owned(),
        lines,
    })
}

/// A catalog price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price {
    pub currency: String,
    pub units: i64,
}

/// A priced line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricedLine {
    pub product_id: String,
    pub quantity: i32,
    pub unit_price: i64,
}

/// Why an order could not be priced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error("unknown product {0}")]
    UnknownProduct(String),
    #[error("products are priced in more than one currency")]
    MixedCurrency,
    #[error("order total overflows")]
    Overflow,
}

/// Prices every line from the catalog; returns the lines, currency and total.
pub fn price(
    order: &NewOrder,
    catalog: &BTreeMap<String, Price>,
) -> Result<(Vec<PricedLine>, String, i64), PricingError> {
    let mut currency: Option<&str> = None;
    let mut total: i64 = 0;
    let mut lines = Vec::with_capacity(order.lines.len());
    for (product_id, quantity) in &order.lines {
        let price = catalog
            .get(product_id)
            .ok_or_else(|| PricingError::UnknownProduct(product_id.clone()))?;
        match currency {
            None => currency = Some(&price.currency),
            Some(c) if c != price.currency => return Err(PricingError::MixedCurrency),
            Some(_) => {}
        }
        let line_total = price
            .units
            .checked_mul(i64::from(*quantity))
            .ok_or(PricingError::Overflow)?;
        total = total
            .checked_add(line_total)
            .ok_or(PricingError::Overflow)?;
        lines.push(PricedLine {
            product_id: product_id.clone(),
            quantity: *quantity,
            unit_price: price.units,
        });
    }
    Ok((lines, currency.unwrap_or("USD").to_owned(), total))
}

/// Order status as stored (a TEXT column with a CHECK on these names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Pending,
    Confirmed,
    Cancelled,
}

/// What order recorded of payment's result (`orders.payment_status`, NULL
/// until payment reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PaymentStatus {
    Approved,
    Declined,
    /// Approved, then refunded after the order was cancelled.
    Refunded,
}

/// What order recorded of inventory's result (`orders.inventory_status`,
/// NULL until inventory reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InventoryStatus {
    Reserved,
    Rejected,
    /// Reserved, then released after the order was cancelled.
    Released,
}

impl Status {
    /// The stored name (for statements that bind many as `text[]`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "PENDING",
            Status::Confirmed => "CONFIRMED",
            Status::Cancelled => "CANCELLED",
        }
    }
}

impl PaymentStatus {
    /// The stored name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Approved => "APPROVED",
            PaymentStatus::Declined => "DECLINED",
            PaymentStatus::Refunded => "REFUNDED",
        }
    }
}

impl InventoryStatus {
    /// The stored name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            InventoryStatus::Reserved => "RESERVED",
            InventoryStatus::Rejected => "REJECTED",
            InventoryStatus::Released => "RELEASED",
        }
    }
}

/// What a side reported: success, or failure with a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed(String),
}

/// The decision for a PENDING order given what is known so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Wait,
    Confirm,
    Cancel(String),
}

/// Confirmed when payment is approved and stock reserved; cancelled as soon
/// as either fails (the other side is compensated through `OrderCancelled`).
#[must_use]
pub fn decide(payment: Option<&Outcome>, inventory: Option<&Outcome>) -> Decision {
    let mut reasons = Vec::new();
    if let Some(Outcome::Failed(r)) = payment {
        reasons.push(format!("payment declined: {r}"));
    }
    if let Some(Outcome::Failed(r)) = inventory {
        reasons.push(format!("inventory rejected: {r}"));
    }
    if !reasons.is_empty() {
        return Decision::Cancel(reasons.join("; "));
    }
    match (payment, inventory) {
        (Some(Outcome::Ok), Some(Outcome::Ok)) => Decision::Confirm,
        _ => Decision::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shop_proto::order::LineItem;

    fn single(customer: &str, product: &str, quantity: i32) -> CreateOrderRequest {
        CreateOrderRequest {
            customer_id: customer.into(),
            product_id: product.into(),
            quantity,
            ..Default::default()
        }
    }

    #[test]
    fn single_product_form_becomes_one_line() {
        let order = validate(&single(" CUST001 ", "PROD001", 2)).unwrap();
        assert_eq!(order.customer_id, "CUST001");
        assert_eq!(order.lines, vec![("PROD001".to_owned(), 2)]);
    }

    #[test]
    fn rejects_each_bad_input_with_a_message() {
        let cases = [
            (single("", "PROD001", 1), "customer_id is required"),
            (single(&"x".repeat(65), "PROD001", 1), "longer than 64"),
            (single("bad id!", "PROD001", 1), "may contain only"),
            (single("C1", "", 1), "needs items"),
            (single("C1", "PROD001", 0), "must be positive"),
            (single("C1", "PROD001", -3), "must be positive"),
            (single("C1", "PROD001", MAX_QUANTITY + 1), "at most 10000"),
        ];
        for (req, expected) in cases {
            let err = validate(&req).unwrap_err().0;
            assert!(err.contains(expected), "{err:?} should say {expected:?}");
        }
        let dup = CreateOrderRequest {
            customer_id: "C1".into(),
            items: vec![
                LineItem {
                    product_id: "PROD001".into(),
                    quantity: 1,
                },
                LineItem {
                    product_id: "PROD001".into(),
                    quantity: 2,
                },
            ],
            ..Default::default()
        };
        assert!(validate(&dup).unwrap_err().0.contains("more than once"));
        let both = CreateOrderRequest {
            product_id: "PROD002".into(),
            quantity: 1,
            ..dup
        };
        assert!(validate(&both).unwrap_err().0.contains("not both"));
    }

    #[test]
    fn prices_lines_and_rejects_unknown_products() {
        let catalog = BTreeMap::from([
            (
                "A".to_owned(),
                Price {
                    currency: "USD".into(),
                    units: 250,
                },
            ),
            (
                "B".to_owned(),
                Price {
                    currency: "USD".into(),
                    units: 1000,
                },
            ),
            (
                "E".to_owned(),
                Price {
                    currency: "EUR".into(),
                    units: 1,
                },
            ),
        ]);
        let order = NewOrder {
            customer_id: "C".into(),
            lines: vec![("A".into(), 3), ("B".into(), 2)],
        };
        let (lines, currency, total) = price(&order, &catalog).unwrap();
        assert_eq!((currency.as_str(), total), ("USD", 2750));
        assert_eq!(lines[0].unit_price, 250);
        let unknown = NewOrder {
            lines: vec![("Z".into(), 1)],
            ..order.clone()
        };
        assert_eq!(
            price(&unknown, &catalog),
            Err(PricingError::UnknownProduct("Z".into()))
        );
        let mixed = NewOrder {
            lines: vec![("A".into(), 1), ("E".into(), 1)],
            ..order
        };
        assert_eq!(price(&mixed, &catalog), Err(PricingError::MixedCurrency));
    }

    #[test]
    fn status_follows_both_results() {
        let ok = Outcome::Ok;
        let no = |r: &str| Outcome::Failed(r.into());
        assert_eq!(decide(None, None), Decision::Wait);
        assert_eq!(decide(Some(&ok), None), Decision::Wait);
        assert_eq!(decide(Some(&ok), Some(&ok)), Decision::Confirm);
        assert_eq!(
            decide(Some(&no("insufficient credit")), None),
            Decision::Cancel("payment declined: insufficient credit".into())
        );
        assert_eq!(
            decide(Some(&ok), Some(&no("out of stock"))),
            Decision::Cancel("inventory rejected: out of stock".into())
        );
        assert_eq!(
            decide(Some(&no("a")), Some(&no("b"))),
            Decision::Cancel("payment declined: a; inventory rejected: b".into())
        );
    }
}
