//! Integration tests for the host live in `integration/`; this crate has no library code.
