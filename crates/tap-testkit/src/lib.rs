//! tap-testkit: loopback fakes.
