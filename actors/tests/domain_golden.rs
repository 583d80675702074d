//! Golden bytes of logged events. Events are written to the log as bincode 2 (serde,
//! standard config) and read back by every later release, so their layout MUST NOT change:
//! new facts get new variants appended at the end of the enum. If one of these tests fails,
//! a released layout changed; add a variant instead of editing one.

use std::collections::BTreeMap;

use serde::{de::DeserializeOwned, Serialize};
use shardmall_actors::domain::cart::CartEvent;
use shardmall_actors::domain::idempotency::{IdemEvent, StoredResponse};
use shardmall_actors::domain::order::{CancelReason, Line, OrderEvent, OrderPlaced};
use shardmall_actors::domain::product::{ProductCreated, ProductEvent};
use shardmall_actors::domain::sku::{SkuCreated, SkuEvent};
use shardmall_actors::domain::{Address, Money, ProductStatus};

const AT: u64 = 1_700_000_000_000;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks the encoding of `event` against `golden` (hex) and that it decodes back.
#[track_caller]
fn assert_golden<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    event: &T,
    golden: &str,
) {
    let cfg = bincode::config::standard();
    let bytes = bincode::serde::encode_to_vec(event, cfg).expect("encodes");
    assert_eq!(hex(&bytes), golden, "the layout of {event:?} changed");
    let (back, used): (T, usize) = bincode::serde::decode_from_slice(&bytes, cfg).expect("decodes");
    assert_eq!(used, bytes.len());
    assert_eq!(&back, event);
}

fn cny(amount: i64) -> Money {
    Money::new(amount, "CNY")
}

#[test]
fn product_created_layout() {
    let ev = ProductEvent::Created(ProductCreated {
        product_id: "p1".into(),
        title: "Phone".into(),
        category: "phones".into(),
        brand: "Acme".into(),
        description: "d".into(),
        status: ProductStatus::OnShelf,
        sku_ids: vec!["s1".into()],
        at: AT,
    });
    assert_golden(
        &ev,
        "000270310550686f6e650670686f6e65730441636d6501640101027331fd0068e5cf8b010000",
    );
}

#[test]
fn product_updated_layout() {
    let ev = ProductEvent::Updated {
        title: None,
        description: Some("new".into()),
        status: Some(ProductStatus::OffShelf),
        at: AT,
    };
    assert_golden(&ev, "010001036e65770102fd0068e5cf8b010000");
}

#[test]
fn sku_created_layout() {
    let ev = SkuEvent::Created(SkuCreated {
        sku_id: "s1".into(),
        product_id: "p1".into(),
        name: "Red".into(),
        specs: BTreeMap::from([("color".into(), "red".into())]),
        price: cny(799_900),
        market_price: Some(cny(899_900)),
        product_status: ProductStatus::OnShelf,
        low_stock_threshold: 5,
        stock: 100,
        at: AT,
    });
    assert_golden(&ev, "00027331027031035265640105636f6c6f7203726564fc3869180003434e5901fc78761b0003434e59010564fd0068e5cf8b010000");
}

#[test]
fn sku_reserved_layout() {
    let ev = SkuEvent::Reserved {
        order_id: "o1".into(),
        quantity: 2,
        expires_at: AT + 1_800_000,
        at: AT,
    };
    assert_golden(&ev, "05026f3102fd40df00d08b010000fd0068e5cf8b010000");
}

#[test]
fn sku_restocked_layout() {
    let ev = SkuEvent::Restocked {
        order_id: "o1".into(),
        quantity: 2,
        at: AT,
    };
    assert_golden(&ev, "09026f3102fd0068e5cf8b010000");
}

#[test]
fn cart_item_set_layout() {
    let ev = CartEvent::ItemSet {
        sku_id: "s1".into(),
        quantity: 3,
    };
    assert_golden(&ev, "0002733103");
}

#[test]
fn order_placed_layout() {
    let ev = OrderEvent::Placed(OrderPlaced {
        order_id: "o1".into(),
        buyer: "alice".into(),
        lines: vec![Line {
            sku_id: "s1".into(),
            name: "Red".into(),
            unit_price: cny(799_900),
            quantity: 1,
        }],
        total: cny(799_900),
        shipping_address: Some(Address {
            name: "Li".into(),
            phone: "1".into(),
            line1: "Road 1".into(),
            city: "Hangzhou".into(),
            country: "CN".into(),
        }),
        payment_deadline: AT + 1_800_000,
        campaign_id: None,
        at: AT,
    });
    assert_golden(&ev, "00026f3105616c6963650102733103526564fc3869180003434e5901fc3869180003434e5901024c69013106526f616420310848616e677a686f7502434efd40df00d08b01000000fd0068e5cf8b010000");
}

