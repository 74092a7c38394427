//! tap-atproto: protocol core.
