//! Orders: checkout, payment, the order lifecycle, and the payment provider's callback.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use shardmall_actors::domain::order::{Order, OrderState, Shipment};

use crate::auth::{Caller, Role};
use crate::dto::*;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiQuery, IdPath, RawBody};
use crate::{idem, validate, AppState};

/// The order, if this caller may see it. A customer asking for another's order gets the
/// same 404 as for an order that does not exist.
async fn visible_order(
    st: &AppState,
    caller: &Caller,
    id: &str,
    roles: &[Role],
) -> ApiResult<Order> {
    caller.require(roles)?;
    let order = st.shop.get_order(id).await?;
    if caller.role == Role::Customer && order.buyer != caller.sub {
        return Err(ApiError::not_found(format!("order {id} not found")));
    }
    Ok(order)
}

#[utoipa::path(post, path = "/v1/orders", request_body = NewOrder, params(("Idempotency-Key" = String, Header)), responses((status = 201, body = OrderBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn create_order(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body, raw): ApiJson<NewOrder>,
) -> Response {
    let checked = (|| -> ApiResult<_> {
        caller.require(&[Role::Customer])?;
        let items = match (body.items, body.from_cart) {
            (Some(_), true) => {
                return Err(ApiError::bad_request(
                    "give either items or from_cart, not both",
                ))
            }
            (None, false) => return Err(ApiError::bad_request("give items or from_cart: true")),
            (None, true) => None,
            (Some(items), false) => {
                if items.is_empty() || items.len() > validate::MAX_LIST {
                    return Err(ApiError::bad_request("an order has 1 to 100 items"));
                }
                let mut out = Vec::with_capacity(items.len());
                for i in items {
                    validate::id("sku_id", &i.sku_id)?;
                    out.push((i.sku_id, validate::quantity("quantity", i.quantity)?));
                }
                Some(out)
            }
        };
        let address = Some(body.shipping_address.into_domain()?);
        Ok((items, address))
    })();
    let (items, address) = match checked {
        Ok(v) => v,
        Err(e) => return axum::response::IntoResponse::into_response(e),
    };
    let (shop, buyer) = (st.shop.clone(), caller.sub.clone());
    idem::run(
        &st,
        &caller,
        "POST /v1/orders",
        &headers,
        &raw,
        StatusCode::CREATED,
        |answer| async move { Ok(shop.checkout(&buyer, items, address, Some(answer)).await?) },
    )
    .await
}

#[utoipa::path(get, path = "/v1/orders/{order_id}", params(("order_id" = String, Path)), responses((status = 200, body = OrderBody), (status = 404, body = crate::error::ErrorBody)))]
// PerformanceCriticalPath: buyers poll their orders.
pub async fn get_order(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
) -> ApiResult<Response> {
    const ROLES: &[Role] = &[Role::Customer, Role::Admin];
    // An active order: its published copy, rendered once per state and shared by every
    // read of that state (ADR 0014).
    if let Some(copy) = st.shop.copy_of::<OrderState>(&id) {
        if let Some(order) = copy.view.as_ref() {
            caller.require(ROLES)?;
            if caller.role == Role::Customer && order.buyer != caller.sub {
                return Err(ApiError::not_found(format!("order {id} not found")));
            }
            let body = copy.rendered(|_| order_json(order));
            return Ok(json_response(StatusCode::OK, body));
        }
    }
    let order = visible_order(&st, &caller, &id, ROLES).await?;
    Ok(json_response(StatusCode::OK, order_json(&order)))
}

