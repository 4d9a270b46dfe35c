//! Link `shoal` as a position-dependent executable: its `.data.rel.ro` then needs no
//! relocation at load, so every process (and every per-container monitor, a fork of the
//! runtime) maps those pages clean from the file instead of holding a private relocated copy,
//! and each start skips ~36k relative relocations. Go-built runc is non-PIE the same way.
fn main() {
    println!("cargo:rustc-link-arg-bins=-no-pie");
}
