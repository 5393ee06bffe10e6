//! Payment rules, free of I/O: whether an order's total fits a customer's
//! credit, what a refund gives back, and what a valid credit limit is.
//!
//! Amounts are integer minor units of a currency; messages write them the
//! same way (`1999 USD` is $19.99, as in `shop.common.v1.Money`), so that no
//! rule needs to know a currency's number of decimals.

use shop_proto::common::Money;

pub use common::error::Invalid;

/// What a customer's account starts with when it is first needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountDefaults {
    /// ISO 4217 code of new accounts.
    pub currency: String,
    /// Credit limit of new accounts, in minor units.
    pub credit_limit: i64,
}

/// A customer's credit as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Credit {
    pub currency: String,
    pub limit: i64,
    pub used: i64,
}

impl Credit {
    /// The account of a customer seen for the first time.
    #[must_use]
    pub fn new(defaults: &AccountDefaults) -> Self {
        Self {
            currency: defaults.currency.clone(),
            limit: defaults.credit_limit,
            used: 0,
        }
    }

    /// `limit - used`, as is: negative when the limit was lowered below what
    /// is already in use (clamping it would make the books disagree).
    #[must_use]
    pub fn available(&self) -> i64 {
        self.limit.saturating_sub(self.used)
    }
}

/// Whether an order is paid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Approve,
    Decline(String),
}

/// Approves iff the order is in the account's currency, its amount is not
/// negative, and `used + amount <= limit` (overflow counts as not fitting).
/// A decline says why.
#[must_use]
pub fn decide(credit: &Credit, amount: i64, currency: &str) -> Decision {
    if currency != credit.currency {
        return Decision::Decline(format!(
            "currency mismatch: order total is in {currency}, the credit account in {}",
            credit.currency
        ));
    }
    if amount < 0 {
        return Decision::Decline(format!(
            "invalid amount: order total {} is negative",
            money_text(amount, currency)
        ));
    }
    match credit.used.checked_add(amount) {
        Some(total) if total <= credit.limit => Decision::Approve,
        _ => Decision::Decline(format!(
            "insufficient credit: order total {} exceeds available credit {}",
            money_text(amount, currency),
            money_text(credit.available(), &credit.currency)
        )),
    }
}

/// Credit in use after refunding `amount`; `None` if that would go below
/// zero, which means the books are already wrong (`used` is the sum of the
/// approved payments).
#[must_use]
pub fn release(used: i64, amount: i64) -> Option<i64> {
    used.checked_sub(amount).filter(|u| *u >= 0 && amount >= 0)
}

/// A trimmed, non-empty customer id.
pub fn customer_id(raw: &str) -> Result<&str, Invalid> {
    let id = raw.trim();
    if id.is_empty() {
        return Err(Invalid("customer_id is required".into()));
    }
    Ok(id)
}

/// The units of a new credit limit: present, not negative, and in the
/// account's currency.
pub fn validate_limit(limit: Option<&Money>, account_currency: &str) -> Result<i64, Invalid> {
    let limit = limit.ok_or_else(|| Invalid("limit is required".into()))?;
    if limit.units < 0 {
        return Err(Invalid(format!(
            "limit must not be negative, got {}",
            money_text(limit.units, &limit.currency)
        )));
    }
    if limit.currency != account_currency {
        return Err(Invalid(format!(
            "limit currency {:?} differs from the account's currency {account_currency}",
            limit.currency
        )));
    }
    Ok(limit.units)
}

/// `1999 USD`: minor units and currency code.
#[must_use]
pub fn money_text(units: i64, currency: &str) -> String {
    format!("{units} {currency}")
}

/// Payment status as stored (a TEXT column with a CHECK on these names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Approved,
    Declined,
    /// Approved, then given back because the order was cancelled.
    Refunded,
}

impl Status {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Approved => "APPROVED",
            Status::Declined => "DECLINED",
            Status::Refunded => "REFUNDED",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd(limit: i64, used: i64) -> Credit {
        Credit {
            currency: "USD".into(),
            limit,
            used,
        }
    }

