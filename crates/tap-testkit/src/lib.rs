//! tap-testkit: loopback fakes.
pub mod repo_builder;
