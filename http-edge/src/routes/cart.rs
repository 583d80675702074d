//! The cart of the token's subject.

use axum::extract::State;
use axum::Json;

use crate::auth::{Caller, Role};
use crate::dto::{Cart, CartItemPut};
use crate::error::ApiResult;
use crate::extract::{ApiJson, IdPath};
use crate::validate;
use crate::AppState;

#[utoipa::path(get, path = "/v1/cart", responses((status = 200, body = Cart)))]
pub async fn get_cart(State(st): State<AppState>, caller: Caller) -> ApiResult<Json<Cart>> {
    caller.require(&[Role::Customer])?;
    Ok(Json(Cart::from_lines(
        &st.shop.get_cart(&caller.sub).await?,
    )?))
}

#[utoipa::path(put, path = "/v1/cart/items/{sku_id}", params(("sku_id" = String, Path)), request_body = CartItemPut, responses((status = 200, body = Cart)))]
pub async fn put_item(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(sku): IdPath,
    ApiJson(body, _): ApiJson<CartItemPut>,
) -> ApiResult<Json<Cart>> {
    caller.require(&[Role::Customer])?;
    let quantity = if body.quantity == 0 {
        0
    } else {
        validate::quantity("quantity", body.quantity)?
    };
    Ok(Json(Cart::from_lines(
        &st.shop.set_cart_item(&caller.sub, &sku, quantity).await?,
    )?))
}

#[utoipa::path(delete, path = "/v1/cart/items/{sku_id}", params(("sku_id" = String, Path)), responses((status = 200, body = Cart)))]
pub async fn delete_item(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(sku): IdPath,
) -> ApiResult<Json<Cart>> {
    caller.require(&[Role::Customer])?;
    Ok(Json(Cart::from_lines(
        &st.shop.remove_cart_item(&caller.sub, &sku).await?,
    )?))
}
