//! tap-testkit: loopback fakes.
pub mod webhook_sink;
pub mod repo_builder;
pub mod fake_plc;
