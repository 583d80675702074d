//! The ceiling of the edge, for side-by-side benchmarks: an axum server on the same
//! runtime settings as `shardmall serve`, whose handlers do the least a real one must.
//!
//! - `POST /v1/campaigns/{id}/buy` parses the buy's JSON body and answers 201 with a
//!   small JSON body;
//! - `GET /healthz` and `GET /get` answer 200 with a small JSON body.
//!
//! Usage: `noop_edge ADDR` (for example `127.0.0.1:0`); prints `listening on ADDR`.

use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

#[derive(Deserialize)]
#[allow(dead_code)]
struct Buy {
    quantity: i64,
    #[serde(default)]
    shipping_address: Option<serde_json::Value>,
}

async fn buy(
    Path(id): Path<String>,
    Json(body): Json<Buy>,
) -> (StatusCode, Json<serde_json::Value>) {
    (
        StatusCode::CREATED,
        Json(
            serde_json::json!({"campaign_id": id, "quantity": body.quantity, "status": "pending_payment"}),
        ),
    )
}

async fn ok() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        println!("listening on {}", listener.local_addr()?);
        let app = Router::new()
            .route("/v1/campaigns/{id}/buy", post(buy))
            .route("/healthz", get(ok))
            .route("/get", get(ok));
        axum::serve(listener, app).await
    })
}
