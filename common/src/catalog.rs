//! The product fixture (`fixtures/catalog.csv`) both order (names, prices)
//! and inventory (initial stock) seed from at first start, so the two
//! databases start out describing the same products.

const CSV: &str = include_str!("../../fixtures/catalog.csv");

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Product {
    pub product_id: String,
    pub name: String,
    pub currency: String,
    pub price_units: i64,
    pub initial_stock: i64,
}

/// The products of the fixture. Panics on a malformed fixture: it is part
/// of the binary, and a unit test parses it.
#[must_use]
pub fn products() -> Vec<Product> {
    CSV.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            assert_eq!(f.len(), 5, "fixtures/catalog.csv: bad line {line:?}");
            Product {
                product_id: f[0].to_owned(),
                name: f[1].to_owned(),
                currency: f[2].to_owned(),
                price_units: f[3].parse().expect("price_units is an integer"),
                initial_stock: f[4].parse().expect("initial_stock is an integer"),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn fixture_has_the_original_products() {
        let products = super::products();
        assert!(products.len() >= 20);
        for i in 1..=20 {
            let id = format!("PROD{i:03}");
            assert!(products.iter().any(|p| p.product_id == id), "{id} missing");
        }
        assert!(
            products
                .iter()
                .all(|p| p.price_units > 0 && p.initial_stock >= 0)
        );
        assert!(
            products.iter().any(|p| p.initial_stock < 10),
            "some stock is small"
        );
    }
}
