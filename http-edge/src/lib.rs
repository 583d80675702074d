//! The HTTP edge of a shardmall node.
//!
//! - [`routes`]: one module per API.md section; handlers validate input, check roles and
//!   call the [`Shop`](shardmall_actors::Shop).
//! - [`extract`] and [`error`]: every refusal, including malformed requests, leaves as
//!   `{"error":{"code","message"}}` with the status API.md gives its code.
//! - [`auth`]: bearer JWT (HS256) and roles; [`idem`]: `Idempotency-Key`.
//! - [`metrics`]: Prometheus text; requests are timed by route and status.
//!
//! A request flows: one middleware (header limit, request id, admission, metrics) ->
//! body limit -> route handler -> shop -> entity actors; the answer carries
//! `x-request-id`.

pub mod auth;
pub mod dto;
pub mod error;
pub mod extract;
pub mod idem;
pub mod metrics;
pub mod routes;
pub mod serve;
pub mod validate;

use std::convert::Infallible;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use shardmall_actors::Shop;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;

pub use auth::{Claims, JwtKeys, Role};
use error::ApiError;
pub use serve::{serve, ConnLimits, Connections};

/// What every handler shares: one pointer, so the state that axum clones for every
/// request and every middleware costs one reference count, not one per field.
#[derive(Clone)]
pub struct AppState(Arc<Edge>);

impl From<Edge> for AppState {
    fn from(edge: Edge) -> Self {
        AppState(Arc::new(edge))
    }
}

impl std::ops::Deref for AppState {
    type Target = Edge;
    fn deref(&self) -> &Edge {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct Edge {
    pub shop: Shop,
    pub jwt: JwtKeys,
    pub payment_secret: Option<Arc<Vec<u8>>>,
    pub http_metrics: Arc<metrics::HttpMetrics>,
    /// Cancelled when the node begins to shut down: readiness turns 503 at once.
    pub shutting_down: CancellationToken,
    /// This node's membership: routing, the map, membership commands.
    pub cluster: shardmall_cluster::node::ClusterNode,
    /// Admission control: one permit per request in flight (see [`admit`]).
    pub admission: Arc<tokio::sync::Semaphore>,
    /// Timeouts and caps of the HTTP connections ([`serve`]).
    pub limits: ConnLimits,
    /// The open connections, counted by [`serve`].
    pub connections: Arc<Connections>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "shardmall",
        description = "Clustered in-memory commerce engine: catalog, cart, orders, flash-sale campaigns."
    ),
    paths(
        routes::catalog::create_product,
        routes::catalog::get_product,
        routes::catalog::list_products,
        routes::catalog::patch_product,
        routes::catalog::get_sku,
        routes::catalog::adjust_stock,
        routes::catalog::set_price,
        routes::cart::get_cart,
        routes::cart::put_item,
        routes::cart::delete_item,
        routes::orders::create_order,
        routes::orders::get_order,
        routes::orders::list_my_orders,
        routes::orders::admin_orders,
        routes::orders::pay,
        routes::orders::cancel,
        routes::orders::ship,
        routes::orders::confirm_receipt,
        routes::orders::request_refund,
        routes::orders::approve_refund,
        routes::orders::reject_refund,
        routes::orders::patch_order,
        routes::orders::payment_callback,
        routes::ops::healthz,
        routes::ops::readyz,
        routes::ops::metrics,
        routes::ops::dashboard,
        routes::cluster::get_cluster,
        routes::cluster::rebalance,
        routes::cluster::leave,
        routes::cluster::remove,
        routes::campaigns::create_campaign,
        routes::campaigns::get_campaign,
        routes::campaigns::list_campaigns,
        routes::campaigns::end_campaign,
        routes::campaigns::buy,
    ),
    components(schemas(error::ErrorBody, error::ErrorDetail))
)]
pub struct ApiDoc;

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The whole router with its limits and middleware.
pub fn router(state: AppState) -> Router {
    use routes::{campaigns, cart, catalog, ops, orders};
    let api = Router::new()
        .route(
            "/v1/products",
            post(catalog::create_product).get(catalog::list_products),
        )
        .route(
            "/v1/products/{product_id}",
            get(catalog::get_product).patch(catalog::patch_product),
        )
        .route("/v1/skus/{sku_id}", get(catalog::get_sku))
        .route("/v1/skus/{sku_id}/stock", post(catalog::adjust_stock))
        .route("/v1/skus/{sku_id}/price", put(catalog::set_price))
        .route("/v1/cart", get(cart::get_cart))
        .route(
            "/v1/cart/items/{sku_id}",
            put(cart::put_item).delete(cart::delete_item),
        )
        .route(
            "/v1/orders",
            post(orders::create_order).get(orders::list_my_orders),
        )
        .route(
            "/v1/orders/{order_id}",
            get(orders::get_order).patch(orders::patch_order),
        )
        .route("/v1/orders/{order_id}/pay", post(orders::pay))
        .route("/v1/orders/{order_id}/cancel", post(orders::cancel))
        .route("/v1/orders/{order_id}/ship", post(orders::ship))
        .route(
            "/v1/orders/{order_id}/confirm-receipt",
            post(orders::confirm_receipt),
        )
        .route("/v1/orders/{order_id}/refund", post(orders::request_refund))
        .route(
            "/v1/orders/{order_id}/refund/approve",
            post(orders::approve_refund),
        )
        .route(
            "/v1/orders/{order_id}/refund/reject",
            post(orders::reject_refund),
        )
        .route("/v1/admin/orders", get(orders::admin_orders))
        .route("/v1/payments/callback", post(orders::payment_callback))
        .route(
            "/v1/campaigns",
            get(campaigns::list_campaigns).post(campaigns::create_campaign),
        )
        .route("/v1/campaigns/{campaign_id}", get(campaigns::get_campaign))
        .route(
            "/v1/campaigns/{campaign_id}/end",
            post(campaigns::end_campaign),
        )
        .route("/v1/campaigns/{campaign_id}/buy", post(campaigns::buy))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .route("/dashboard", get(ops::dashboard))
        .route("/v1/cluster", get(routes::cluster::get_cluster))
        .route("/v1/cluster/rebalance", post(routes::cluster::rebalance))
        .route(
            "/v1/cluster/nodes/{node_id}/leave",
            post(routes::cluster::leave),
        )
        .route(
            "/v1/cluster/nodes/{node_id}",
            axum::routing::delete(routes::cluster::remove),
        )
        .fallback(ops::not_found)
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "method not allowed on this path",
            )
        });
    api.layer(EdgeLayer(state.clone())).with_state(state)
}

