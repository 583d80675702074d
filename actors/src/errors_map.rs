//! Maps each entity's refusals onto the shop's error, naming the entity concerned.

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
    }
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
