//! The FFI types of plugin-api 0.2.0, frozen (see Cargo.toml): a test fixture builds a plugin
//! against them, as a plugin built before 0.2.1 was.

pub mod ffi;