/// Every route template the router serves, for the per-route metrics: the OpenAPI
/// document's paths, and the document itself.
pub fn route_templates() -> Vec<String> {
    let mut routes: Vec<String> = ApiDoc::openapi().paths.paths.into_keys().collect();
    routes.push("/openapi.json".to_owned());
    routes
}

/// The edge's one middleware, in the order it applies: header size limit, request id
/// (the caller's `x-request-id`, or a fresh one), admission, the body limit, the handler
/// (a panic in it answers 500), metrics, and the request id on the answer.
///
/// A plain tower service instead of a stack of layers or `middleware::from_fn`: each of
/// those costs a boxed future, a clone of the route's boxed service and a poll per
/// request, and on this path they added up (measured with `wrk` against `/healthz`: see
/// docs/benchmarks.md, "The edge"). The body limit and the panic guard are here for the
/// same reason: as layers of their own each re-boxed the route, its future and (the
/// panic guard) the answer's body. Everything before the handler is synchronous, so
/// `call` does it and calls the route at once; the future only waits for the handler and
/// then counts. The request span is at DEBUG level, so it costs nothing unless asked for;
/// answers of 5xx are logged at WARN with their request id.
#[derive(Clone)]
struct EdgeLayer(AppState);

impl<S> tower::Layer<S> for EdgeLayer {
    type Service = EdgeService<S>;

    fn layer(&self, inner: S) -> EdgeService<S> {
        EdgeService {
            inner,
            state: self.0.clone(),
        }
    }
}

#[derive(Clone)]
struct EdgeService<S> {
    inner: S,
    state: AppState,
}

