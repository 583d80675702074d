//! Idempotency records: one entity per (token subject, route, key), living in the
//! subject's partition (see `idem_entity_id`). The state keeps a map of entries so one
//! entity could hold several, but the shop gives every key its own entity: a buyer's
//! history never grows one state, and an expired key is deleted by its own timer.
//!
//! The edge calls `Begin` before handling a POST that carries an `Idempotency-Key`. A new
//! key starts an entry; the same key with the same body gets the stored answer back (or
//! "in flight" while the first attempt runs); another body is a conflict. The edge then
//! stores the answer with `Complete`, or drops the entry with `Abort` for answers that
//! are not kept (429, 503, 5xx), so a retry is a fresh attempt. Entries live 24 hours.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::common::{Millis, DAY_MS};
use super::{Entity, Kind};

/// How long an entry is kept, from its first use (API.md: "kept 24 hours").
pub const TTL_MS: Millis = DAY_MS;
/// An attempt that neither completed nor aborted within this long is taken as abandoned
/// (its node crashed mid-request), so a retry may start afresh instead of being told
/// "in flight" for a whole day.
pub const IN_FLIGHT_TIMEOUT_MS: Millis = 5 * 60_000;
/// Expired entries are swept at most this often; until then `decide` ignores them.
pub const SWEEP_INTERVAL_MS: Millis = 10 * 60_000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdemState {
    /// By scope: `route + "\n" + key`.
    pub entries: BTreeMap<String, IdemEntry>,
    /// When expired entries were last swept.
    pub swept_at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdemEntry {
    pub body_hash: u64,
    pub response: Option<StoredResponse>,
    /// When the key was first used.
    pub at: Millis,
}

/// The first answer to a request, replayed to its repeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResponse {
    pub status: u16,
    /// As bytes, not as a sequence of `u8`: the same encoding (a length, then the
    /// bytes), written and read in one copy instead of one call per byte.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdemCommand {
    Begin {
        scope: String,
        body_hash: u64,
    },
    /// Stores the answer of a started request. A missing or already completed entry is
    /// accepted with no change.
    Complete {
        scope: String,
        response: StoredResponse,
    },
    /// Drops a started request that has no stored answer; otherwise no change.
    Abort {
        scope: String,
    },
    /// The timer: drops every entry older than the TTL.
    Expire,
}

/// Variants are only ever appended (bincode encodes the variant by position).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdemEvent {
    Started {
        scope: String,
        body_hash: u64,
        at: Millis,
    },
    Completed {
        scope: String,
        response: StoredResponse,
        at: Millis,
    },
    Aborted {
        scope: String,
        at: Millis,
    },
    /// Every entry older than the TTL at `at` is gone.
    Expired {
        at: Millis,
    },
}

impl IdemEvent {
    pub fn at(&self) -> Millis {
        match self {
            IdemEvent::Started { at, .. }
            | IdemEvent::Completed { at, .. }
            | IdemEvent::Aborted { at, .. }
            | IdemEvent::Expired { at } => *at,
        }
    }
}

/// The refusals of `Begin`. `Replay` is not a failure for the client: it carries the
/// answer to send again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum IdemError {
    #[error("this Idempotency-Key was used with another request body")]
    Conflict,
    #[error("a request with this Idempotency-Key is still in progress")]
    InFlight,
    #[error("this request was already answered (status {})", .0.status)]
    Replay(StoredResponse),
}

fn live(e: &IdemEntry, now: Millis) -> bool {
    now.saturating_sub(e.at) < TTL_MS
}

impl IdemState {
    /// The entry for `scope`, unless it has expired.
    fn live_entry(&self, scope: &str, now: Millis) -> Option<&IdemEntry> {
        self.entries.get(scope).filter(|e| live(e, now))
    }
}

impl Entity for IdemState {
    type Command = IdemCommand;
    type Event = IdemEvent;
    type Error = IdemError;
    /// The number of entries held.
    type View = usize;

    const KIND: Kind = Kind::Idempotency;

