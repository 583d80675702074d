pub mod cart;
pub mod catalog;
pub mod ops;
pub mod orders;
