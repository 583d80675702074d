//! A product (SPU): title, category, brand, description, status, and the ids of its SKUs.
//!
//! The product holds no stock; its SKUs do. Creating a product with its SKUs is a saga
//! (DESIGN.md, Settled questions): `Discard` is the rollback step.

use serde::{Deserialize, Serialize};

use super::common::{Millis, ProductStatus};
use super::{Entity, Kind};

/// Index key prefix: `I/p/<product_id>` -> category, for catalog lists.
pub const INDEX_PREFIX: &[u8] = b"I/p/";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductState {
    pub product: Option<Product>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    pub product_id: String,
    pub title: String,
    pub category: String,
    pub brand: String,
    pub description: String,
    pub status: ProductStatus,
    pub sku_ids: Vec<String>,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// Bumped by every event; 1 after creation.
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProductCommand {
    /// Creates the product. Its timestamps are set to the command's `now` and its version
    /// to 1, whatever the caller put there.
    Create(Product),
    /// Changes the fields given; none given is accepted and changes nothing.
    Update {
        title: Option<String>,
        description: Option<String>,
        status: Option<ProductStatus>,
    },
    /// Saga rollback: removes the product. Idempotent.
    Discard,
    Get,
}

/// The facts of a product's life. Variants are only ever appended (bincode encodes the
/// variant by position).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProductEvent {
    Created(ProductCreated),
    Updated {
        title: Option<String>,
        description: Option<String>,
        status: Option<ProductStatus>,
        at: Millis,
    },
    Discarded {
        at: Millis,
    },
}

/// The payload of [`ProductEvent::Created`]: its own type, so that a field added to
/// [`Product`] later does not change the layout of events already logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductCreated {
    pub product_id: String,
    pub title: String,
    pub category: String,
    pub brand: String,
    pub description: String,
    pub status: ProductStatus,
    pub sku_ids: Vec<String>,
    pub at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ProductError {
    #[error("product not found")]
    NotFound,
    #[error("a product with this id already exists")]
    AlreadyExists,
}

impl Entity for ProductState {
    type Command = ProductCommand;
    type Event = ProductEvent;
    type Error = ProductError;
    type View = Option<Product>;

    const KIND: Kind = Kind::Product;

    fn decide(&self, cmd: &ProductCommand, now: Millis) -> Result<Vec<ProductEvent>, ProductError> {
        match cmd {
            ProductCommand::Create(p) => {
                if self.product.is_some() {
                    return Err(ProductError::AlreadyExists);
                }
                Ok(vec![ProductEvent::Created(ProductCreated {
                    product_id: p.product_id.clone(),
                    title: p.title.clone(),
                    category: p.category.clone(),
                    brand: p.brand.clone(),
                    description: p.description.clone(),
                    status: p.status,
                    sku_ids: p.sku_ids.clone(),
                    at: now,
                })])
            }
            ProductCommand::Update {
                title,
                description,
                status,
            } => {
                let p = self.product.as_ref().ok_or(ProductError::NotFound)?;
                // Only what actually changes is recorded.
                let title = title.clone().filter(|t| *t != p.title);
                let description = description.clone().filter(|d| *d != p.description);
                let status = status.filter(|s| *s != p.status);
                if title.is_none() && description.is_none() && status.is_none() {
                    return Ok(vec![]);
                }
                Ok(vec![ProductEvent::Updated {
                    title,
                    description,
                    status,
                    at: now,
                }])
            }
            ProductCommand::Discard => Ok(match self.product {
                Some(_) => vec![ProductEvent::Discarded { at: now }],
                None => vec![],
            }),
            ProductCommand::Get => Ok(vec![]),
        }
    }

    fn apply(&mut self, event: &ProductEvent) {
        match event {
            ProductEvent::Created(c) => {
                self.product = Some(Product {
                    product_id: c.product_id.clone(),
                    title: c.title.clone(),
                    category: c.category.clone(),
                    brand: c.brand.clone(),
                    description: c.description.clone(),
                    status: c.status,
                    sku_ids: c.sku_ids.clone(),
                    created_at: c.at,
                    updated_at: c.at,
                    version: 1,
                });
            }
            ProductEvent::Updated {
                title,
                description,
                status,
                at,
            } => {
                if let Some(p) = self.product.as_mut() {
                    if let Some(t) = title {
                        p.title.clone_from(t);
                    }
                    if let Some(d) = description {
                        p.description.clone_from(d);
                    }
                    if let Some(s) = status {
                        p.status = *s;
                    }
                    p.updated_at = *at;
                    p.version += 1;
                }
            }
            ProductEvent::Discarded { .. } => self.product = None,
        }
    }

