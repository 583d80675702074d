//! Catalog operations: products and their SKUs, stock and prices.

use crate::domain::product::{Product, ProductCommand};
use crate::domain::sku::{SkuCommand, SkuView};
use crate::domain::{Kind, Money, ProductStatus};
use crate::error::{Result, ShopError};
use crate::errors_map::{product_err, sku_err};
use crate::route::{IndexFilter, ScanRequest};

use super::*;

impl Shop {
    pub async fn create_product(&self, input: NewProduct) -> Result<ProductDetail> {
        let now = self.now_ms();
        let product = Product {
            product_id: input.product_id.clone(),
            title: input.title,
            category: input.category,
            brand: input.brand,
            description: input.description,
            status: input.status,
            sku_ids: input.skus.iter().map(|s| s.sku_id.clone()).collect(),
            created_at: now,
            updated_at: now,
            version: 0,
        };
        let created = self
            .product(&input.product_id, ProductCommand::Create(product))
            .await
            .map_err(|r| product_err(r, &input.product_id))?;
        let mut skus = Vec::with_capacity(input.skus.len());
        for s in &input.skus {
            let cmd = SkuCommand::Create {
                sku_id: s.sku_id.clone(),
                product_id: input.product_id.clone(),
                name: s.name.clone(),
                specs: s.specs.clone(),
                price: s.price.clone(),
                market_price: s.market_price.clone(),
                product_status: input.status,
                low_stock_threshold: s.low_stock_threshold,
                stock: s.stock,
            };
            match self.sku(&s.sku_id, cmd).await {
                Ok(Some(view)) => skus.push(view),
                Ok(None) => {}
                Err(refusal) => {
                    let err = sku_err(refusal, &s.sku_id);
                    // Roll the saga back: what this request created goes away, including
                    // a SKU whose create timed out (it may still land; the discard is
                    // queued behind it).
                    let mut undo: Vec<&str> = skus.iter().map(|v| v.sku_id.as_str()).collect();
                    if matches!(err, ShopError::Unavailable(_)) {
                        undo.push(&s.sku_id);
                    }
                    for sku_id in undo {
                        if let Err(e) = self.sku(sku_id, SkuCommand::Discard).await {
                            tracing::error!(sku = %sku_id, error = ?e, "rolling back a SKU failed");
                        }
                    }
                    if let Err(e) = self
                        .product(&input.product_id, ProductCommand::Discard)
                        .await
                    {
                        tracing::error!(product = %input.product_id, error = ?e, "rolling back a product failed");
                    }
                    return Err(err);
                }
            }
        }
        let product =
            created.ok_or_else(|| ShopError::Internal("created product has no state".into()))?;
        Ok(ProductDetail { product, skus })
    }

    pub async fn get_product(&self, id: &str) -> Result<ProductDetail> {
        let product = self
            .product(id, ProductCommand::Get)
            .await
            .map_err(|r| product_err(r, id))?
            .ok_or_else(|| ShopError::NotFound(format!("product {id}")))?;
        let mut skus = Vec::with_capacity(product.sku_ids.len());
        for sku_id in &product.sku_ids {
            if let Some(v) = self
                .sku(sku_id, SkuCommand::Get)
                .await
                .map_err(|r| sku_err(r, sku_id))?
            {
                skus.push(v);
            }
        }
        Ok(ProductDetail { product, skus })
    }

    pub async fn list_products(
        &self,
        category: Option<&str>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<ProductDetail>> {
        let filter = match category {
            Some(c) => IndexFilter::ValueIs(c.as_bytes().to_vec()),
            None => IndexFilter::All,
        };
        let (ids, next_cursor) = self
            .scan_index(ScanRequest {
                prefix: b"I/p/".to_vec(),
                kind: Kind::Product,
                cursor: cursor.map(str::to_owned),
                reverse: false,
                limit,
                filter,
                partition: None,
            })
            .await?;
        let mut items = Vec::with_capacity(ids.len());
        for id in &ids {
            match self.get_product(id).await {
                Ok(p) => items.push(p),
                Err(ShopError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Page { items, next_cursor })
    }

    pub async fn update_product(
        &self,
        id: &str,
        title: Option<String>,
        description: Option<String>,
        status: Option<ProductStatus>,
    ) -> Result<ProductDetail> {
        let product = self
            .product(
                id,
                ProductCommand::Update {
                    title,
                    description,
                    status,
                },
            )
            .await
            .map_err(|r| product_err(r, id))?
            .ok_or_else(|| ShopError::NotFound(format!("product {id}")))?;
        if let Some(status) = status {
            for sku_id in &product.sku_ids {
                self.sku(sku_id, SkuCommand::SetProductStatus(status))
                    .await
                    .map_err(|r| sku_err(r, sku_id))?;
            }
        }
        self.get_product(id).await
    }

    pub async fn get_sku(&self, id: &str) -> Result<SkuView> {
        self.sku(id, SkuCommand::Get)
            .await
            .map_err(|r| sku_err(r, id))?
            .ok_or_else(|| ShopError::NotFound(format!("sku {id}")))
    }

    pub async fn adjust_stock(&self, id: &str, delta: i64, reason: String) -> Result<SkuView> {
        self.sku(id, SkuCommand::AdjustStock { delta, reason })
            .await
            .map_err(|r| sku_err(r, id))?
            .ok_or_else(|| ShopError::NotFound(format!("sku {id}")))
    }

    pub async fn set_price(&self, id: &str, price: Money) -> Result<SkuView> {
        self.sku(id, SkuCommand::SetPrice(price))
            .await
            .map_err(|r| sku_err(r, id))?
            .ok_or_else(|| ShopError::NotFound(format!("sku {id}")))
    }
}
