//! Maps each entity's refusals onto the shop's error, naming the entity concerned.

use crate::domain::campaign::CampaignError;
use crate::domain::cart::CartError;
use crate::domain::idempotency::IdemError;
use crate::domain::order::OrderError;
use crate::domain::product::ProductError;
use crate::domain::sku::SkuError;
use crate::error::{Result, ShopError};
use crate::host::Refusal;
use crate::shop::IdemStart;

fn unavailable<E>(r: Refusal<E>, map: impl FnOnce(E) -> ShopError) -> ShopError {
    match r {
        Refusal::Domain(e) => map(e),
        Refusal::Unavailable(why) => ShopError::Unavailable(why),
        Refusal::Overloaded(what) => ShopError::Overloaded(what),
        Refusal::Moved => ShopError::Unavailable(MOVING.into()),
    }
}

/// What a caller hears when a partition stayed in handoff for all its retries.
pub const MOVING: &str = "the entity's partition is moving between nodes; retry shortly";

pub fn campaign_err(r: Refusal<CampaignError>, id: &str) -> ShopError {
    unavailable(r, |e| match e {
        CampaignError::NotFound => ShopError::NotFound(format!("campaign {id}")),
        CampaignError::AlreadyExists => ShopError::AlreadyExists(format!("campaign {id}")),
        CampaignError::NotStarted => ShopError::CampaignNotStarted(id.to_owned()),
        CampaignError::Ended => ShopError::CampaignEnded(id.to_owned()),
        CampaignError::SoldOut => ShopError::SoldOut(id.to_owned()),
        CampaignError::LimitExceeded { limit, held } => ShopError::LimitExceeded { limit, held },
        CampaignError::ClaimGone => ShopError::InvalidStateMsg(format!(
            "the order's claim on campaign {id} has expired; the order cannot be paid"
        )),
        CampaignError::InvalidState(msg) => {
            ShopError::InvalidStateMsg(format!("campaign {id}: {msg}"))
        }
        CampaignError::BadRequest(msg) => ShopError::BadRequest(msg),
        CampaignError::IdempotencyConflict => ShopError::IdempotencyConflict,
    })
}

pub fn product_err(r: Refusal<ProductError>, id: &str) -> ShopError {
    unavailable(r, |e| match e {
        ProductError::NotFound => ShopError::NotFound(format!("product {id}")),
        ProductError::AlreadyExists => ShopError::AlreadyExists(format!("product {id}")),
    })
}

pub fn sku_err(r: Refusal<SkuError>, id: &str) -> ShopError {
    unavailable(r, |e| match e {
        SkuError::NotFound => ShopError::NotFound(format!("sku {id}")),
        SkuError::AlreadyExists => ShopError::AlreadyExists(format!("sku {id}")),
        SkuError::InsufficientStock { available } => ShopError::InsufficientStock { available },
        SkuError::OutOfStock { available } => ShopError::OutOfStock {
            sku_id: id.to_owned(),
            available,
        },
        SkuError::InvalidState(msg) => ShopError::InvalidStateMsg(format!("sku {id}: {msg}")),
        SkuError::BadRequest(msg) => ShopError::BadRequest(format!("sku {id}: {msg}")),
    })
}

pub fn order_err(r: Refusal<OrderError>, id: &str) -> ShopError {
    unavailable(r, |e| match e {
        OrderError::NotFound => ShopError::NotFound(format!("order {id}")),
        OrderError::AlreadyExists => ShopError::AlreadyExists(format!("order {id}")),
        OrderError::InvalidState { status } => ShopError::InvalidState {
            status: status.as_str().to_owned(),
        },
        OrderError::AmountMismatch { expected } => ShopError::AmountMismatch { expected },
        OrderError::VersionConflict { current } => ShopError::VersionConflict { current },
        OrderError::BadRequest(msg) => ShopError::BadRequest(msg),
    })
}

pub fn cart_err(r: Refusal<CartError>) -> ShopError {
    unavailable(r, |e| ShopError::BadRequest(e.to_string()))
}

pub fn idem_err(e: IdemError) -> Result<IdemStart> {
    match e {
        IdemError::Conflict => Err(ShopError::IdempotencyConflict),
        IdemError::InFlight => Err(ShopError::IdempotencyInFlight),
        IdemError::Replay(stored) => Ok(IdemStart::Replay(stored)),
    }
}