impl<S> tower::Service<Request> for EdgeService<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = EdgeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    // PerformanceCriticalPath: every request passes here.
    fn call(&mut self, mut req: Request) -> Self::Future {
        let start = Instant::now();
        let header_bytes: usize = req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        let request_id = match req.headers().get(&REQUEST_ID) {
            Some(id) => id.clone(),
            None => {
                let id = next_request_id();
                req.headers_mut().insert(REQUEST_ID.clone(), id.clone());
                id
            }
        };
        let mut fut = EdgeFuture {
            inner: None,
            answered: None,
            state: self.state.clone(),
            route: req.extensions().get::<MatchedPath>().cloned(),
            method: req.method().clone(),
            uri: req.uri().clone(),
            request_id: Some(request_id),
            start,
            permit: None,
            span: None,
        };
        if header_bytes > validate::MAX_HEADER_BYTES {
            fut.answered = Some(
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "request headers are larger than 16 KiB",
                )
                .into_response(),
            );
            return fut;
        }
        // Admission bounds the requests in flight: past the bound a request is answered
        // 429 `overloaded` with Retry-After at once, instead of queueing in front of the
        // actors (whose mailboxes are unbounded) and letting latency grow without limit.
        // Health, readiness and metrics are always admitted, so operators can see a node
        // under overload.
        if !matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics") {
            match self.state.admission.clone().try_acquire_owned() {
                Ok(permit) => fut.permit = Some(permit),
                Err(_) => {
                    let mut e = ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "overloaded",
                        "too many requests in flight; retry shortly",
                    );
                    e.retry_after = Some(1);
                    fut.answered = Some(e.into_response());
                    return fut;
                }
            }
        }
        DefaultBodyLimit::max(validate::MAX_BODY_BYTES).apply(&mut req);
        let inner = &mut self.inner;
        let called = if tracing::enabled!(tracing::Level::DEBUG) {
            let span = tracing::debug_span!("request", request_id = ?fut.request_id, method = %req.method(), path = %req.uri().path());
            let called = span.in_scope(|| guarded_call(inner, req));
            fut.span = Some(span);
            called
        } else {
            guarded_call(inner, req)
        };
        match called {
            Some(inner) => fut.inner = Some(inner),
            None => fut.answered = Some(panicked(fut.request_id.as_ref())),
        }
        fut
    }
}

pin_project_lite::pin_project! {
    /// The handler's future, then the edge's bookkeeping on its answer.
    struct EdgeFuture<F> {
        #[pin]
        inner: Option<Guarded<F>>,
        // Answered by the edge itself (headers too large, overloaded).
        answered: Option<Response>,
        state: AppState,
        route: Option<MatchedPath>,
        method: axum::http::Method,
        uri: axum::http::Uri,
        request_id: Option<axum::http::HeaderValue>,
        start: Instant,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
        span: Option<tracing::Span>,
    }
}

impl<F> Future for EdgeFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut resp = match this.inner.as_pin_mut() {
            Some(inner) => {
                let _entered = this.span.as_ref().map(tracing::Span::enter);
                match inner.poll(cx) {
                    Poll::Ready(Some(resp)) => resp,
                    Poll::Ready(None) => panicked(this.request_id.as_ref()),
                    Poll::Pending => return Poll::Pending,
                }
            }
            None => this
                .answered
                .take()
                .unwrap_or_else(|| ApiError::internal().into_response()),
        };
        // The request is no longer in flight.
        drop(this.permit.take());
        let status = resp.status();
        // A 503 of `/readyz` is an answer, not a failure.
        if status.is_server_error() && this.uri.path() != "/readyz" {
            tracing::warn!(request_id = ?this.request_id, method = %this.method, path = %this.uri.path(), status = status.as_u16(), "request failed");
        }
        this.state.http_metrics.observe(
            this.route.as_ref().map(MatchedPath::as_str),
            status.as_u16(),
            this.start.elapsed(),
        );
        if let Some(id) = this.request_id.take() {
            resp.headers_mut().insert(REQUEST_ID.clone(), id);
        }
        Poll::Ready(Ok(resp))
    }
}

/// Calls the route, or `None` if that panicked.
fn guarded_call<S: tower::Service<Request>>(
    inner: &mut S,
    req: Request,
) -> Option<Guarded<S::Future>> {
    catch_unwind(AssertUnwindSafe(|| inner.call(req)))
        .ok()
        .map(|fut| Guarded { fut: Some(fut) })
}

pin_project_lite::pin_project! {
    /// A handler's future whose panic ends it with `None` (the edge answers 500) instead
    /// of unwinding into the connection: the node keeps serving, the client hears why.
    struct Guarded<F> {
        #[pin]
        fut: Option<F>,
    }
}

impl<F> Future for Guarded<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Option<Response>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Response>> {
        let mut this = self.project();
        let Some(fut) = this.fut.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        match catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Ready(Ok(resp))) => Poll::Ready(Some(resp)),
            Ok(Poll::Ready(Err(never))) => match never {},
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => {
                // A future that panicked MUST NOT be polled again.
                this.fut.set(None);
                Poll::Ready(None)
            }
        }
    }
}

