//! A buyer's cart: SKU ids and quantities. Prices are not stored; the cart is priced
//! with current prices each time it is read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::common::Millis;
use super::{Entity, Kind};

/// The most distinct SKUs one cart holds.
pub const MAX_ITEMS: usize = 100;
/// The largest quantity of one SKU in a cart.
pub const MAX_QUANTITY: u64 = 10_000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CartState {
    /// Quantity by SKU id; never 0.
    pub items: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CartCommand {
    /// Sets the quantity of one SKU; 0 removes it.
    SetItem {
        sku_id: String,
        quantity: u64,
    },
    RemoveItem {
        sku_id: String,
    },
    /// Removes the SKUs given (after a checkout from the cart).
    RemoveItems {
        sku_ids: Vec<String>,
    },
    Get,
}

/// Variants are only ever appended (bincode encodes the variant by position).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CartEvent {
    ItemSet { sku_id: String, quantity: u64 },
    ItemRemoved { sku_id: String },
    ItemsRemoved { sku_ids: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CartError {
    #[error("a cart holds at most {max} different items")]
    TooManyItems { max: usize },
    #[error("{0}")]
    BadRequest(String),
}

impl Entity for CartState {
    type Command = CartCommand;
    type Event = CartEvent;
    type Error = CartError;
    type View = BTreeMap<String, u64>;

    const KIND: Kind = Kind::Cart;

    fn decide(&self, cmd: &CartCommand, _now: Millis) -> Result<Vec<CartEvent>, CartError> {
        match cmd {
            CartCommand::SetItem {
                sku_id,
                quantity: 0,
            } => Ok(self.remove(sku_id)),
            CartCommand::SetItem { sku_id, quantity } => {
                if *quantity > MAX_QUANTITY {
                    return Err(CartError::BadRequest(format!(
                        "quantity must be at most {MAX_QUANTITY}"
                    )));
                }
                match self.items.get(sku_id) {
                    Some(q) if q == quantity => Ok(vec![]),
                    Some(_) => Ok(vec![CartEvent::ItemSet {
                        sku_id: sku_id.clone(),
                        quantity: *quantity,
                    }]),
                    None if self.items.len() >= MAX_ITEMS => {
                        Err(CartError::TooManyItems { max: MAX_ITEMS })
                    }
                    None => Ok(vec![CartEvent::ItemSet {
                        sku_id: sku_id.clone(),
                        quantity: *quantity,
                    }]),
                }
            }
            CartCommand::RemoveItem { sku_id } => Ok(self.remove(sku_id)),
            CartCommand::RemoveItems { sku_ids } => {
                let mut present: Vec<String> = sku_ids
                    .iter()
                    .filter(|id| self.items.contains_key(*id))
                    .cloned()
                    .collect();
                present.sort();
                present.dedup();
                if present.is_empty() {
                    return Ok(vec![]);
                }
                Ok(vec![CartEvent::ItemsRemoved { sku_ids: present }])
            }
            CartCommand::Get => Ok(vec![]),
        }
    }

    fn apply(&mut self, event: &CartEvent) {
        match event {
            CartEvent::ItemSet { sku_id, quantity } => {
                self.items.insert(sku_id.clone(), *quantity);
            }
            CartEvent::ItemRemoved { sku_id } => {
                self.items.remove(sku_id);
            }
            CartEvent::ItemsRemoved { sku_ids } => {
                for id in sku_ids {
                    self.items.remove(id);
                }
            }
        }
    }

    fn view(&self) -> BTreeMap<String, u64> {
        self.items.clone()
    }
}

impl CartState {
    fn remove(&self, sku_id: &str) -> Vec<CartEvent> {
        if self.items.contains_key(sku_id) {
            vec![CartEvent::ItemRemoved {
                sku_id: sku_id.to_owned(),
            }]
        } else {
            vec![]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: &mut CartState, cmd: CartCommand) -> Result<Vec<CartEvent>, CartError> {
        let events = s.decide(&cmd, 0)?;
        for e in &events {
            s.apply(e);
        }
        Ok(events)
    }

    fn set(sku: &str, quantity: u64) -> CartCommand {
        CartCommand::SetItem {
            sku_id: sku.into(),
            quantity,
        }
    }

    #[test]
    fn set_update_and_remove() {
        let mut c = CartState::default();
        run(&mut c, set("a", 2)).unwrap();
        run(&mut c, set("b", 1)).unwrap();
        assert_eq!(run(&mut c, set("a", 2)).unwrap(), vec![]);
        run(&mut c, set("a", 5)).unwrap();
        assert_eq!(c.view(), BTreeMap::from([("a".into(), 5), ("b".into(), 1)]));
        run(&mut c, set("a", 0)).unwrap();
        assert_eq!(run(&mut c, set("a", 0)).unwrap(), vec![]);
        run(&mut c, CartCommand::RemoveItem { sku_id: "b".into() }).unwrap();
        assert!(c.view().is_empty());
        assert_eq!(
            run(&mut c, CartCommand::RemoveItem { sku_id: "b".into() }).unwrap(),
            vec![]
        );
    }

    #[test]
    fn quantity_over_cap_is_bad_request() {
        let c = CartState::default();
        assert!(matches!(
            c.decide(&set("a", MAX_QUANTITY + 1), 0),
            Err(CartError::BadRequest(_))
        ));
        assert!(c.decide(&set("a", MAX_QUANTITY), 0).is_ok());
    }

    #[test]
    fn too_many_distinct_items_is_refused() {
        let mut c = CartState::default();
        for i in 0..MAX_ITEMS {
            run(&mut c, set(&format!("s{i}"), 1)).unwrap();
        }
        assert_eq!(
            c.decide(&set("one-more", 1), 0),
            Err(CartError::TooManyItems { max: MAX_ITEMS })
        );
        // Changing an item already there is still fine.
        assert!(c.decide(&set("s0", 3), 0).is_ok());
    }

    #[test]
    fn remove_items_removes_only_present_ones() {
        let mut c = CartState::default();
        run(&mut c, set("a", 1)).unwrap();
        run(&mut c, set("b", 1)).unwrap();
        let ev = run(
            &mut c,
            CartCommand::RemoveItems {
                sku_ids: vec!["b".into(), "x".into(), "b".into()],
            },
        )
        .unwrap();
        assert_eq!(
            ev,
            vec![CartEvent::ItemsRemoved {
                sku_ids: vec!["b".into()]
            }]
        );
        assert_eq!(
            run(
                &mut c,
                CartCommand::RemoveItems {
                    sku_ids: vec!["x".into()]
                }
            )
            .unwrap(),
            vec![]
        );
        assert_eq!(c.view(), BTreeMap::from([("a".into(), 1)]));
    }
}
