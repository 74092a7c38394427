//! tap daemon library.
