//! Idempotency keys of the HTTP API, kept in idempotency entities.

use crate::domain::idempotency::{idem_entity_id, IdemCommand, IdemState, StoredResponse};
use crate::error::{Result, ShopError};
use crate::errors_map::{idem_err, MOVING};
use crate::host::Refusal;

use super::*;

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
        match self.ask::<IdemState>(p, &id, cmd).await {
            Ok(_) => Ok(IdemStart::Fresh),
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