#[utoipa::path(get, path = "/v1/orders", params(("status" = Option<String>, Query), ("limit" = Option<usize>, Query), ("cursor" = Option<String>, Query)), responses((status = 200, body = List<OrderBody>)))]
pub async fn list_my_orders(
    State(st): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<List<OrderBody>>> {
    caller.require(&[Role::Customer, Role::Admin])?;
    let status = q.status.as_deref().map(parse_status).transpose()?;
    let page = st
        .shop
        .list_orders(Some(&caller.sub), status, q.limit()?, q.cursor()?)
        .await?;
    Ok(Json(List::from_page(&page, |p| p.into())))
}

#[utoipa::path(get, path = "/v1/admin/orders", params(("status" = Option<String>, Query), ("buyer" = Option<String>, Query), ("limit" = Option<usize>, Query), ("cursor" = Option<String>, Query)), responses((status = 200, body = List<OrderBody>)))]
pub async fn admin_orders(
    State(st): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<List<OrderBody>>> {
    caller.require(&[Role::Admin])?;
    let status = q.status.as_deref().map(parse_status).transpose()?;
    if let Some(b) = &q.buyer {
        validate::id("buyer", b)?;
    }
    let page = st
        .shop
        .list_orders(q.buyer.as_deref(), status, q.limit()?, q.cursor()?)
        .await?;
    Ok(Json(List::from_page(&page, |p| p.into())))
}

#[utoipa::path(post, path = "/v1/orders/{order_id}/pay", request_body = Payment, params(("order_id" = String, Path), ("Idempotency-Key" = String, Header)), responses((status = 200, body = OrderBody), (status = 422, body = crate::error::ErrorBody)))]
pub async fn pay(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
    headers: HeaderMap,
    ApiJson(body, raw): ApiJson<Payment>,
) -> Response {
    idem::run(
        &st,
        &caller,
        &format!("POST /v1/orders/{id}/pay"),
        &headers,
        &raw,
        StatusCode::OK,
        |answer| {
            let (st, caller, id) = (st.clone(), caller.clone(), id.clone());
            async move {
                visible_order(&st, &caller, &id, &[Role::Customer]).await?;
                if body.method != "fake" {
                    return Err(ApiError::bad_request(
                    "method must be \"fake\"; real providers report through /v1/payments/callback",
                ));
                }
                let amount = body.amount.into_domain("amount")?;
                Ok(st.shop.pay(&id, amount, Some(answer)).await?)
            }
        },
    )
    .await
}

#[utoipa::path(post, path = "/v1/orders/{order_id}/cancel", params(("order_id" = String, Path)), responses((status = 200, body = OrderBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn cancel(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
) -> ApiResult<Json<OrderBody>> {
    visible_order(&st, &caller, &id, &[Role::Customer, Role::Admin]).await?;
    Ok(Json(
        (&st.shop.cancel(&id, caller.role == Role::Admin).await?).into(),
    ))
}

#[utoipa::path(post, path = "/v1/orders/{order_id}/ship", params(("order_id" = String, Path)), request_body = ShipRequest, responses((status = 200, body = OrderBody)))]
pub async fn ship(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
    ApiJson(body, _): ApiJson<ShipRequest>,
) -> ApiResult<Json<OrderBody>> {
    caller.require(&[Role::Admin])?;
    validate::required_text("carrier", &body.carrier, 128)?;
    validate::required_text("tracking_no", &body.tracking_no, 128)?;
    let shipment = Shipment {
        carrier: body.carrier,
        tracking_no: body.tracking_no,
    };
    Ok(Json(
        (&st.shop.ship(&id, shipment, body.expected_version).await?).into(),
    ))
}

#[utoipa::path(post, path = "/v1/orders/{order_id}/confirm-receipt", params(("order_id" = String, Path)), responses((status = 200, body = OrderBody)))]
pub async fn confirm_receipt(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
) -> ApiResult<Json<OrderBody>> {
    visible_order(&st, &caller, &id, &[Role::Customer]).await?;
    Ok(Json((&st.shop.confirm_receipt(&id).await?).into()))
}

#[utoipa::path(post, path = "/v1/orders/{order_id}/refund", params(("order_id" = String, Path)), request_body = RefundRequest, responses((status = 200, body = OrderBody)))]
pub async fn request_refund(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
    ApiJson(body, _): ApiJson<RefundRequest>,
) -> ApiResult<Json<OrderBody>> {
    validate::required_text("reason", &body.reason, validate::MAX_TEXT)?;
    visible_order(&st, &caller, &id, &[Role::Customer]).await?;
    Ok(Json(
        (&st.shop.request_refund(&id, body.reason).await?).into(),
    ))
}

#[utoipa::path(post, path = "/v1/orders/{order_id}/refund/approve", params(("order_id" = String, Path)), request_body = RefundApproval, responses((status = 200, body = OrderBody)))]
pub async fn approve_refund(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
    ApiJson(body, _): ApiJson<RefundApproval>,
) -> ApiResult<Json<OrderBody>> {
    caller.require(&[Role::Admin])?;
    Ok(Json(
        (&st.shop.approve_refund(&id, body.restock).await?).into(),
    ))
}

#[utoipa::path(post, path = "/v1/orders/{order_id}/refund/reject", params(("order_id" = String, Path)), request_body = RefundRejection, responses((status = 200, body = OrderBody)))]
pub async fn reject_refund(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
    ApiJson(body, _): ApiJson<RefundRejection>,
) -> ApiResult<Json<OrderBody>> {
    caller.require(&[Role::Admin])?;
    validate::required_text("reason", &body.reason, validate::MAX_TEXT)?;
    Ok(Json(
        (&st.shop.reject_refund(&id, body.reason).await?).into(),
    ))
}

#[utoipa::path(patch, path = "/v1/orders/{order_id}", params(("order_id" = String, Path)), request_body = OrderPatch, responses((status = 200, body = OrderBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn patch_order(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
    ApiJson(body, _): ApiJson<OrderPatch>,
) -> ApiResult<Json<OrderBody>> {
    caller.require(&[Role::Admin])?;
    let address = body
        .shipping_address
        .map(Address::into_domain)
        .transpose()?;
    let shipment = match body.shipment {
        Some(s) => {
            validate::required_text("carrier", &s.carrier, 128)?;
            validate::required_text("tracking_no", &s.tracking_no, 128)?;
            Some(Shipment {
                carrier: s.carrier,
                tracking_no: s.tracking_no,
            })
        }
        None => None,
    };
    Ok(Json(
        (&st.shop
            .patch_order(&id, address, shipment, body.expected_version)
            .await?)
            .into(),
    ))
}

#[utoipa::path(post, path = "/v1/payments/callback", request_body = PaymentCallback, params(("X-Signature" = String, Header)), responses((status = 200, body = OrderBody), (status = 401, body = crate::error::ErrorBody)))]
pub async fn payment_callback(
    State(st): State<AppState>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> ApiResult<Json<OrderBody>> {
    let secret = st
        .payment_secret
        .as_deref()
        .ok_or_else(|| ApiError::unavailable("no payment secret is configured"))?;
    let sig = headers
        .get("x-signature")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| hex::decode(v.trim()).ok())
        .ok_or_else(|| ApiError::unauthorized("missing or malformed X-Signature"))?;
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(&body);
    mac.verify_slice(&sig)
        .map_err(|_| ApiError::unauthorized("bad signature"))?;
    let cb: PaymentCallback = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    validate::id("payment_id", &cb.payment_id)?;
    validate::id("order_id", &cb.order_id)?;
    let succeeded = match cb.status.as_str() {
        "succeeded" => true,
        "failed" => false,
        _ => return Err(ApiError::bad_request("status must be succeeded or failed")),
    };
    let amount = cb.amount.into_domain("amount")?;
    let order = st
        .shop
        .payment_callback(&cb.payment_id, &cb.order_id, amount, succeeded)
        .await?;
    Ok(Json((&order).into()))
}
