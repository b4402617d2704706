//! Writes `PAD_MIB` MiB (0 when unset) of pseudo-random bytes to `$OUT_DIR/pad.bin`, which the
//! plugin includes: incompressible, so the file on disk, the host's hash and copy of it, and its
//! mapping all carry the full size. `PAD_VERSION` seeds the generator, so that v1 and v2 of one
//! size differ in every page, not only in the answer.

use std::{env, fs, io::Write, path::Path};

fn main() {
    println!("cargo:rerun-if-env-changed=PAD_MIB");
    println!("cargo:rerun-if-env-changed=PAD_VERSION");
    let mib: usize = env::var("PAD_MIB").map_or(0, |v| v.parse().expect("PAD_MIB: a number"));
    let version = env::var("PAD_VERSION").unwrap_or_else(|_| "v1".into());
    // xorshift64*: a few lines for bytes no compressor or deduplication can shrink.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15
        ^ version
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    let mut out = Vec::with_capacity(mib << 20);
    while out.len() < mib << 20 {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    let path = Path::new(&env::var("OUT_DIR").unwrap()).join("pad.bin");
    fs::File::create(path).unwrap().write_all(&out).unwrap();
}
