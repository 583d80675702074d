//! The error every operation of the shop answers with: a stable code per case, mapped by
//! the edge onto HTTP statuses. Internals are carried for logs, never shown to clients.

use crate::domain::Money;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ShopError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("not allowed in status {status}")]
    InvalidState { status: String },
    #[error("{0}")]
    InvalidStateMsg(String),
    #[error("expected version {current}")]
    VersionConflict { current: u64 },
    #[error("sku {sku_id} is out of stock (available {available})")]
    OutOfStock { sku_id: String, available: u64 },
    #[error("insufficient stock (available {available})")]
    InsufficientStock { available: u64 },
    #[error("amount does not match the order total {} {}", expected.amount, expected.currency)]
    AmountMismatch { expected: Money },
    #[error("this Idempotency-Key was used with another request body")]
    IdempotencyConflict,
    #[error("a request with this Idempotency-Key is still in progress")]
    IdempotencyInFlight,
    #[error("campaign {0} is sold out")]
    SoldOut(String),
    #[error("campaign {0} has not started")]
    CampaignNotStarted(String),
    #[error("campaign {0} has ended")]
    CampaignEnded(String),
    #[error("the per-buyer limit of this campaign is {limit}; this buyer already holds {held}")]
    LimitExceeded { limit: u64, held: u64 },
    /// Too many requests are queued for one entity: retry after a moment.
    #[error("too many requests for {0}; retry shortly")]
    Overloaded(String),
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ShopError {
    /// The stable code clients see (API.md, Conventions).
    pub fn code(&self) -> &'static str {
        match self {
            ShopError::BadRequest(_) => "bad_request",
            ShopError::NotFound(_) => "not_found",
            ShopError::AlreadyExists(_) => "already_exists",
            ShopError::InvalidState { .. } | ShopError::InvalidStateMsg(_) => "invalid_state",
            ShopError::VersionConflict { .. } => "version_conflict",
            ShopError::OutOfStock { .. } => "out_of_stock",
            ShopError::InsufficientStock { .. } => "insufficient_stock",
            ShopError::AmountMismatch { .. } => "amount_mismatch",
            ShopError::IdempotencyConflict | ShopError::IdempotencyInFlight => {
                "idempotency_conflict"
            }
            ShopError::SoldOut(_) => "sold_out",
            ShopError::CampaignNotStarted(_) => "campaign_not_started",
            ShopError::CampaignEnded(_) => "campaign_ended",
            ShopError::LimitExceeded { .. } => "limit_exceeded",
            ShopError::Overloaded(_) => "overloaded",
            ShopError::Unavailable(_) => "unavailable",
            ShopError::Internal(_) => "internal",
        }
    }
}

pub type Result<T, E = ShopError> = std::result::Result<T, E>;
