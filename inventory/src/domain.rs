//! Inventory rules, free of I/O: how an order's lines become one quantity
//! per product, whether its stock can be reserved (all lines or none), and
//! what the stock API accepts.

use std::collections::BTreeMap;

/// Longest product id the stock API accepts.
pub const MAX_PRODUCT_ID_LEN: usize = 64;
/// Most units `SetStock` accepts for one product; more is taken for a typo.
pub const MAX_AVAILABLE: i64 = 1_000_000_000_000;

pub use common::error::Invalid;

/// One product's quantity in an order, after merging its lines.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Line {
    pub product_id: String,
    pub quantity: i32,
}

/// Sums the quantities of lines naming the same product and sorts by
/// product id. Stock rows are then always locked in one order, so two
/// orders for overlapping products never deadlock.
///
/// An order without lines, a line without a product, or a quantity that is
/// not positive is invalid: order never publishes one, so it cannot be
/// applied however often it is retried.
pub fn merge_lines<'a>(
    lines: impl IntoIterator<Item = (&'a str, i32)>,
) -> Result<Vec<Line>, Invalid> {
    let mut merged: BTreeMap<&str, i32> = BTreeMap::new();
    for (product_id, quantity) in lines {
        if product_id.is_empty() {
            return Err(Invalid("an order line has no product_id".into()));
        }
        if quantity <= 0 {
            return Err(Invalid(format!(
                "quantity of {product_id} must be positive, got {quantity}"
            )));
        }
        let total = merged.entry(product_id).or_insert(0);
        *total = total
            .checked_add(quantity)
            .ok_or_else(|| Invalid(format!("quantity of {product_id} overflows")))?;
    }
    if merged.is_empty() {
        return Err(Invalid("the order has no items".into()));
    }
    Ok(merged
        .into_iter()
        .map(|(product_id, quantity)| Line {
            product_id: product_id.to_owned(),
            quantity,
        })
        .collect())
}

/// What to do with an order's stock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Every line is in stock: reserve them all.
    Reserve,
    /// Reserve nothing, for this reason.
    Reject(String),
}

/// All or nothing: reserve when every product is known and has enough
/// units available; otherwise reject, naming each unknown and each short
/// product, e.g. `unknown product PROD999; out of stock: PROD020 (requested
/// 5, available 3)`. `available` holds the units of the known products.
#[must_use]
pub fn decide(lines: &[Line], available: &BTreeMap<String, i64>) -> Decision {
    let mut unknown = Vec::new();
    let mut short = Vec::new();
    for line in lines {
        match available.get(&line.product_id) {
            None => unknown.push(line.product_id.as_str()),
            Some(&units) if i64::from(line.quantity) > units => short.push(format!(
                "{} (requested {}, available {units})",
                line.product_id, line.quantity
            )),
            Some(_) => {}
        }
    }
    let mut reasons = Vec::new();
    match unknown.as_slice() {
        [] => {}
        [one] => reasons.push(format!("unknown product {one}")),
        many => reasons.push(format!("unknown products {}", many.join(", "))),
    }
    if !short.is_empty() {
        reasons.push(format!("out of stock: {}", short.join(", ")));
    }
    if reasons.is_empty() {
        Decision::Reserve
    } else {
        Decision::Reject(reasons.join("; "))
    }
}

/// Stock while a run of orders is decided in order, in memory, from the
/// rows as locked at the start: a reservation takes its units before the
/// next order is decided, exactly as one transaction per order would. Each
/// product's net change is then written back once, instead of once per
/// order (which, for a popular product, walks a growing chain of row
/// versions within one transaction).
#[derive(Debug, Default)]
pub struct Shelf {
    /// Units available now, of the known products.
    available: BTreeMap<String, i64>,
    /// Units reserved by the run so far, by product.
    taken: BTreeMap<String, i64>,
}

impl Shelf {
    /// `available` holds the units of the known products.
    #[must_use]
    pub fn new(available: BTreeMap<String, i64>) -> Self {
        Self {
            available,
            taken: BTreeMap::new(),
        }
    }

