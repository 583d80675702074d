//! Node-wide gauges and counters the actors keep. Plain atomics: they are written from
//! many actors and read by the metrics endpoint, and no entity state sits behind them.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::domain::order::OrderStatus;

pub const ORDER_STATUSES: [OrderStatus; 7] = [
    OrderStatus::PendingPayment,
    OrderStatus::Paid,
    OrderStatus::Shipped,
    OrderStatus::Completed,
    OrderStatus::Cancelled,
    OrderStatus::RefundRequested,
    OrderStatus::Refunded,
];

#[derive(Debug, Default)]
pub struct ActorMetrics {
    pub active_actors: AtomicI64,
    pub activations: AtomicU64,
    pub passivations: AtomicU64,
    pub actor_failures: AtomicU64,
    pub low_stock_alerts: AtomicU64,
    pub timers_fired: AtomicU64,
    /// Commands refused because their entity's admission queue was full.
    pub overloaded: AtomicU64,
    orders_by_status: [AtomicI64; 7],
}

impl ActorMetrics {
    pub fn order_status_changed(&self, from: Option<&str>, to: Option<&str>) {
        if let Some(i) = from.and_then(status_index) {
            self.orders_by_status[i].fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(i) = to.and_then(status_index) {
            self.orders_by_status[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn orders_by_status(&self) -> Vec<(&'static str, i64)> {
        ORDER_STATUSES
            .iter()
            .enumerate()
            .map(|(i, s)| (s.as_str(), self.orders_by_status[i].load(Ordering::Relaxed)))
            .collect()
    }
}

fn status_index(s: &str) -> Option<usize> {
    ORDER_STATUSES.iter().position(|x| x.as_str() == s)
}