    fn view(&self) -> Option<Product> {
        self.product.clone()
    }

    fn published(&self) -> Option<Option<Product>> {
        self.product.is_some().then(|| self.view())
    }

    fn index_entries(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        match &self.product {
            Some(p) => vec![(
                [INDEX_PREFIX, p.product_id.as_bytes()].concat(),
                p.category.as_bytes().to_vec(),
            )],
            None => vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Product {
        Product {
            product_id: "p1".into(),
            title: "Phone".into(),
            category: "phones".into(),
            brand: "Acme".into(),
            description: "A phone".into(),
            status: ProductStatus::OnShelf,
            sku_ids: vec!["s1".into(), "s2".into()],
            created_at: 0,
            updated_at: 0,
            version: 0,
        }
    }

    fn run(
        state: &mut ProductState,
        cmd: ProductCommand,
        now: Millis,
    ) -> Result<Vec<ProductEvent>, ProductError> {
        let events = state.decide(&cmd, now)?;
        for e in &events {
            state.apply(e);
        }
        Ok(events)
    }

    #[test]
    fn create_sets_times_and_version() {
        let mut s = ProductState::default();
        run(&mut s, ProductCommand::Create(sample()), 10).unwrap();
        let p = s.view().unwrap();
        assert_eq!((p.created_at, p.updated_at, p.version), (10, 10, 1));
        assert_eq!(
            s.index_entries(),
            vec![(b"I/p/p1".to_vec(), b"phones".to_vec())]
        );
    }

    #[test]
    fn create_twice_is_already_exists() {
        let mut s = ProductState::default();
        run(&mut s, ProductCommand::Create(sample()), 1).unwrap();
        assert_eq!(
            s.decide(&ProductCommand::Create(sample()), 2),
            Err(ProductError::AlreadyExists)
        );
    }

    #[test]
    fn update_of_missing_is_not_found() {
        let s = ProductState::default();
        let cmd = ProductCommand::Update {
            title: Some("x".into()),
            description: None,
            status: None,
        };
        assert_eq!(s.decide(&cmd, 1), Err(ProductError::NotFound));
    }

    #[test]
    fn update_changes_only_given_fields() {
        let mut s = ProductState::default();
        run(&mut s, ProductCommand::Create(sample()), 1).unwrap();
        let cmd = ProductCommand::Update {
            title: Some("Phone 2".into()),
            description: Some("A phone".into()),
            status: Some(ProductStatus::OffShelf),
        };
        let ev = run(&mut s, cmd, 5).unwrap();
        assert_eq!(
            ev,
            vec![ProductEvent::Updated {
                title: Some("Phone 2".into()),
                description: None,
                status: Some(ProductStatus::OffShelf),
                at: 5
            }]
        );
        let p = s.view().unwrap();
        assert_eq!(
            (p.title.as_str(), p.status, p.version, p.updated_at),
            ("Phone 2", ProductStatus::OffShelf, 2, 5)
        );
        let same = ProductCommand::Update {
            title: Some("Phone 2".into()),
            description: None,
            status: None,
        };
        assert_eq!(run(&mut s, same, 6).unwrap(), vec![]);
    }

    #[test]
    fn discard_removes_and_is_idempotent() {
        let mut s = ProductState::default();
        run(&mut s, ProductCommand::Create(sample()), 1).unwrap();
        assert_eq!(run(&mut s, ProductCommand::Discard, 2).unwrap().len(), 1);
        assert_eq!(s.view(), None);
        assert!(s.index_entries().is_empty());
        assert_eq!(run(&mut s, ProductCommand::Discard, 3).unwrap(), vec![]);
        assert_eq!(run(&mut s, ProductCommand::Get, 3).unwrap(), vec![]);
    }
}
