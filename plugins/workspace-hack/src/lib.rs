//! No code: this crate only depends on what the host's build enables, so that building one
//! in-repo plugin (`cargo build -p hello`) reuses the workspace build's dependencies instead of
//! compiling them again with the plugin's own, smaller, feature sets. Plugins outside this
//! repository do not need it.
