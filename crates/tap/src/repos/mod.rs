//! The tracked-repo state machine: what each firehose event or resync result does to a
//! repo, decided by pure functions ([`decide`], [`filter`]) and applied in one transaction.

pub mod decide;
pub mod engine;
pub mod filter;
pub mod handle_checks;
pub mod live_filters;
pub mod locks;
pub mod prepared;
pub mod rules;
