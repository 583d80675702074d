pub mod campaigns;
pub mod cart;
pub mod catalog;
pub mod cluster;
pub mod ops;
pub mod orders;