    /// [`decide`]s an order's (merged) lines against the stock the orders
    /// before it left; a reservation takes every line's units.
    pub fn reserve(&mut self, lines: &[Line]) -> Decision {
        let decision = decide(lines, &self.available);
        if decision == Decision::Reserve {
            for line in lines {
                let units = i64::from(line.quantity);
                // `decide` found each product with at least `units` left.
                if let Some(available) = self.available.get_mut(&line.product_id) {
                    *available -= units;
                }
                *self.taken.entry(line.product_id.clone()).or_insert(0) += units;
            }
        }
        decision
    }

    /// Units the run reserved, per product, in product order.
    #[must_use]
    pub fn taken(&self) -> Vec<(&str, i64)> {
        self.taken
            .iter()
            .map(|(product, units)| (product.as_str(), *units))
            .collect()
    }
}

/// A reservation's state as stored (a TEXT column with a CHECK on these
/// names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// Stock is held for the order.
    Reserved,
    /// Nothing was held (out of stock, unknown product, or the order was
    /// cancelled before its `OrderCreated` arrived).
    Rejected,
    /// Stock was held, then given back because the order was cancelled.
    Released,
}

impl Status {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Reserved => "RESERVED",
            Status::Rejected => "REJECTED",
            Status::Released => "RELEASED",
        }
    }
}

/// Checks a product id from the stock API; returns it trimmed.
pub fn product_id(raw: &str) -> Result<&str, Invalid> {
    let id = raw.trim();
    if id.is_empty() {
        return Err(Invalid("product_id is required".into()));
    }
    if id.len() > MAX_PRODUCT_ID_LEN {
        return Err(Invalid(format!(
            "product_id is longer than {MAX_PRODUCT_ID_LEN} characters"
        )));
    }
    Ok(id)
}

