//! The header `include/pipit.h`: cbindgen's output for this build (the build script, which
//! runs before this test is compiled, writes it), with every function of the ABI and the
//! version, and the one committed to git. The C example itself is `tests/c_library.rs`, at
//! the repository root.

use std::path::Path;
use std::process::Command;

/// The repository root.
fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("capi/ sits in the repository")
}

#[test]
fn the_committed_header_is_the_one_the_library_builds_from() {
    // The build script rewrites include/pipit.h whenever it differs from what cbindgen makes
    // of capi/src/lib.rs: after a build, a header that differs from git's was stale there.
    let header = std::fs::read_to_string(root().join("capi/include/pipit.h")).unwrap();
    for name in [
        "pipit_version",
        "pipit_last_error",
        "pipit_string_free",
        "pipit_plan",
        "pipit_generate",
        "pipit_evaluate",
        "pipit_trainer_new",
        "pipit_trainer_step",
        "pipit_trainer_run",
        "pipit_trainer_evaluate",
        "pipit_trainer_save",
        "pipit_trainer_free",
    ] {
        assert!(header.contains(&format!("{name}(")), "{name} in the header");
    }
    assert!(header.contains(&format!(
        "#define PIPIT_VERSION \"{}\"",
        env!("CARGO_PKG_VERSION")
    )));
    let git = Command::new("git")
        .current_dir(root())
        .args([
            "diff",
            "--exit-code",
            "--stat",
            "--",
            "capi/include/pipit.h",
        ])
        .output();
    match git {
        Ok(out) if out.status.code() == Some(128) => {
            eprintln!("skipped the comparison with git's header: not a git checkout")
        }
        Ok(out) => assert!(
            out.status.success(),
            "capi/include/pipit.h differs from the committed one; commit the regenerated header: {}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(e) => eprintln!("skipped the comparison with git's header: no git ({e})"),
    }
}
