//! Value types shared by every entity: time, money, product status, postal address.
//!
//! They are stored in snapshots and events (bincode 2 + serde), so their layout is part of
//! the on-disk format: fields and variants are only ever appended.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// One hour in milliseconds.
pub const HOUR_MS: Millis = 3_600_000;
/// One day in milliseconds.
pub const DAY_MS: Millis = 24 * HOUR_MS;

/// An amount of money: an integer count of minor units (cents, fen) and an ISO 4217
/// currency code. Never a float.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    pub amount: i64,
    pub currency: String,
}

/// Why an arithmetic operation on [`Money`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum MoneyError {
    #[error("cannot combine amounts in {left} and {right}")]
    CurrencyMismatch { left: String, right: String },
    #[error("amount out of range")]
    Overflow,
}

impl Money {
    pub fn new(amount: i64, currency: impl Into<String>) -> Self {
        Self {
            amount,
            currency: currency.into(),
        }
    }

    /// Zero in `currency`.
    pub fn zero(currency: impl Into<String>) -> Self {
        Self::new(0, currency)
    }

    /// `self + other`; refuses mixed currencies and overflow instead of panicking.
    pub fn checked_add(&self, other: &Money) -> Result<Money, MoneyError> {
        if self.currency != other.currency {
            return Err(MoneyError::CurrencyMismatch {
                left: self.currency.clone(),
                right: other.currency.clone(),
            });
        }
        let amount = self
            .amount
            .checked_add(other.amount)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::new(amount, self.currency.clone()))
    }

    /// `self * factor` (a quantity); refuses overflow instead of panicking.
    pub fn checked_mul(&self, factor: u64) -> Result<Money, MoneyError> {
        let factor = i64::try_from(factor).map_err(|_| MoneyError::Overflow)?;
        let amount = self
            .amount
            .checked_mul(factor)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::new(amount, self.currency.clone()))
    }

    /// True for an amount a price may carry: not negative, with a currency.
    pub fn is_valid_price(&self) -> bool {
        self.amount >= 0 && !self.currency.is_empty()
    }
}

impl std::fmt::Display for Money {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.amount, self.currency)
    }
}

/// The status of a product (SPU); its SKUs carry a copy, so a SKU alone can refuse an
/// order for an `off_shelf` product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProductStatus {
    Draft,
    OnShelf,
    OffShelf,
}

impl ProductStatus {
    pub const ALL: [ProductStatus; 3] = [Self::Draft, Self::OnShelf, Self::OffShelf];

    /// The name clients see: `draft`, `on_shelf`, `off_shelf`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Draft => "draft",
            Self::OnShelf => "on_shelf",
            Self::OffShelf => "off_shelf",
        }
    }

    /// The inverse of [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl std::fmt::Display for ProductStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A shipping address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    pub name: String,
    pub phone: String,
    pub line1: String,
    pub city: String,
    pub country: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_add_refuses_mixed_currencies_and_overflow() {
        let a = Money::new(5, "CNY");
        assert_eq!(
            a.checked_add(&Money::new(7, "CNY")),
            Ok(Money::new(12, "CNY"))
        );
        assert!(matches!(
            a.checked_add(&Money::new(1, "USD")),
            Err(MoneyError::CurrencyMismatch { .. })
        ));
        assert_eq!(
            Money::new(i64::MAX, "CNY").checked_add(&a),
            Err(MoneyError::Overflow)
        );
    }

    #[test]
    fn money_mul_refuses_overflow() {
        let a = Money::new(3, "CNY");
        assert_eq!(a.checked_mul(4), Ok(Money::new(12, "CNY")));
        assert_eq!(a.checked_mul(u64::MAX), Err(MoneyError::Overflow));
        assert_eq!(
            Money::new(i64::MAX / 2 + 1, "CNY").checked_mul(2),
            Err(MoneyError::Overflow)
        );
    }

    #[test]
    fn product_status_round_trips() {
        for s in ProductStatus::ALL {
            assert_eq!(ProductStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(ProductStatus::parse("on-shelf"), None);
        assert_eq!(ProductStatus::OnShelf.to_string(), "on_shelf");
    }
}
