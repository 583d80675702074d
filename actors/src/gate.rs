//! The gate of one partition for writes made from outside it.
//!
//! A command of one entity may write another entity's record in its own log frame (a
//! flash-sale buy writes its order with the claim, ADR 0013). When the other entity's
//! partition is about to be handed over, such writes must stop and the ones already
//! under way must be queued before the partition's log is exported. The writer enters
//! the gate before it decides to write and leaves once its frame is queued; a fence
//! closes the gate, then waits until nobody is inside.
//!
//! Entering increments the count before it checks `closed`, and closing sets `closed`
//! before it reads the count (both sequentially consistent): a writer that sees the gate
//! open is counted by the time the fence looks, so the fence waits for it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Gate {
    closed: AtomicBool,
    inside: AtomicUsize,
}

/// Proof of being inside an open gate; leaving is dropping it.
#[derive(Debug)]
pub struct Inside(Arc<Gate>);

impl Drop for Inside {
    fn drop(&mut self) {
        self.0.inside.fetch_sub(1, SeqCst);
    }
}

impl Gate {
    pub fn new(closed: bool) -> Arc<Gate> {
        Arc::new(Gate {
            closed: AtomicBool::new(closed),
            inside: AtomicUsize::new(0),
        })
    }

    /// `None` while the gate is closed.
    pub fn enter(self: &Arc<Self>) -> Option<Inside> {
        self.inside.fetch_add(1, SeqCst);
        let inside = Inside(self.clone());
        (!self.closed.load(SeqCst)).then_some(inside)
    }

    /// True while writers (and readers of published copies) may go in.
    pub fn is_open(&self) -> bool {
        !self.closed.load(SeqCst)
    }

    pub fn close(&self) {
        self.closed.store(true, SeqCst);
    }

    pub fn open(&self) {
        self.closed.store(false, SeqCst);
    }

    /// Returns once every writer that entered before the gate closed has left.
    pub async fn drained(&self) {
        while self.inside.load(SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_gate_refuses_and_waits_for_those_inside() {
        let gate = Gate::new(false);
        let inside = gate.enter().expect("open");
        gate.close();
        assert!(gate.enter().is_none(), "closed");
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.drained().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "a writer is still inside");
        drop(inside);
        waiter.await.unwrap();
        gate.open();
        assert!(gate.enter().is_some());
    }
}
