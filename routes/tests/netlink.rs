//! Real routes through a real TUN device (root only).

use std::net::Ipv4Addr;
use std::process::Command;

use pinhole_adapter::tun::Tun;
use pinhole_routes::{PROTOCOL, Routes};

fn our_routes() -> String {
    let out = Command::new("ip")
        .args(["-4", "route", "show", "proto", &PROTOCOL.to_string()])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
#[ignore = "needs root"]
async fn add_remove_sweep_and_vanish_with_the_device() {
    let tun = Tun::create("phtest-rt0", Ipv4Addr::new(100, 127, 254, 1), 32).expect("tun");
    let mut routes = Routes::new(tun.index().expect("index")).expect("netlink");
    let a = Ipv4Addr::new(198, 18, 0, 7);
    let b = Ipv4Addr::new(198, 18, 0, 8);
    routes.add(a).await.expect("add a");
    routes.add(b).await.expect("add b");
    let shown = our_routes();
    assert!(shown.contains("198.18.0.7 dev phtest-rt0"), "{shown}");
    assert!(shown.contains("198.18.0.8 dev phtest-rt0"), "{shown}");
    routes.remove(a).await.expect("remove");
    assert!(!our_routes().contains("198.18.0.7"));
    // A leftover with our tag on another device is swept.
    let ok = Command::new("ip")
        .args([
            "route",
            "add",
            "198.18.0.9/32",
            "dev",
            "lo",
            "proto",
            &PROTOCOL.to_string(),
        ])
        .status()
        .expect("ip");
    assert!(ok.success());
    assert!(routes.sweep().await.expect("sweep") >= 2);
    assert!(!our_routes().contains("198.18.0.9"));
    assert!(!our_routes().contains("198.18.0.8"));
    // Closing the device takes its routes with it.
    routes.add(b).await.expect("add again");
    drop(tun);
    assert!(!our_routes().contains("198.18.0.8"), "{}", our_routes());
}