    fn decide(&self, cmd: &IdemCommand, now: Millis) -> Result<Vec<IdemEvent>, IdemError> {
        match cmd {
            IdemCommand::Begin { scope, body_hash } => {
                if let Some(e) = self.live_entry(scope, now) {
                    if e.body_hash != *body_hash {
                        return Err(IdemError::Conflict);
                    }
                    if let Some(r) = &e.response {
                        return Err(IdemError::Replay(r.clone()));
                    }
                    if now.saturating_sub(e.at) < IN_FLIGHT_TIMEOUT_MS {
                        return Err(IdemError::InFlight);
                    }
                }
                Ok(vec![IdemEvent::Started {
                    scope: scope.clone(),
                    body_hash: *body_hash,
                    at: now,
                }])
            }
            IdemCommand::Complete { scope, response } => Ok(match self.live_entry(scope, now) {
                Some(e) if e.response.is_none() => vec![IdemEvent::Completed {
                    scope: scope.clone(),
                    response: response.clone(),
                    at: now,
                }],
                _ => vec![],
            }),
            IdemCommand::Abort { scope } => Ok(match self.entries.get(scope) {
                Some(e) if e.response.is_none() => vec![IdemEvent::Aborted {
                    scope: scope.clone(),
                    at: now,
                }],
                _ => vec![],
            }),
            IdemCommand::Expire => Ok(if self.entries.values().any(|e| !live(e, now)) {
                vec![IdemEvent::Expired { at: now }]
            } else {
                vec![]
            }),
        }
    }

    fn apply(&mut self, event: &IdemEvent) {
        match event {
            IdemEvent::Started {
                scope,
                body_hash,
                at,
            } => {
                self.entries.insert(
                    scope.clone(),
                    IdemEntry {
                        body_hash: *body_hash,
                        response: None,
                        at: *at,
                    },
                );
            }
            IdemEvent::Completed {
                scope, response, ..
            } => {
                if let Some(e) = self.entries.get_mut(scope) {
                    e.response = Some(response.clone());
                }
            }
            IdemEvent::Aborted { scope, .. } => {
                self.entries.remove(scope);
            }
            IdemEvent::Expired { at } => {
                self.entries.retain(|_, e| live(e, *at));
                // An emptied record is the empty state again, so it needs no snapshot.
                self.swept_at = if self.entries.is_empty() { 0 } else { *at };
            }
        }
        let at = event.at();
        if at >= self.swept_at.saturating_add(SWEEP_INTERVAL_MS) {
            self.entries.retain(|_, e| live(e, at));
            self.swept_at = at;
        }
    }

    fn view(&self) -> usize {
        self.entries.len()
    }

    /// When the oldest entry expires.
    fn next_deadline(&self) -> Option<Millis> {
        self.entries
            .values()
            .map(|e| e.at.saturating_add(TTL_MS))
            .min()
    }
}

/// The entity id of one idempotency record: the subject, a separator that ids never
/// contain, then the scope. Its partition is the subject's.
pub fn idem_entity_id(sub: &str, scope: &str) -> String {
    format!("{sub}{ID_SEPARATOR}{scope}")
}

pub const ID_SEPARATOR: char = '\u{1f}';

