//! tap-testkit: loopback fakes.
pub mod webhook_sink;
pub mod repo_builder;
pub mod fake_plc;
pub mod fake_pds;
pub mod fake_relay;
