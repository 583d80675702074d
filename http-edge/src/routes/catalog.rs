//! Catalog: products and SKUs.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use shardmall_actors::domain::sku::{SkuState, SkuView};
use shardmall_actors::domain::ProductStatus;
use shardmall_actors::{NewProduct as ShopProduct, NewSku as ShopSku};

use crate::auth::{Caller, Role};
use crate::dto::*;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiQuery, IdPath};
use crate::validate;
use crate::AppState;

fn product_status(s: &str) -> ApiResult<ProductStatus> {
    ProductStatus::parse(s)
        .ok_or_else(|| ApiError::bad_request("status must be draft, on_shelf or off_shelf"))
}

#[utoipa::path(post, path = "/v1/products", request_body = NewProduct, responses((status = 201, body = Product), (status = 409, body = crate::error::ErrorBody)))]
pub async fn create_product(
    State(st): State<AppState>,
    caller: Caller,
    ApiJson(body, _): ApiJson<NewProduct>,
) -> ApiResult<(StatusCode, Json<Product>)> {
    caller.require(&[Role::Admin])?;
    validate::id("product_id", &body.product_id)?;
    validate::required_text("title", &body.title, validate::MAX_TEXT)?;
    validate::text("category", &body.category, 128)?;
    validate::text("brand", &body.brand, 128)?;
    validate::text("description", &body.description, validate::MAX_DESCRIPTION)?;
    if body.skus.is_empty() || body.skus.len() > validate::MAX_LIST {
        return Err(ApiError::bad_request("a product has 1 to 100 skus"));
    }
    let status = body
        .status
        .as_deref()
        .map(product_status)
        .transpose()?
        .unwrap_or(ProductStatus::OnShelf);
    let mut skus = Vec::with_capacity(body.skus.len());
    let mut seen = std::collections::BTreeSet::new();
    for s in body.skus {
        validate::id("sku_id", &s.sku_id)?;
        if !seen.insert(s.sku_id.clone()) {
            return Err(ApiError::bad_request(format!(
                "sku {} appears twice",
                s.sku_id
            )));
        }
        validate::required_text("sku name", &s.name, validate::MAX_TEXT)?;
        if s.specs.len() > validate::MAX_SPECS {
            return Err(ApiError::bad_request("at most 32 specs per sku"));
        }
        for (k, v) in &s.specs {
            validate::required_text("spec name", k, 64)?;
            validate::text("spec value", v, 256)?;
        }
        if !(0..=validate::MAX_STOCK as i64).contains(&s.stock) {
            return Err(ApiError::bad_request(format!(
                "stock must be between 0 and {}",
                validate::MAX_STOCK
            )));
        }
        let threshold = s.low_stock_threshold.unwrap_or(0);
        if !(0..=validate::MAX_STOCK as i64).contains(&threshold) {
            return Err(ApiError::bad_request("low_stock_threshold is out of range"));
        }
        skus.push(ShopSku {
            sku_id: s.sku_id,
            name: s.name,
            specs: s.specs,
            price: s.price.into_domain("price")?,
            market_price: s
                .market_price
                .map(|m| m.into_domain("market_price"))
                .transpose()?,
            stock: s.stock as u64,
            low_stock_threshold: threshold as u64,
        });
    }
    let detail = st
        .shop
        .create_product(ShopProduct {
            product_id: body.product_id,
            title: body.title,
            category: body.category,
            brand: body.brand,
            description: body.description,
            status,
            skus,
        })
        .await?;
    Ok((StatusCode::CREATED, Json((&detail).into())))
}

#[utoipa::path(get, path = "/v1/products/{product_id}", params(("product_id" = String, Path)), responses((status = 200, body = Product), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get_product(
    State(st): State<AppState>,
    IdPath(id): IdPath,
) -> ApiResult<Json<Product>> {
    Ok(Json((&st.shop.get_product(&id).await?).into()))
}

#[utoipa::path(get, path = "/v1/products", params(("category" = Option<String>, Query), ("limit" = Option<usize>, Query), ("cursor" = Option<String>, Query)), responses((status = 200, body = List<Product>)))]
pub async fn list_products(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<List<Product>>> {
    if let Some(c) = &q.category {
        validate::text("category", c, 128)?;
    }
    let page = st
        .shop
        .list_products(q.category.as_deref(), q.limit()?, q.cursor()?)
        .await?;
    Ok(Json(List::from_page(&page, |p| p.into())))
}

#[utoipa::path(patch, path = "/v1/products/{product_id}", params(("product_id" = String, Path)), request_body = ProductPatch, responses((status = 200, body = Product)))]
pub async fn patch_product(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
    ApiJson(body, _): ApiJson<ProductPatch>,
) -> ApiResult<Json<Product>> {
    caller.require(&[Role::Admin])?;
    if let Some(t) = &body.title {
        validate::required_text("title", t, validate::MAX_TEXT)?;
    }
    if let Some(d) = &body.description {
        validate::text("description", d, validate::MAX_DESCRIPTION)?;
    }
    let status = body.status.as_deref().map(product_status).transpose()?;
    let detail = st
        .shop
        .update_product(&id, body.title, body.description, status)
        .await?;
    Ok(Json((&detail).into()))
}

#[utoipa::path(get, path = "/v1/skus/{sku_id}", params(("sku_id" = String, Path)), responses((status = 200, body = Sku), (status = 404, body = crate::error::ErrorBody)))]
// PerformanceCriticalPath: product pages read their SKUs.
pub async fn get_sku(State(st): State<AppState>, IdPath(id): IdPath) -> ApiResult<Response> {
    // An active SKU: its published copy, rendered once per state (ADR 0014).
    if let Some(copy) = st.shop.copy_of::<SkuState>(&id) {
        if let Some(sku) = copy.view.as_ref() {
            let body = copy.rendered(|_| sku_json(sku));
            return Ok(json_response(StatusCode::OK, body));
        }
    }
    Ok(json_response(
        StatusCode::OK,
        sku_json(&st.shop.get_sku(&id).await?),
    ))
}

fn sku_json(sku: &SkuView) -> Vec<u8> {
    serde_json::to_vec(&Sku::from(sku)).unwrap_or_default()
}

#[utoipa::path(post, path = "/v1/skus/{sku_id}/stock", params(("sku_id" = String, Path)), request_body = StockAdjustment, responses((status = 200, body = Sku), (status = 409, body = crate::error::ErrorBody)))]
pub async fn adjust_stock(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
    ApiJson(body, _): ApiJson<StockAdjustment>,
) -> ApiResult<Json<Sku>> {
    caller.require(&[Role::Admin])?;
    validate::required_text("reason", &body.reason, validate::MAX_TEXT)?;
    if body.delta.unsigned_abs() > validate::MAX_STOCK {
        return Err(ApiError::bad_request(format!(
            "delta must be within ±{}",
            validate::MAX_STOCK
        )));
    }
    Ok(Json(
        (&st.shop.adjust_stock(&id, body.delta, body.reason).await?).into(),
    ))
}

#[utoipa::path(put, path = "/v1/skus/{sku_id}/price", params(("sku_id" = String, Path)), request_body = PriceChange, responses((status = 200, body = Sku)))]
pub async fn set_price(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
    ApiJson(body, _): ApiJson<PriceChange>,
) -> ApiResult<Json<Sku>> {
    caller.require(&[Role::Admin])?;
    let price = body.price.into_domain("price")?;
    Ok(Json((&st.shop.set_price(&id, price).await?).into()))
}