/// The subject an idempotency entity id belongs to.
pub fn idem_subject(entity_id: &str) -> &str {
    entity_id.split(ID_SEPARATOR).next().unwrap_or(entity_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: &mut IdemState, cmd: IdemCommand, now: Millis) -> Result<Vec<IdemEvent>, IdemError> {
        let events = s.decide(&cmd, now)?;
        for e in &events {
            s.apply(e);
        }
        Ok(events)
    }

    fn begin(hash: u64) -> IdemCommand {
        IdemCommand::Begin {
            scope: "POST /v1/orders\nk1".into(),
            body_hash: hash,
        }
    }

    fn response() -> StoredResponse {
        StoredResponse {
            status: 201,
            body: b"{}".to_vec(),
        }
    }

    fn complete() -> IdemCommand {
        IdemCommand::Complete {
            scope: "POST /v1/orders\nk1".into(),
            response: response(),
        }
    }

    fn abort() -> IdemCommand {
        IdemCommand::Abort {
            scope: "POST /v1/orders\nk1".into(),
        }
    }

    #[test]
    fn expire_drops_old_entries_and_the_deadline_follows() {
        let mut s = IdemState::default();
        run(&mut s, begin(1), 1_000).unwrap();
        assert_eq!(s.next_deadline(), Some(1_000 + TTL_MS));
        assert!(run(&mut s, IdemCommand::Expire, 1_000 + TTL_MS - 1)
            .unwrap()
            .is_empty());
        assert_eq!(
            run(&mut s, IdemCommand::Expire, 1_000 + TTL_MS)
                .unwrap()
                .len(),
            1
        );
        assert!(s.entries.is_empty());
        assert_eq!(s.next_deadline(), None);
        assert_eq!(
            idem_subject(&idem_entity_id("alice", "POST /v1/orders\nk")),
            "alice"
        );
    }

    #[test]
    fn first_use_starts_then_in_flight_then_replay() {
        let mut s = IdemState::default();
        assert_eq!(run(&mut s, begin(7), 1).unwrap().len(), 1);
        assert_eq!(s.decide(&begin(7), 2), Err(IdemError::InFlight));
        run(&mut s, complete(), 3).unwrap();
        assert_eq!(s.decide(&begin(7), 4), Err(IdemError::Replay(response())));
        assert_eq!(
            run(&mut s, complete(), 5).unwrap(),
            vec![],
            "the first answer is kept"
        );
        assert_eq!(s.view(), 1);
    }

    #[test]
    fn another_body_is_a_conflict() {
        let mut s = IdemState::default();
        run(&mut s, begin(7), 1).unwrap();
        assert_eq!(s.decide(&begin(8), 2), Err(IdemError::Conflict));
        run(&mut s, complete(), 3).unwrap();
        assert_eq!(s.decide(&begin(8), 4), Err(IdemError::Conflict));
    }

    #[test]
    fn abort_frees_the_key_but_not_a_stored_answer() {
        let mut s = IdemState::default();
        run(&mut s, begin(7), 1).unwrap();
        assert_eq!(run(&mut s, abort(), 2).unwrap().len(), 1);
        assert_eq!(s.view(), 0);
        assert_eq!(run(&mut s, abort(), 2).unwrap(), vec![]);
        run(&mut s, begin(8), 3).unwrap();
        run(&mut s, complete(), 4).unwrap();
        assert_eq!(run(&mut s, abort(), 5).unwrap(), vec![]);
        assert_eq!(s.decide(&begin(8), 6), Err(IdemError::Replay(response())));
    }

    #[test]
    fn abandoned_attempt_can_restart() {
        let mut s = IdemState::default();
        run(&mut s, begin(7), 1).unwrap();
        assert_eq!(
            s.decide(&begin(7), IN_FLIGHT_TIMEOUT_MS),
            Err(IdemError::InFlight)
        );
        assert_eq!(
            run(&mut s, begin(7), 1 + IN_FLIGHT_TIMEOUT_MS)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn entries_expire_after_a_day_and_are_pruned() {
        let mut s = IdemState::default();
        run(&mut s, begin(7), 1).unwrap();
        run(&mut s, complete(), 2).unwrap();
        assert!(s.decide(&begin(8), TTL_MS).is_err());
        // Expired: the key is fresh again, whatever the body.
        assert_eq!(s.decide(&begin(8), 1 + TTL_MS).unwrap().len(), 1);
        let other = IdemCommand::Begin {
            scope: "POST /v1/orders\nk2".into(),
            body_hash: 1,
        };
        run(&mut s, other, 1 + TTL_MS).unwrap();
        assert_eq!(s.view(), 1, "the expired entry was swept");
    }

    /// Log records written before `body` was encoded as bytes read back the same, and
    /// new ones are byte for byte what they were.
    #[test]
    fn a_stored_body_encodes_as_before() {
        #[derive(Serialize)]
        struct Before {
            status: u16,
            body: Vec<u8>,
        }
        let body: Vec<u8> = (0..=255u8)
            .chain(b"{\"order_id\":\"o1\"}".iter().copied())
            .collect();
        let before = crate::codec::encode(&Before {
            status: 201,
            body: body.clone(),
        })
        .unwrap();
        let now = StoredResponse { status: 201, body };
        assert_eq!(crate::codec::encode(&now).unwrap(), before);
        assert_eq!(
            crate::codec::decode::<StoredResponse>(&before).unwrap(),
            now
        );
    }
}
