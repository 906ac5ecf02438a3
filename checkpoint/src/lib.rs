//! Sharded, checksummed checkpoints committed all-or-nothing across ranks.
//! This crate saves named byte ranges and knows nothing about models.
