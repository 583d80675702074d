//! Business time: the instant every decision is taken at (payment deadlines, campaign
//! windows, refund windows, the timer wheel's due deadlines).
//!
//! A node runs on the system clock. A test can start a shop on a manual clock instead and
//! move it by hand: a payment deadline then passes when the test says so, without
//! waiting for it and without racing a timer. Only business time comes from here; token
//! expiry, order ids and internal pacing (checkpoints, idle actors) keep the system's
//! clocks.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::domain::Millis;

/// Milliseconds since the Unix epoch on the system clock.
pub fn system_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// Where a shop reads the time. Cheap to clone; the default is the system clock.
#[derive(Clone, Default)]
pub struct Clock {
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock standing at `start` until its [`Hand`] moves it.
    pub fn manual(start: Millis) -> (Clock, Hand) {
        let at = Arc::new(AtomicU64::new(start));
        (
            Clock {
                manual: Some(at.clone()),
            },
            Hand { at },
        )
    }

    pub fn now_ms(&self) -> Millis {
        match &self.manual {
            Some(at) => at.load(Ordering::Acquire),
            None => system_ms(),
        }
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.manual {
            Some(at) => write!(f, "Clock::manual({})", at.load(Ordering::Acquire)),
            None => f.write_str("Clock::system"),
        }
    }
}

/// Moves a manual [`Clock`]. Time only goes forward: a deadline that has passed stays
/// passed.
#[derive(Debug, Clone)]
pub struct Hand {
    at: Arc<AtomicU64>,
}

impl Hand {
    pub fn advance(&self, by: Duration) {
        self.at
            .fetch_add(by.as_millis() as Millis, Ordering::AcqRel);
    }

    /// Moves the clock to `to`, if that is later than where it stands.
    pub fn set(&self, to: Millis) {
        self.at.fetch_max(to, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_forward_and_only_by_its_hand() {
        let (clock, hand) = Clock::manual(1_000);
        let copy = clock.clone();
        assert_eq!(clock.now_ms(), 1_000);
        hand.advance(Duration::from_millis(500));
        assert_eq!(copy.now_ms(), 1_500);
        hand.set(1_200);
        assert_eq!(clock.now_ms(), 1_500, "set never goes back");
        hand.set(9_000);
        assert_eq!(clock.now_ms(), 9_000);
    }

    #[test]
    fn the_system_clock_is_the_default() {
        let before = system_ms();
        let now = Clock::default().now_ms();
        assert!(now >= before && now <= system_ms());
    }
}