/// Checks a stock level given to `SetStock`.
pub fn available(units: i64) -> Result<i64, Invalid> {
    if units < 0 {
        return Err(Invalid(format!(
            "available must not be negative, got {units}"
        )));
    }
    if units > MAX_AVAILABLE {
        return Err(Invalid(format!(
            "available must be at most {MAX_AVAILABLE}, got {units}"
        )));
    }
    Ok(units)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(product_id: &str, quantity: i32) -> Line {
        Line {
            product_id: product_id.into(),
            quantity,
        }
    }

    fn stock(levels: &[(&str, i64)]) -> BTreeMap<String, i64> {
        levels.iter().map(|(p, n)| ((*p).to_owned(), *n)).collect()
    }

    #[test]
    fn merges_lines_per_product_sorted() {
        let merged = merge_lines([("PROD003", 1), ("PROD001", 2), ("PROD003", 4)]).unwrap();
        assert_eq!(merged, vec![line("PROD001", 2), line("PROD003", 5)]);
    }

    #[test]
    fn rejects_lines_that_can_never_apply() {
        let cases: [(Vec<(&str, i32)>, &str); 5] = [
            (vec![], "no items"),
            (vec![("", 1)], "no product_id"),
            (vec![("PROD001", 0)], "must be positive, got 0"),
            (vec![("PROD001", -2)], "must be positive, got -2"),
            (vec![("PROD001", i32::MAX), ("PROD001", 1)], "overflows"),
        ];
        for (lines, expected) in cases {
            let err = merge_lines(lines.clone()).unwrap_err().0;
            assert!(
                err.contains(expected),
                "{lines:?}: {err:?} should say {expected:?}"
            );
        }
    }

    #[test]
    fn reserves_when_every_line_fits_exactly_or_better() {
        let lines = [line("PROD001", 2), line("PROD002", 3)];
        let levels = stock(&[("PROD001", 2), ("PROD002", 10)]);
        assert_eq!(decide(&lines, &levels), Decision::Reserve);
    }

    #[test]
    fn rejects_all_or_nothing_naming_each_short_product() {
        let levels = stock(&[("PROD001", 100), ("PROD020", 3), ("PROD021", 0)]);
        assert_eq!(
            decide(&[line("PROD001", 1), line("PROD020", 5)], &levels),
            Decision::Reject("out of stock: PROD020 (requested 5, available 3)".into())
        );
        assert_eq!(
            decide(&[line("PROD020", 5), line("PROD021", 1)], &levels),
            Decision::Reject(
                "out of stock: PROD020 (requested 5, available 3), \
                 PROD021 (requested 1, available 0)"
                    .into()
            )
        );
    }

    #[test]
    fn rejects_unknown_products() {
        let levels = stock(&[("PROD020", 3)]);
        assert_eq!(
            decide(&[line("PROD999", 1)], &levels),
            Decision::Reject("unknown product PROD999".into())
        );
        assert_eq!(
            decide(
                &[line("PROD020", 4), line("PROD998", 1), line("PROD999", 1)],
                &levels
            ),
            Decision::Reject(
                "unknown products PROD998, PROD999; \
                 out of stock: PROD020 (requested 4, available 3)"
                    .into()
            )
        );
    }

    #[test]
    fn shelf_decides_a_run_as_one_order_after_another() {
        let levels = stock(&[("PROD001", 10), ("PROD020", 3)]);
        let mut shelf = Shelf::new(levels.clone());
        let orders = [
            vec![line("PROD020", 2)],
            vec![line("PROD001", 4), line("PROD020", 2)], // 1 left: all or nothing
            vec![line("PROD001", 4)],
            vec![line("PROD020", 1)], // the rejection above took nothing
            vec![line("PROD001", 7), line("PROD999", 1)],
            vec![line("PROD001", 6)],
            vec![line("PROD001", 1)],
        ];
        // The oracle: each order decided against the levels the ones
        // before it left, one at a time.
        let mut sequential = levels;
        let mut decisions = Vec::new();
        for lines in &orders {
            let expected = decide(lines, &sequential);
            if expected == Decision::Reserve {
                for l in lines {
                    *sequential.get_mut(&l.product_id).unwrap() -= i64::from(l.quantity);
                }
            }
            let got = shelf.reserve(lines);
            assert_eq!(got, expected, "{lines:?}");
            decisions.push(got);
        }
        assert_eq!(
            decisions[1],
            Decision::Reject("out of stock: PROD020 (requested 2, available 1)".into())
        );
        assert_eq!(
            decisions[4],
            Decision::Reject(
                "unknown product PROD999; out of stock: PROD001 (requested 7, available 6)".into()
            )
        );
        assert_eq!(
            decisions[6],
            Decision::Reject("out of stock: PROD001 (requested 1, available 0)".into())
        );
        assert_eq!(shelf.taken(), vec![("PROD001", 10), ("PROD020", 3)]);
        assert_eq!(sequential, stock(&[("PROD001", 0), ("PROD020", 0)]));
    }

    #[test]
    fn shelf_takes_nothing_for_rejections() {
        let mut shelf = Shelf::new(stock(&[("PROD001", 1)]));
        assert!(matches!(
            shelf.reserve(&[line("PROD001", 2)]),
            Decision::Reject(_)
        ));
        assert!(matches!(
            shelf.reserve(&[line("PROD404", 1)]),
            Decision::Reject(_)
        ));
        assert!(shelf.taken().is_empty());
    }

    #[test]
    fn stock_api_input() {
        assert_eq!(product_id(" PROD001 "), Ok("PROD001"));
        assert!(product_id("  ").unwrap_err().0.contains("required"));
        assert!(
            product_id(&"P".repeat(65))
                .unwrap_err()
                .0
                .contains("longer")
        );
        assert_eq!(available(0), Ok(0));
        assert_eq!(available(MAX_AVAILABLE), Ok(MAX_AVAILABLE));
        assert!(available(-1).unwrap_err().0.contains("negative"));
        assert!(
            available(MAX_AVAILABLE + 1)
                .unwrap_err()
                .0
                .contains("at most")
        );
    }
}
