//! The firehose stage: follow the relay's `subscribeRepos`, decode frames, dispatch them
//! with strict per-DID order, and persist the cursor as a low-water mark.

pub mod cursor;
