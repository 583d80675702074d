//! Flash-sale campaigns: create, read with live figures, list, end, buy.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use shardmall_actors::clock::system_ms;
use shardmall_actors::domain::campaign::{CampaignState, CampaignStatus, CampaignView};
use shardmall_actors::domain::Millis;
use shardmall_actors::NewCampaign as ShopCampaign;

use crate::auth::{Caller, Role};
use crate::dto::*;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiQuery, IdPath, IdemKeyHeader};
use crate::{idem, validate, AppState};

/// The longest payment timeout a campaign may set.
const MAX_PAYMENT_TIMEOUT_SECS: i64 = 7 * 24 * 3600;
/// The longest per-buyer limit (a quantity bound like an order line's).
const MAX_PER_BUYER: i64 = validate::MAX_QUANTITY as i64;

#[utoipa::path(post, path = "/v1/campaigns", request_body = NewCampaign, responses((status = 201, body = CampaignBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn create_campaign(
    State(st): State<AppState>,
    caller: Caller,
    ApiJson(body, _): ApiJson<NewCampaign>,
) -> ApiResult<(StatusCode, Json<CampaignBody>)> {
    caller.require(&[Role::Admin])?;
    let campaign_id = match body.campaign_id {
        Some(id) => {
            validate::id("campaign_id", &id)?;
            id
        }
        None => generated_id(),
    };
    validate::id("sku_id", &body.sku_id)?;
    if !(1..=validate::MAX_STOCK as i64).contains(&body.quantity) {
        return Err(ApiError::bad_request(format!(
            "quantity must be between 1 and {}",
            validate::MAX_STOCK
        )));
    }
    let per_buyer_limit = body.per_buyer_limit.unwrap_or(1);
    if !(1..=MAX_PER_BUYER).contains(&per_buyer_limit) {
        return Err(ApiError::bad_request(format!(
            "per_buyer_limit must be between 1 and {MAX_PER_BUYER}"
        )));
    }
    let payment_timeout = match body.payment_timeout_secs {
        None => None,
        Some(s) if (1..=MAX_PAYMENT_TIMEOUT_SECS).contains(&s) => {
            Some(std::time::Duration::from_secs(s as u64))
        }
        Some(_) => {
            return Err(ApiError::bad_request(format!(
                "payment_timeout_secs must be between 1 and {MAX_PAYMENT_TIMEOUT_SECS}"
            )))
        }
    };
    let starts_at = body
        .starts_at
        .as_deref()
        .map(|s| parse_time("starts_at", s))
        .transpose()?;
    let ends_at = parse_time("ends_at", &body.ends_at)?;
    let input = ShopCampaign {
        campaign_id,
        sku_id: body.sku_id,
        price: body.price.into_domain("price")?,
        quantity: body.quantity as u64,
        starts_at,
        ends_at,
        per_buyer_limit: per_buyer_limit as u64,
        payment_timeout,
    };
    let view = st.shop.create_campaign(input).await?;
    Ok((
        StatusCode::CREATED,
        Json(CampaignBody::new(&view, st.shop.now_ms())),
    ))
}

/// `c` + the creation time in ms + a per-process sequence: unique on one node and
/// sortable by creation time.
fn generated_id() -> String {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("c{:012x}{:08x}", system_ms(), seq)
}

#[utoipa::path(get, path = "/v1/campaigns/{campaign_id}", params(("campaign_id" = String, Path)), responses((status = 200, body = CampaignBody), (status = 404, body = crate::error::ErrorBody)))]
// PerformanceCriticalPath: buyers refresh a campaign's page during the sale.
pub async fn get_campaign(
    State(st): State<AppState>,
    _caller: Caller,
    IdPath(id): IdPath,
) -> ApiResult<Response> {
    let now = st.shop.now_ms();
    // An active campaign: its published copy, rendered once per state and status (the
    // body shows the status at `now`, ADR 0014).
    if let Some(copy) = st.shop.copy_of::<CampaignState>(&id) {
        if let Some(view) = copy.view.as_ref() {
            let status = view.status(now) as u64;
            let body = copy.rendered_as(status, |_| campaign_json(view, now));
            return Ok(json_response(StatusCode::OK, body));
        }
    }
    let view = st.shop.get_campaign(&id).await?;
    Ok(json_response(StatusCode::OK, campaign_json(&view, now)))
}

fn campaign_json(view: &CampaignView, now: Millis) -> Vec<u8> {
    serde_json::to_vec(&CampaignBody::new(view, now)).unwrap_or_default()
}

#[utoipa::path(get, path = "/v1/campaigns", params(("status" = Option<String>, Query), ("limit" = Option<usize>, Query), ("cursor" = Option<String>, Query)), responses((status = 200, body = List<CampaignBody>)))]
pub async fn list_campaigns(
    State(st): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<List<CampaignBody>>> {
    caller.require(&[Role::Admin])?;
    let status = q
        .status
        .as_deref()
        .map(|s| {
            CampaignStatus::parse(s).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "unknown campaign status {s:?} (scheduled, live, sold_out, ended)"
                ))
            })
        })
        .transpose()?;
    let page = st
        .shop
        .list_campaigns(status, q.limit()?, q.cursor()?)
        .await?;
    let now = st.shop.now_ms();
    Ok(Json(List::from_page(&page, |v| CampaignBody::new(v, now))))
}

#[utoipa::path(post, path = "/v1/campaigns/{campaign_id}/end", params(("campaign_id" = String, Path)), responses((status = 200, body = CampaignBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn end_campaign(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
) -> ApiResult<Json<CampaignBody>> {
    caller.require(&[Role::Admin])?;
    let view = st.shop.end_campaign(&id).await?;
    Ok(Json(CampaignBody::new(&view, st.shop.now_ms())))
}

#[utoipa::path(post, path = "/v1/campaigns/{campaign_id}/buy", request_body = BuyRequest, params(("campaign_id" = String, Path), ("Idempotency-Key" = Option<String>, Header)), responses((status = 201, body = OrderBody), (status = 409, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody)))]
pub async fn buy(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
    IdemKeyHeader(idem_key): IdemKeyHeader,
    ApiJson(body, raw): ApiJson<BuyRequest>,
) -> Response {
    let checked = (|| -> ApiResult<_> {
        caller.require(&[Role::Customer])?;
        let quantity = validate::quantity("quantity", body.quantity)?;
        let address = body
            .shipping_address
            .map(Address::into_domain)
            .transpose()?;
        Ok((quantity, address))
    })();
    let (quantity, address) = match checked {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    // The campaign keeps the key with the buy itself: one durable record answers both
    // (ADR 0012). A refused buy writes nothing, so a repeat of it is decided afresh.
    // Required, like checkout's and pay's: a buy retried after a lost answer must not
    // buy twice.
    let idem = match idem_key {
        Ok(Some(k)) => Some(idem::tag(
            &caller,
            &format!("POST /v1/campaigns/{id}/buy"),
            &k,
            &raw,
        )),
        Ok(None) => return ApiError::idempotency_key_required().into_response(),
        Err(e) => return e.into_response(),
    };
    match st
        .shop
        .buy_keyed(&id, &caller.sub, quantity, address, idem)
        .await
    {
        Ok(bought) => {
            let mut resp =
                (StatusCode::CREATED, Json(OrderBody::from(&bought.order))).into_response();
            if bought.replayed {
                idem::mark_replayed(&mut resp);
            }
            resp
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}
