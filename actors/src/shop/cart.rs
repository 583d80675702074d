//! The buyer's cart, priced from the SKUs.

use std::collections::BTreeMap;

use crate::domain::cart::CartCommand;
use crate::error::{Result, ShopError};
use crate::errors_map::cart_err;

use super::*;

impl Shop {
    pub async fn get_cart(&self, buyer: &str) -> Result<Vec<CartLine>> {
        let items = self.cart(buyer, CartCommand::Get).await.map_err(cart_err)?;
        self.price_cart(items).await
    }

    pub async fn set_cart_item(
        &self,
        buyer: &str,
        sku_id: &str,
        quantity: u64,
    ) -> Result<Vec<CartLine>> {
        if quantity > 0 {
            self.get_sku(sku_id).await?;
        }
        let cmd = CartCommand::SetItem {
            sku_id: sku_id.to_owned(),
            quantity,
        };
        let items = self.cart(buyer, cmd).await.map_err(cart_err)?;
        self.price_cart(items).await
    }

    pub async fn remove_cart_item(&self, buyer: &str, sku_id: &str) -> Result<Vec<CartLine>> {
        let items = self
            .cart(
                buyer,
                CartCommand::RemoveItem {
                    sku_id: sku_id.to_owned(),
                },
            )
            .await
            .map_err(cart_err)?;
        self.price_cart(items).await
    }

    async fn price_cart(&self, items: BTreeMap<String, u64>) -> Result<Vec<CartLine>> {
        let mut lines = Vec::with_capacity(items.len());
        for (sku_id, quantity) in items {
            match self.get_sku(&sku_id).await {
                Ok(sku) => lines.push(CartLine {
                    sku_id,
                    quantity,
                    unit_price: sku.price,
                }),
                // A SKU removed from the catalog simply drops out of the priced cart.
                Err(ShopError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(lines)
    }
}
