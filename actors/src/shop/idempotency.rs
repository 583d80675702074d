//! Idempotency keys of the HTTP API, kept in idempotency entities.

use shardmall_persistence::Part;

use crate::domain::idempotency::{
    idem_entity_id, IdemCommand, IdemEvent, IdemState, StoredResponse,
};
use crate::error::{Result, ShopError};
use crate::errors_map::{idem_err, MOVING};
use crate::host::Refusal;

use super::*;

/// The answer of an idempotent request whose result is an order (checkout, pay),
/// recorded in the log frame of the request's last write when that write is made here
/// (ADR 0015), instead of in a write of its own after it: the operation and its recorded
/// answer become durable together.
pub struct AnswerInFrame {
    sub: String,
    scope: String,
    status: u16,
    render: fn(&Order) -> Vec<u8>,
    recorded: Arc<OnceLock<StoredResponse>>,
}

impl AnswerInFrame {
    /// The answer `status` with the body `render` makes of the order, for the key
    /// `scope` of `sub` (as given to [`Shop::idempotency_begin`]).
    pub fn new(sub: &str, scope: &str, status: u16, render: fn(&Order) -> Vec<u8>) -> Self {
        AnswerInFrame {
            sub: sub.to_owned(),
            scope: scope.to_owned(),
            status,
            render,
            recorded: Arc::new(OnceLock::new()),
        }
    }

    /// Where the answer is left once it is part of a frame; empty if it never was (the
    /// caller then records it itself).
    pub fn recorded(&self) -> Arc<OnceLock<StoredResponse>> {
        self.recorded.clone()
    }

    /// The key's record completing it with `order` rendered, in `partition` (the
    /// subject's), and its entity key. Leaves the answer in [`Self::recorded`].
    pub(crate) fn part(
        self,
        partition: u16,
        order: &Order,
        at: Millis,
    ) -> Option<(Part, EntityKey)> {
        let response = StoredResponse {
            status: self.status,
            body: (self.render)(order),
        };
        let event = IdemEvent::Completed {
            scope: self.scope.clone(),
            response: response.clone(),
            at,
        };
        let payload = crate::codec::encode(&vec![event]).ok()?;
        let key = EntityKey::new(Kind::Idempotency, idem_entity_id(&self.sub, &self.scope));
        let _ = self.recorded.set(response);
        Some((
            Part {
                partition,
                entity: key.to_bytes(),
                payload,
            },
            key,
        ))
    }
}

impl Shop {
    /// Every idempotency key is its own small entity in the subject's partition.
    fn idem_key(&self, sub: &str, scope: &str) -> (u16, String) {
        (
            self.inner.partitioner.buyer(sub),
            idem_entity_id(sub, scope),
        )
    }

    pub async fn idempotency_begin(
        &self,
        sub: &str,
        scope: &str,
        body_hash: u64,
    ) -> Result<IdemStart> {
        let (p, id) = self.idem_key(sub, scope);
        let cmd = IdemCommand::Begin {
            scope: scope.to_owned(),
            body_hash,
        };
        // Answered as soon as the record is queued: the request runs while it is
        // flushed, and its answer waits for it (`Begun::durable`).
        let (answer, durable) = self.ask_early::<IdemState>(p, &id, cmd).await;
        match answer {
            Ok(_) => Ok(IdemStart::Fresh(Begun(durable))),
            Err(Refusal::Domain(e)) => idem_err(e),
            Err(Refusal::Unavailable(why)) => Err(ShopError::Unavailable(why)),
            Err(Refusal::Overloaded(what)) => Err(ShopError::Overloaded(what)),
            Err(Refusal::Moved) => Err(ShopError::Unavailable(MOVING.into())),
        }
    }

    pub async fn idempotency_complete(
        &self,
        sub: &str,
        scope: &str,
        response: StoredResponse,
    ) -> Result<()> {
        let (p, id) = self.idem_key(sub, scope);
        let cmd = IdemCommand::Complete {
            scope: scope.to_owned(),
            response,
        };
        self.ask::<IdemState>(p, &id, cmd)
            .await
            .map(drop)
            .map_err(|r| match r {
                Refusal::Domain(e) => ShopError::Internal(format!("{e:?}")),
                Refusal::Unavailable(why) => ShopError::Unavailable(why),
                Refusal::Overloaded(what) => ShopError::Overloaded(what),
                Refusal::Moved => ShopError::Unavailable(MOVING.into()),
            })
    }

    pub async fn idempotency_abort(&self, sub: &str, scope: &str) {
        let (p, id) = self.idem_key(sub, scope);
        let cmd = IdemCommand::Abort {
            scope: scope.to_owned(),
        };
        if let Err(e) = self.ask::<IdemState>(p, &id, cmd).await {
            tracing::warn!(sub, scope, error = ?e, "could not release an idempotency key");
        }
    }
}