/// The answer to a request whose handler panicked: a 500 in the usual JSON shape. The
/// panic's message went to the log through the panic hook; the request id ties them.
fn panicked(request_id: Option<&axum::http::HeaderValue>) -> Response {
    tracing::error!(request_id = ?request_id, "a handler panicked; answered 500");
    ApiError::internal().into_response()
}

/// A request id unique to this process: a random prefix chosen at start-up and a
/// counter. Cheaper than a UUID per request and as useful for finding a request in logs.
fn next_request_id() -> axum::http::HeaderValue {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static PREFIX: OnceLock<u32> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(rand::random);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Hex digits and a dash are always a valid header value.
    axum::http::HeaderValue::try_from(format!("{prefix:08x}-{n:x}"))
        .unwrap_or_else(|_| axum::http::HeaderValue::from_static("-"))
}

/// Serves until `state.shutting_down` is cancelled, then stops accepting and drains
/// in-flight requests for at most `drain`.
#[cfg(test)]
mod tests {
    use super::*;

    /// Every `{name}` in a path MUST be declared as a path parameter of each of its
    /// operations, or the document is not valid OpenAPI.
    #[test]
    fn openapi_declares_every_path_parameter() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for (path, ops) in paths {
            let names: Vec<&str> = path
                .split('/')
                .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            for (method, op) in ops.as_object().unwrap() {
                for name in &names {
                    let declared = op["parameters"].as_array().is_some_and(|ps| {
                        ps.iter().any(|p| p["in"] == "path" && p["name"] == *name)
                    });
                    assert!(
                        declared,
                        "{method} {path} does not declare path parameter {name}"
                    );
                }
            }
        }
    }

    /// A handler that panics, when called or when polled, ends in `None` (answered 500
    /// by the edge) and is never polled again; one that answers passes its answer on.
    #[tokio::test]
    async fn a_panicking_handler_ends_without_unwinding_into_the_server() {
        let mut calls_panic = tower::service_fn(
            |_: Request| -> std::future::Ready<Result<Response, Infallible>> {
                panic!("handler panicked when called")
            },
        );
        assert!(guarded_call(&mut calls_panic, Request::default()).is_none());

        let mut polls_panic = tower::service_fn(|_: Request| async {
            if true {
                panic!("handler panicked when polled");
            }
            Ok::<Response, Infallible>(StatusCode::OK.into_response())
        });
        let fut = guarded_call(&mut polls_panic, Request::default()).unwrap();
        let mut fut = Box::pin(fut);
        assert!(fut.as_mut().await.is_none());
        assert!(
            fut.await.is_none(),
            "polled again after its panic: still None"
        );

        let mut answers = tower::service_fn(|_: Request| async {
            Ok::<Response, Infallible>(StatusCode::IM_A_TEAPOT.into_response())
        });
        let answered = guarded_call(&mut answers, Request::default())
            .unwrap()
            .await;
        assert_eq!(answered.unwrap().status(), StatusCode::IM_A_TEAPOT);
    }

    /// The generated document MUST list every endpoint of API.md that this node serves.
    #[test]
    fn openapi_lists_every_contract_path() {
        let doc = ApiDoc::openapi();
        let paths: Vec<&str> = doc.paths.paths.keys().map(String::as_str).collect();
        for p in [
            "/v1/products",
            "/v1/products/{product_id}",
            "/v1/skus/{sku_id}",
            "/v1/skus/{sku_id}/stock",
            "/v1/skus/{sku_id}/price",
            "/v1/cart",
            "/v1/cart/items/{sku_id}",
            "/v1/orders",
            "/v1/orders/{order_id}",
            "/v1/orders/{order_id}/pay",
            "/v1/orders/{order_id}/cancel",
            "/v1/orders/{order_id}/ship",
            "/v1/orders/{order_id}/confirm-receipt",
            "/v1/orders/{order_id}/refund",
            "/v1/orders/{order_id}/refund/approve",
            "/v1/orders/{order_id}/refund/reject",
            "/v1/admin/orders",
            "/v1/payments/callback",
            "/healthz",
            "/readyz",
            "/metrics",
            "/dashboard",
            "/v1/cluster",
            "/v1/cluster/rebalance",
            "/v1/cluster/nodes/{node_id}/leave",
            "/v1/cluster/nodes/{node_id}",
            "/v1/campaigns",
            "/v1/campaigns/{campaign_id}",
            "/v1/campaigns/{campaign_id}/end",
            "/v1/campaigns/{campaign_id}/buy",
        ] {
            assert!(paths.contains(&p), "{p} missing from /openapi.json");
        }
    }
}
