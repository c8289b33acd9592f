//! Writes `include/pipit.h` from `src/lib.rs` with cbindgen, when the header it makes differs
//! from the committed one (so the committed header is always the built library's).

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    println!("cargo:rerun-if-changed=src/lib.rs");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let header = cbindgen::Builder::new()
        .with_src(dir.join("src/lib.rs"))
        .with_config(config)
        .with_after_include(format!(
            "\n/* The version of pipit this header comes from. */\n#define PIPIT_VERSION \"{}\"",
            std::env::var("CARGO_PKG_VERSION").expect("cargo sets it")
        ))
        .generate()
        .expect("cbindgen reads src/lib.rs");
    let mut text = Vec::new();
    header.write(&mut text);
    let path = dir.join("include/pipit.h");
    if std::fs::read(&path).ok().as_deref() != Some(text.as_slice()) {
        std::fs::write(&path, &text).expect("writing include/pipit.h");
    }
}