    fn declined(d: Decision) -> String {
        match d {
            Decision::Decline(reason) => reason,
            Decision::Approve => panic!("expected a decline"),
        }
    }

    #[test]
    fn approves_up_to_the_limit_inclusive() {
        assert_eq!(decide(&usd(1000, 0), 1000, "USD"), Decision::Approve);
        assert_eq!(decide(&usd(1000, 400), 600, "USD"), Decision::Approve);
        assert_eq!(decide(&usd(1000, 1000), 0, "USD"), Decision::Approve);
        assert_eq!(decide(&usd(0, 0), 0, "USD"), Decision::Approve);
    }

    #[test]
    fn declines_over_the_limit_with_amounts_in_the_reason() {
        let reason = declined(decide(&usd(1000, 500), 1999, "USD"));
        assert_eq!(
            reason,
            "insufficient credit: order total 1999 USD exceeds available credit 500 USD"
        );
        assert!(matches!(
            decide(&usd(1000, 400), 601, "USD"),
            Decision::Decline(_)
        ));
    }

    #[test]
    fn a_limit_lowered_below_use_shows_negative_available_credit() {
        let reason = declined(decide(&usd(100, 300), 1, "USD"));
        assert!(reason.contains("available credit -200 USD"), "{reason}");
        assert_eq!(usd(100, 300).available(), -200);
    }

    #[test]
    fn overflow_is_a_decline_not_a_panic() {
        let reason = declined(decide(&usd(i64::MAX, i64::MAX - 1), 2, "USD"));
        assert!(reason.starts_with("insufficient credit"), "{reason}");
        assert!(matches!(
            decide(&usd(i64::MAX, 1), i64::MAX, "USD"),
            Decision::Decline(_)
        ));
    }

    #[test]
    fn declines_other_currencies_and_negative_amounts() {
        let reason = declined(decide(&usd(1000, 0), 10, "EUR"));
        assert!(reason.starts_with("currency mismatch"), "{reason}");
        assert!(reason.contains("EUR") && reason.contains("USD"), "{reason}");
        let reason = declined(decide(&usd(1000, 0), -1, "USD"));
        assert_eq!(reason, "invalid amount: order total -1 USD is negative");
    }

    #[test]
    fn release_gives_credit_back_but_never_below_zero() {
        assert_eq!(release(1500, 500), Some(1000));
        assert_eq!(release(500, 500), Some(0));
        assert_eq!(release(400, 500), None);
        assert_eq!(release(400, -1), None);
        assert_eq!(release(i64::MIN, 1), None);
    }

    #[test]
    fn new_accounts_take_the_defaults() {
        let defaults = AccountDefaults {
            currency: "USD".into(),
            credit_limit: 100_000,
        };
        let credit = Credit::new(&defaults);
        assert_eq!(credit, usd(100_000, 0));
        assert_eq!(credit.available(), 100_000);
    }

    #[test]
    fn validates_customer_ids() {
        assert_eq!(customer_id(" CUST001 "), Ok("CUST001"));
        assert_eq!(customer_id("  ").unwrap_err().0, "customer_id is required");
    }

    #[test]
    fn validates_credit_limits() {
        let money = |currency: &str, units| Money {
            currency: currency.into(),
            units,
        };
        assert_eq!(validate_limit(Some(&money("USD", 5000)), "USD"), Ok(5000));
        assert_eq!(validate_limit(Some(&money("USD", 0)), "USD"), Ok(0));
        let cases = [
            (None, "limit is required"),
            (Some(money("USD", -1)), "must not be negative"),
            (
                Some(money("EUR", 100)),
                "differs from the account's currency USD",
            ),
            (Some(money("", 100)), "differs"),
        ];
        for (limit, expected) in cases {
            let err = validate_limit(limit.as_ref(), "USD").unwrap_err().0;
            assert!(err.contains(expected), "{err:?} should say {expected:?}");
        }
    }
}