#[test]
fn order_cancelled_layout() {
    let ev = OrderEvent::Cancelled {
        reason: CancelReason::Expired,
        at: AT,
    };
    assert_golden(&ev, "0402fd0068e5cf8b010000");
}

#[test]
fn idempotency_completed_layout() {
    let ev = IdemEvent::Completed {
        scope: "POST /v1/orders\nk1".into(),
        response: StoredResponse {
            status: 201,
            body: b"{}".to_vec(),
        },
        at: AT,
    };
    assert_golden(
        &ev,
        "0112504f5354202f76312f6f72646572730a6b31c9027b7dfd0068e5cf8b010000",
    );
}

#[test]
fn payment_claimed_layout() {
    let ev = shardmall_actors::domain::payment::PaymentEvent::Claimed {
        order_id: "o1".into(),
        at: AT,
    };
    assert_golden(&ev, "00026f31fd0068e5cf8b010000");
}

#[test]
fn order_payment_flagged_layout() {
    let ev = OrderEvent::PaymentFlagged {
        payment_id: "pay-1".into(),
        amount: cny(500),
        at: AT,
    };
    assert_golden(&ev, "0b057061792d31fbe80303434e59fd0068e5cf8b010000");
}

#[test]
fn campaign_events_layout() {
    use shardmall_actors::domain::campaign::{CampaignEvent, CampaignTerms};
    let created = CampaignEvent::Created(CampaignTerms {
        campaign_id: "c1".into(),
        sku_id: "s1".into(),
        product_id: "p1".into(),
        sku_name: "Red".into(),
        price: cny(100),
        quantity: 1000,
        starts_at: AT,
        ends_at: AT + 3_600_000,
        per_buyer_limit: 1,
        payment_timeout_ms: 600_000,
        created_at: AT,
    });
    assert_golden(&created, "0002633102733102703103526564c803434e59fbe803fd0068e5cf8b010000fd80561cd08b01000001fcc0270900fd0068e5cf8b010000");
    let claimed = CampaignEvent::Claimed {
        order_id: "o1".into(),
        buyer: "b1".into(),
        quantity: 1,
        expires_at: AT + 900_000,
        at: AT,
    };
    assert_golden(
        &claimed,
        "03026f3102623101fda023f3cf8b010000fd0068e5cf8b010000",
    );
    let rest = [
        CampaignEvent::Opened { at: AT },
        CampaignEvent::Discarded { at: AT },
        CampaignEvent::Committed {
            order_id: "o1".into(),
            at: AT,
        },
        CampaignEvent::Released {
            order_id: "o1".into(),
            at: AT,
        },
        CampaignEvent::Expired {
            order_id: "o1".into(),
            at: AT,
        },
        CampaignEvent::Ended { at: AT },
    ];
    let goldens = [
        "01fd0068e5cf8b010000",
        "02fd0068e5cf8b010000",
        "04026f31fd0068e5cf8b010000",
        "05026f31fd0068e5cf8b010000",
        "06026f31fd0068e5cf8b010000",
        "07fd0068e5cf8b010000",
    ];
    for (ev, golden) in rest.iter().zip(goldens) {
        assert_golden(ev, golden);
    }
    let bought = CampaignEvent::Bought {
        order_id: "o1".into(),
        buyer: "b1".into(),
        quantity: 1,
        expires_at: AT + 900_000,
        at: AT,
        shipping_address: None,
        idem: Some(shardmall_actors::domain::campaign::IdemTag {
            key: 0x0102,
            body: 7,
        }),
    };
    assert_golden(
        &bought,
        "08026f3102623101fda023f3cf8b010000fd0068e5cf8b0100000001fb020107",
    );
}

#[test]
fn sku_campaign_events_layout() {
    let carved = SkuEvent::CampaignCarved {
        campaign_id: "c1".into(),
        quantity: 1000,
        at: AT,
    };
    assert_golden(&carved, "0a026331fbe803fd0068e5cf8b010000");
    let synced = SkuEvent::CampaignSynced {
        campaign_id: "c1".into(),
        version: 7,
        held: 990,
        sold: 10,
        at: AT,
    };
    assert_golden(&synced, "0b02633107fbde030afd0068e5cf8b010000");
    let restocked = SkuEvent::CampaignRestocked {
        campaign_id: "c1".into(),
        order_id: "o1".into(),
        quantity: 1,
        at: AT,
    };
    assert_golden(&restocked, "0c026331026f3101fd0068e5cf8b010000");
}
