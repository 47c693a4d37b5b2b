//! The Debian packages, end to end (`tests/packages.sh`): built from the tests' debug binaries
//! with generated keys, refused by minisign and apt when tampered with or signed by another key,
//! installed with apt from the signed repository into a clean Debian root booted with
//! systemd-nspawn, run as their hardened units, upgraded, removed and purged. Root only
//! (mmdebstrap, systemd-nspawn); needs deb.debian.org for the clean root.

mod common;

use std::process::Command;

#[test]
#[ignore = "needs root"]
fn packages_install_from_the_signed_repository_run_upgrade_and_purge() {
    // packaging/build --profile debug packages these; tests/run has just built them.
    for b in ["pinhole", "pinholed", "pinhole-gateway", "pinhole-site"] {
        common::bin(b);
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("tests/packages.sh"))
        .output()
        .expect("tests/packages.sh");
    let text = common::text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("packages: all checks passed"), "{text}");
}
