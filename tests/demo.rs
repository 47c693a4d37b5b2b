//! The README's first command, `lab/demo`, run non-interactively: its output shows a
//! technician reaching the PLC and the HMI and being refused the rest, and it leaves nothing
//! behind. Root only (network namespaces).

mod common;

use std::process::Command;

fn demo(args: &[&str], dir: &std::path::Path) -> (bool, String) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("lab/demo"))
        .args(args)
        // The tests' own debug build: the demo builds a release otherwise, minutes on 2 cores.
        .env("PINHOLE_DEMO_PROFILE", "debug")
        .env("PINHOLE_DEMO_DIR", dir)
        .env("TERM", "dumb")
        .output()
        .expect("lab/demo");
    (out.status.success(), common::text(&out))
}

fn namespaces() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "needs root"]
fn the_demo_shows_the_technician_reaching_one_device_and_cleans_up() {
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("demo");
    // A run left behind with --keep (as after an interruption)...
    let (ok, text) = demo(&["--keep"], &state);
    assert!(ok, "{text}");
    assert!(namespaces().contains("phd-tech"));
    assert!(text.contains("remove everything"), "{text}");
    // ...does not stop the next run, which cleans up after itself.
    let (ok, text) = demo(&[], &state);
    assert!(ok, "{text}");
    for expected in [
        "logged in as alice",
        "connected to plant-a/press-4-plc: device 192.168.0.10, ports tcp/102",
        "connected to plant-a/press-4-hmi",
        "192.168.0.10 dev pinhole0",
        "light output: 1",
        "PLC answered: S7-1500",
        "<h1>Press 4: running",
        "refused: TimeoutError",
        "light output: 0  (off again)",
        "session opened",
        "audit log intact",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    assert!(
        !text.lines().any(|l| l.trim_start().starts_with("REACHED")),
        "{text}"
    );
    assert!(!text.contains("exit status"), "a step failed:\n{text}");
    assert!(!namespaces().contains("phd-"), "{}", namespaces());
    assert!(!state.exists());
}
