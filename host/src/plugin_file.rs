//! What a plugin file is, told from its first bytes before any process loads it.
//!
//! `dlopen`'s own errors for the usual mistakes are cryptic ("invalid ELF header", "wrong ELF
//! class: ELFCLASS32"), and some mistakes never reach it: a crate built without
//! `crate-type = ["cdylib"]` produces an rlib (an `ar` archive) and no `.so` at all. The master
//! reads the header when it copies the file into the shadow store and says what the file is
//! and what to do, so these never even start a worker.

use std::path::Path;

/// ELF `e_machine` values of the architectures Rust targets commonly, with the names
/// `std::env::consts::ARCH` uses.
const MACHINES: &[(u16, &str)] = &[
    (3, "x86"),
    (8, "mips"),
    (20, "powerpc"),
    (21, "powerpc64"),
    (22, "s390x"),
    (40, "arm"),
    (43, "sparc64"),
    (62, "x86_64"),
    (183, "aarch64"),
    (243, "riscv64"),
    (258, "loongarch64"),
];

fn machine_name(machine: u16) -> String {
    MACHINES
        .iter()
        .find(|(m, _)| *m == machine)
        .map_or_else(|| format!("ELF machine {machine}"), |(_, n)| n.to_string())
}

/// Checks that `bytes` (the start of the file at `path` is enough) are a shared library this
/// host can load; the error is one paragraph that says what the file is instead.
pub fn check(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let shown = path.display();
    if bytes.starts_with(b"!<arch>\n") {
        return Err(format!(
            "{shown} is a static archive (an rlib or staticlib), not a shared library: the plugin \
             crate is built without `crate-type = [\"cdylib\"]`. Add `[lib] crate-type = \
             [\"cdylib\", \"rlib\"]` to its Cargo.toml, build it again and load the .so file."
        ));
    }
    if !bytes.starts_with(b"\x7fELF") || bytes.len() < 20 {
        let start: String = bytes
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ");
        return Err(format!(
            "{shown} is not a shared library (it starts with bytes {start}, not an ELF header). A \
             plugin is the .so file cargo builds from a crate with `crate-type = [\"cdylib\"]`; \
             check the path, or wait for the build to finish and reload."
        ));
    }
    let ours_64 = cfg!(target_pointer_width = "64");
    let class_64 = bytes[4] == 2;
    let little = bytes[5] == 1;
    let machine = if little {
        u16::from_le_bytes([bytes[18], bytes[19]])
    } else {
        u16::from_be_bytes([bytes[18], bytes[19]])
    };
    let found = machine_name(machine);
    let arch = std::env::consts::ARCH;
    if found != arch || class_64 != ours_64 || little != cfg!(target_endian = "little") {
        return Err(format!(
            "{shown} was built for {found} ({}-bit{}), but this host runs on {arch}: a plugin \
             must be built for the machine that loads it. Build it without --target (or with \
             the host's target) and reload.",
            if class_64 { 64 } else { 32 },
            if little { "" } else { ", big-endian" },
        ));
    }
    // e_type: 2 is an executable, 3 a shared object (or a position-independent executable).
    let e_type = if little {
        u16::from_le_bytes([bytes[16], bytes[17]])
    } else {
        u16::from_be_bytes([bytes[16], bytes[17]])
    };
    if e_type != 3 {
        return Err(format!(
            "{shown} is an ELF file but not a shared library (ELF type {e_type}; an executable \
             or an object file?). A plugin is the .so file cargo builds from a crate with \
             `crate-type = [\"cdylib\"]`."
        ));
    }
    Ok(())
}

/// For a plugin path that does not exist: a hint when cargo built the crate, but not as a
/// cdylib (an `libNAME.rlib` next to where `libNAME.so` was expected).
pub fn missing_hint(path: &Path) -> Option<String> {
    let rlib = path.with_extension("rlib");
    rlib.exists().then(|| {
        format!(
            " There is {} beside it, so the crate builds, but not as a shared library: add \
             `[lib] crate-type = [\"cdylib\", \"rlib\"]` to its Cargo.toml and build again.",
            rlib.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf(class: u8, machine: u16, e_type: u16) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = class;
        b[5] = 1;
        b[16..18].copy_from_slice(&e_type.to_le_bytes());
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b
    }

    #[test]
    fn tells_what_the_file_is() {
        let p = Path::new("libp.so");
        let here = MACHINES
            .iter()
            .find(|(_, n)| *n == std::env::consts::ARCH)
            .unwrap()
            .0;
        assert!(check(p, &elf(2, here, 3)).is_ok());
        let other = if here == 183 { 62 } else { 183 };
        let e = check(p, &elf(2, other, 3)).unwrap_err();
        assert!(e.contains("was built for"), "{e}");
        assert!(
            e.contains(&format!("runs on {}", std::env::consts::ARCH)),
            "{e}"
        );
        assert!(check(p, &elf(2, here, 2))
            .unwrap_err()
            .contains("not a shared library"));
        assert!(check(p, b"!<arch>\nstuff")
            .unwrap_err()
            .contains("crate-type"));
        assert!(check(p, b"hello world")
            .unwrap_err()
            .contains("68 65 6c 6c"));
    }
}
