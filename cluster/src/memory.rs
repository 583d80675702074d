//! An in-process network for tests: every frame is a real byte vector (so the codec is
//! exercised), and links between two addresses can be cut, made lossy or slow.
//!
//! ```text
//! let net = MemoryNet::new();
//! net.register("n1", service1);
//! let t = net.endpoint("n2");          // calls made through `t` come from "n2"
//! net.cut("n1", "n2");                 // both directions
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::transport::{BoxFuture, Service, Transport, TransportError, MAX_FRAME};

#[derive(Default)]
struct Links {
    services: HashMap<String, Arc<dyn Service>>,
    /// Directed pairs (from, to) whose frames are lost.
    cut: HashSet<(String, String)>,
    /// Directed pairs whose frames arrive late.
    delay: HashMap<(String, String), Duration>,
    /// Directed pairs whose calls fail with this probability (0..=1).
    loss: HashMap<(String, String), f64>,
}

/// The shared network. Cheap to clone.
#[derive(Clone, Default)]
pub struct MemoryNet {
    links: Arc<Mutex<Links>>,
}

impl MemoryNet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `service` answer the frames sent to `addr` (replacing any before it).
    pub fn register(&self, addr: &str, service: Arc<dyn Service>) {
        self.lock().services.insert(addr.to_owned(), service);
    }

    /// The node at `addr` is gone: calls to it fail as unreachable.
    pub fn unregister(&self, addr: &str) {
        self.lock().services.remove(addr);
    }

    /// A transport whose calls come from `from`.
    pub fn endpoint(&self, from: &str) -> MemoryTransport {
        MemoryTransport {
            net: self.clone(),
            from: from.to_owned(),
        }
    }

    /// Cuts the link between `a` and `b`, both ways.
    pub fn cut(&self, a: &str, b: &str) {
        let mut l = self.lock();
        l.cut.insert((a.to_owned(), b.to_owned()));
        l.cut.insert((b.to_owned(), a.to_owned()));
    }

    /// Cuts only frames from `from` to `to` (the answers of the other way still flow).
    pub fn cut_one_way(&self, from: &str, to: &str) {
        self.lock().cut.insert((from.to_owned(), to.to_owned()));
    }

    /// Restores every link of `addr`, and forgets its delays and losses.
    pub fn heal(&self, addr: &str) {
        let mut l = self.lock();
        l.cut.retain(|(a, b)| a != addr && b != addr);
        l.delay.retain(|(a, b), _| a != addr && b != addr);
        l.loss.retain(|(a, b), _| a != addr && b != addr);
    }

    /// Restores every link.
    pub fn heal_all(&self) {
        let mut l = self.lock();
        l.cut.clear();
        l.delay.clear();
        l.loss.clear();
    }

    /// Frames from `from` to `to` (and their answers) take `by` longer.
    pub fn delay(&self, from: &str, to: &str, by: Duration) {
        self.lock()
            .delay
            .insert((from.to_owned(), to.to_owned()), by);
    }

    /// Calls from `from` to `to` are lost with probability `p`.
    pub fn lossy(&self, from: &str, to: &str, p: f64) {
        self.lock()
            .loss
            .insert((from.to_owned(), to.to_owned()), p.clamp(0.0, 1.0));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Links> {
        // A panicking test thread must not poison the network for the others.
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One node's view of a [`MemoryNet`].
#[derive(Clone)]
pub struct MemoryTransport {
    net: MemoryNet,
    from: String,
}

impl MemoryTransport {
    pub fn addr(&self) -> &str {
        &self.from
    }
}

impl Transport for MemoryTransport {
    fn call(
        &self,
        to: &str,
        frame: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>> {
        let to = to.to_owned();
        let from = self.from.clone();
        let net = self.net.clone();
        Box::pin(async move {
            if frame.len() > MAX_FRAME {
                return Err(TransportError::Frame(format!(
                    "{} bytes is over the {MAX_FRAME}-byte limit",
                    frame.len()
                )));
            }
            let (service, delay, lost) = {
                let l = net.lock();
                let pair = (from.clone(), to.clone());
                let back = (to.clone(), from.clone());
                let lost = l.cut.contains(&pair)
                    || l.loss
                        .get(&pair)
                        .is_some_and(|p| rand::random::<f64>() < *p);
                let answer_lost = l.cut.contains(&back);
                let delay = l.delay.get(&pair).copied().unwrap_or_default()
                    + l.delay.get(&back).copied().unwrap_or_default();
                (l.services.get(&to).cloned(), delay, (lost, answer_lost))
            };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let Some(service) = service else {
                return Err(TransportError::peer_unreachable(
                    to,
                    "no node listens there",
                ));
            };
            if lost.0 {
                return Err(TransportError::peer_unreachable(to, "link cut"));
            }
            let answer = service.serve(frame).await;
            if lost.1 {
                // The request was served; only its answer is lost, as on a real network.
                return Err(TransportError::peer_unreachable(to, "link cut"));
            }
            Ok(answer)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Service for Echo {
        fn serve(&self, frame: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
            Box::pin(async move { frame })
        }
    }

    #[tokio::test]
    async fn frames_flow_until_the_link_is_cut_and_again_once_healed() {
        let net = MemoryNet::new();
        net.register("a", Arc::new(Echo));
        net.register("b", Arc::new(Echo));
        let from_b = net.endpoint("b");
        assert_eq!(from_b.call("a", b"hi".to_vec()).await.unwrap(), b"hi");
        net.cut("a", "b");
        assert!(matches!(
            from_b.call("a", b"hi".to_vec()).await,
            Err(TransportError::Unreachable { .. })
        ));
        net.heal("a");
        assert_eq!(from_b.call("a", b"hi".to_vec()).await.unwrap(), b"hi");
        net.unregister("a");
        assert!(from_b.call("a", vec![]).await.is_err());
    }

    #[tokio::test]
    async fn a_one_way_cut_loses_the_answer_after_the_request_was_served() {
        let net = MemoryNet::new();
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        struct Count(Arc<std::sync::atomic::AtomicUsize>);
        impl Service for Count {
            fn serve(&self, frame: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Box::pin(async move { frame })
            }
        }
        net.register("a", Arc::new(Count(served.clone())));
        net.cut_one_way("a", "b");
        assert!(net.endpoint("b").call("a", vec![1]).await.is_err());
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
