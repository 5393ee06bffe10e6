//! Payment rules, free of I/O: whether an order's total fits a customer's
//! credit, what a refund gives back, and what a valid credit limit is.
//!
//! Amounts are integer minor units of a currency; messages write them the
//! same way (`1999 USD` is $19.99, as in `shop.common.v1.Money`), so that no
//! rule needs to know a currency's number of decimals.

use std::collections::{BTreeMap, HashMap};

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

/// Customers' credit while a run of orders is decided in order, in memory,
/// from their accounts as locked at the start: each approval takes its
/// amount before the customer's next order is decided, exactly as deciding
/// the orders one transaction after another would. What changed is then
/// written back once per account.
#[derive(Debug, Default)]
pub struct Books {
    accounts: HashMap<String, Credit>,
    /// Credit in use of the accounts an approval changed, by customer.
    changed: BTreeMap<String, i64>,
}

impl Books {
    #[must_use]
    pub fn new(accounts: impl IntoIterator<Item = (String, Credit)>) -> Self {
        Self {
            accounts: accounts.into_iter().collect(),
            changed: BTreeMap::new(),
        }
    }

    /// [`decide`]s an order of `customer_id` against the account as the
    /// orders before it left it; an approval takes the credit. `None` when
    /// the customer has no account in these books.
    pub fn pay(&mut self, customer_id: &str, amount: i64, currency: &str) -> Option<Decision> {
        let credit = self.accounts.get_mut(customer_id)?;
        let decision = decide(credit, amount, currency);
        if decision == Decision::Approve {
            // `decide` approved: this neither overflows nor passes the limit.
            credit.used += amount;
            self.changed.insert(customer_id.to_owned(), credit.used);
        }
        Some(decision)
    }

    /// The accounts whose credit in use changed, with its new value, in
    /// customer order.
    #[must_use]
    pub fn changed(&self) -> Vec<(&str, i64)> {
        self.changed
            .iter()
            .map(|(customer, used)| (customer.as_str(), *used))
            .collect()
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
    fn books_decide_a_run_as_one_order_after_another() {
        let mut books = Books::new([
            ("A".to_owned(), usd(1000, 100)),
            ("B".to_owned(), usd(500, 0)),
        ]);
        // The same orders decided one by one, each against the account as
        // the one before left it.
        let orders = [
            ("A", 400),
            ("B", 300),
            ("A", 400),
            ("A", 200), // 100 + 400 + 400 = 900 in use: 200 does not fit
            ("B", 200),
            ("A", 100), // a decline took nothing: 100 still fits, exactly
            ("B", 1),
        ];
        let mut sequential: HashMap<&str, Credit> =
            HashMap::from([("A", usd(1000, 100)), ("B", usd(500, 0))]);
        for (customer, amount) in orders {
            let expected = decide(&sequential[customer], amount, "USD");
            if expected == Decision::Approve {
                sequential.get_mut(customer).unwrap().used += amount;
            }
            assert_eq!(books.pay(customer, amount, "USD"), Some(expected));
        }
        assert_eq!(books.changed(), vec![("A", 1000), ("B", 500)]);
        assert_eq!(
            books.pay("A", 1, "USD"),
            Some(Decision::Decline(
                "insufficient credit: order total 1 USD exceeds available credit 0 USD".into()
            ))
        );
    }

    #[test]
    fn books_change_only_what_an_approval_took() {
        let mut books = Books::new([("A".to_owned(), usd(100, 0)), ("B".to_owned(), usd(100, 0))]);
        assert!(matches!(
            books.pay("A", 101, "USD"),
            Some(Decision::Decline(_))
        ));
        assert!(matches!(
            books.pay("B", 10, "EUR"),
            Some(Decision::Decline(_))
        ));
        assert_eq!(books.pay("NOBODY", 1, "USD"), None);
        assert!(books.changed().is_empty());
        assert_eq!(books.pay("B", 0, "USD"), Some(Decision::Approve));
        assert_eq!(books.changed(), vec![("B", 0)]);
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
