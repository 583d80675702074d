//! The one table of entity kinds: each [`Kind`] and the state type that hosts it.
//!
//! Everything that has to handle "an entity of any kind" is generated from the table at
//! the bottom of this file: the [`Envelope`] a partition routes, the handle of a running
//! entity actor (`AnyRef`), starting one (`spawn`), and [`visit`], which runs a
//! generic function for the state type of a kind known only at run time (serving a
//! forwarded command, folding a checkpoint, rebuilding a handed-over partition's
//! indexes). A new kind is one line in the table.

use ractor::{Actor, ActorCell, ActorId, ActorRef};

use crate::domain::{
    campaign::CampaignState, cart::CartState, idempotency::IdemState, order::OrderState,
    payment::PaymentState, product::ProductState, sku::SkuState, Entity, Kind,
};
use crate::host::{EntityActor, EntityArgs, EntityMsg, Refusal, Request};
use crate::keys::EntityKey;

/// An entity kind's state type, as the partitions route it.
pub trait Routed: Entity {
    fn wrap(id: String, req: Request<Self>) -> Envelope;
}

/// A generic function over the state type of a kind: see [`visit`].
pub trait KindVisitor {
    type Out;
    fn visit<E: Routed>(self) -> Self::Out;
}

/// Starts the actor of one entity, supervised by `sup` (its partition).
async fn spawn_one<E: Routed>(
    args: EntityArgs,
    sup: ActorCell,
) -> Result<ActorRef<EntityMsg<E>>, String> {
    Actor::spawn_linked(None, EntityActor::<E>::default(), args, sup)
        .await
        .map(|(a, _)| a)
        .map_err(|e| format!("activation failed: {e}"))
}

/// Sends `req` to the actor; gives the envelope back if the actor is gone. (`None`: the
/// message went down with the actor; its caller's reply port is dropped and the caller
/// sees that.)
fn cast<E: Routed>(
    a: &ActorRef<EntityMsg<E>>,
    id: String,
    req: Request<E>,
) -> Result<(), Option<Box<Envelope>>> {
    a.cast(EntityMsg::Cmd(Box::new(req))).map_err(|e| match e {
        ractor::MessagingErr::SendErr(EntityMsg::Cmd(req)) => Some(Box::new(E::wrap(id, *req))),
        _ => None,
    })
}

/// Answers a request with a refusal that carries no domain error.
fn refuse_request<E: Entity>(req: Request<E>, why: Refusal<()>) {
    let why = match why {
        Refusal::Overloaded(w) => Refusal::Overloaded(w),
        Refusal::Unavailable(w) => Refusal::Unavailable(w),
        Refusal::Moved => Refusal::Moved,
        Refusal::Domain(()) => Refusal::Unavailable("refused".into()),
    };
    let _ = req.reply.send(Err(why));
}

impl Envelope {
    pub fn key(&self) -> EntityKey {
        EntityKey::new(self.kind(), self.id().to_owned())
    }

    /// Answers the request with `Unavailable` (the entity could not be started).
    pub(crate) fn refuse(self, why: String) {
        self.answer(Refusal::Unavailable(why));
    }

    /// Answers the request with `Overloaded` (the entity's queue is full).
    pub(crate) fn overload(self) {
        let what = format!("{:?} {}", self.kind(), self.id()).to_lowercase();
        self.answer(Refusal::Overloaded(what));
    }

    /// Answers the request with `Moved` (the partition is fenced).
    pub(crate) fn moved(self) {
        self.answer(Refusal::Moved);
    }
}

macro_rules! kinds {
    ($($kind:ident => $state:ty),* $(,)?) => {
        /// A command for one entity of any kind: the entity's id and the request.
        pub enum Envelope {
            $($kind(String, Request<$state>),)*
        }

        $(impl Routed for $state {
            fn wrap(id: String, req: Request<Self>) -> Envelope {
                Envelope::$kind(id, req)
            }
        })*

        impl Envelope {
            pub fn kind(&self) -> Kind {
                match self {
                    $(Envelope::$kind(..) => Kind::$kind,)*
                }
            }

            pub fn id(&self) -> &str {
                match self {
                    $(Envelope::$kind(id, _) => id,)*
                }
            }

            fn answer(self, why: Refusal<()>) {
                match self {
                    $(Envelope::$kind(_, req) => refuse_request(req, why),)*
                }
            }
        }

        /// The handle of a running entity actor of any kind.
        #[derive(Clone)]
        pub(crate) enum AnyRef {
            $($kind(ActorRef<EntityMsg<$state>>),)*
        }

        impl AnyRef {
            pub(crate) fn id(&self) -> ActorId {
                match self {
                    $(AnyRef::$kind(a) => a.get_id(),)*
                }
            }

            pub(crate) fn passivate(&self) {
                match self {
                    $(AnyRef::$kind(a) => {
                        let _ = a.cast(EntityMsg::Passivate);
                    })*
                }
            }

            /// Sends the envelope to this actor; gives it back if the actor is gone (or,
            /// which never happens, is of another kind).
            pub(crate) fn send(&self, env: Box<Envelope>) -> Result<(), Option<Box<Envelope>>> {
                match (self, *env) {
                    $((AnyRef::$kind(a), Envelope::$kind(id, req)) => cast(a, id, req),)*
                    #[allow(unreachable_patterns)]
                    (_, env) => Err(Some(Box::new(env))),
                }
            }
        }

        /// Starts the actor of an entity of `kind`, supervised by `sup`.
        pub(crate) async fn spawn(
            kind: Kind,
            args: EntityArgs,
            sup: ActorCell,
        ) -> Result<AnyRef, String> {
            Ok(match kind {
                $(Kind::$kind => AnyRef::$kind(spawn_one::<$state>(args, sup).await?),)*
            })
        }

        /// Every kind, in the table's order.
        pub const ALL: &[Kind] = &[$(Kind::$kind),*];

        /// Runs `visitor` for the state type of `kind`.
        pub fn visit<V: KindVisitor>(kind: Kind, visitor: V) -> V::Out {
            match kind {
                $(Kind::$kind => visitor.visit::<$state>(),)*
            }
        }
    };
}

kinds! {
    Product => ProductState,
    Sku => SkuState,
    Cart => CartState,
    Order => OrderState,
    Idempotency => IdemState,
    Payment => PaymentState,
    Campaign => CampaignState,
}

#[cfg(test)]
mod tests {
    use super::*;

    struct KindOf;
    impl KindVisitor for KindOf {
        type Out = Kind;
        fn visit<E: Routed>(self) -> Kind {
            E::KIND
        }
    }

    #[test]
    fn every_row_of_the_table_hosts_its_own_kind() {
        assert_eq!(ALL.len(), 7);
        for &kind in ALL {
            assert_eq!(visit(kind, KindOf), kind, "the table's row for {kind:?}");
        }
    }
}
