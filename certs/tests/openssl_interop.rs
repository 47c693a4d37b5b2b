//! Interop with the real `openssl` command, in both directions.
//!
//! Passwords reach openssl through the environment (`-passin env:…`), never argv.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use pinhole_certs::ca::pem_encode;
use pinhole_certs::{Bundle, BundleError, GatewayInfo, Protection};

const PASSWORD: &str = "Tr0ub4dor&3 with spaces";

fn openssl(args: &[&str], dir: &Path) -> Output {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .env("PW", PASSWORD)
        .output()
        .expect("the openssl command must be installed (see .ci/run)")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "openssl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn bundle_from(world: &common::World) -> Bundle {
    Bundle::new(world.technician("alice")).expect("bundle")
}

#[test]
fn openssl_reads_our_modern_bundle() {
    let dir = tempfile::tempdir().expect("dir");
    let world = common::World::new();
    let bundle = bundle_from(&world);
    std::fs::write(
        dir.path().join("a.p12"),
        bundle
            .to_pkcs12(PASSWORD, Protection::Modern)
            .expect("export"),
    )
    .expect("write");
    let text = ok(openssl(
        &[
            "pkcs12", "-info", "-in", "a.p12", "-passin", "env:PW", "-nodes",
        ],
        dir.path(),
    ));
    assert!(text.contains("MAC: sha256"), "{text}");
    assert!(text.contains("PBES2, PBKDF2, AES-256-CBC"), "{text}");
    assert!(
        text.contains("CN = alice") || text.contains("CN=alice"),
        "{text}"
    );
    assert!(text.contains("BEGIN PRIVATE KEY"), "{text}");
    // Both certificates are there: the technician's and the CA's.
    assert_eq!(text.matches("BEGIN CERTIFICATE").count(), 2, "{text}");
}

#[test]
fn openssl_reads_our_legacy_bundle() {
    let dir = tempfile::tempdir().expect("dir");
    let bundle = bundle_from(&common::World::new());
    std::fs::write(
        dir.path().join("l.p12"),
        bundle
            .to_pkcs12(PASSWORD, Protection::Legacy)
            .expect("export"),
    )
    .expect("write");
    let text = ok(openssl(
        &[
            "pkcs12", "-info", "-in", "l.p12", "-passin", "env:PW", "-nodes",
        ],
        dir.path(),
    ));
    assert!(text.contains("MAC: sha1"), "{text}");
    assert!(text.contains("pbeWithSHA1And3-KeyTripleDES-CBC"), "{text}");
    assert!(!text.contains("PBES2"), "{text}");
}

#[test]
fn openssl_refuses_our_bundle_with_a_wrong_password() {
    let dir = tempfile::tempdir().expect("dir");
    let bundle = bundle_from(&common::World::new());
    std::fs::write(
        dir.path().join("a.p12"),
        bundle
            .to_pkcs12("other", Protection::Modern)
            .expect("export"),
    )
    .expect("write");
    let out = openssl(
        &[
            "pkcs12", "-info", "-in", "a.p12", "-passin", "env:PW", "-nodes",
        ],
        dir.path(),
    );
    assert!(!out.status.success());
}

#[test]
fn openssl_shows_the_gateway_extension() {
    let dir = tempfile::tempdir().expect("dir");
    let world = common::World::new();
    let tech = world.technician("alice");
    std::fs::write(
        dir.path().join("t.crt"),
        pem_encode("CERTIFICATE", tech.certificate()),
    )
    .expect("write");
    let text = ok(openssl(
        &["x509", "-in", "t.crt", "-noout", "-text"],
        dir.path(),
    ));
    assert!(
        text.contains(pinhole_certs::gateway_info::OID_DOTTED),
        "{text}"
    );
    assert!(text.contains("gateway=127.0.0.1:443"), "{text}");
    assert!(
        text.contains(&format!("pin={}", world.info.pin())),
        "{text}"
    );
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(text.contains("ASN1 OID: prime256v1"), "{text}");
}

/// The technician's key, certificate and CA as PEM files for `openssl pkcs12 -export`.
fn write_pem_parts(dir: &Path, world: &common::World) {
    let tech = world.technician("bob");
    std::fs::write(dir.join("t.key"), tech.key_pem().as_bytes()).expect("key");
    std::fs::write(
        dir.join("t.crt"),
        pem_encode("CERTIFICATE", tech.certificate()),
    )
    .expect("crt");
    std::fs::write(dir.join("ca.crt"), world.ca.cert_pem()).expect("ca");
}

fn export_with_openssl(dir: &Path, extra: &[&str]) -> Vec<u8> {
    let mut args = vec![
        "pkcs12",
        "-export",
        "-inkey",
        "t.key",
        "-in",
        "t.crt",
        "-certfile",
        "ca.crt",
        "-out",
        "o.p12",
        "-passout",
        "env:PW",
    ];
    args.extend_from_slice(extra);
    ok(openssl(&args, dir));
    std::fs::read(dir.join("o.p12")).expect("read")
}

#[test]
fn openssl_bundles_import_default_legacy_and_3des() {
    let dir = tempfile::tempdir().expect("dir");
    let world = common::World::new();
    write_pem_parts(dir.path(), &world);
    let variants: [&[&str]; 3] = [
        &[],
        &["-legacy"],
        &[
            "-keypbe",
            "PBE-SHA1-3DES",
            "-certpbe",
            "PBE-SHA1-3DES",
            "-macalg",
            "sha1",
        ],
    ];
    for extra in variants {
        let p12 = export_with_openssl(dir.path(), extra);
        let bundle =
            Bundle::from_pkcs12(&p12, PASSWORD).unwrap_or_else(|e| panic!("{extra:?}: {e}"));
        assert_eq!(bundle.peer().name, "bob");
        assert_eq!(bundle.ca(), world.ca.certificate());
        assert_eq!(bundle.gateway(), &world.info);
        let info = GatewayInfo::from_certificate(bundle.identity().certificate()).expect("info");
        assert_eq!(info.pin(), world.info.pin());

        let err = Bundle::from_pkcs12(&p12, "not the password").expect_err("wrong password");
        assert!(
            matches!(err, BundleError::WrongPassword),
            "{extra:?}: {err}"
        );
        assert_eq!(err.to_string(), "wrong password for this bundle");

        let err = Bundle::from_pkcs12(&p12[..p12.len() * 2 / 3], PASSWORD).expect_err("truncated");
        assert!(matches!(err, BundleError::Malformed(_)), "{extra:?}: {err}");
        assert!(err.to_string().contains("damaged"), "{err}");
    }
}

#[test]
fn openssl_bundle_without_the_ca_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let world = common::World::new();
    write_pem_parts(dir.path(), &world);
    ok(openssl(
        &[
            "pkcs12", "-export", "-inkey", "t.key", "-in", "t.crt", "-out", "n.p12", "-passout",
            "env:PW",
        ],
        dir.path(),
    ));
    let p12 = std::fs::read(dir.path().join("n.p12")).expect("read");
    assert!(matches!(
        Bundle::from_pkcs12(&p12, PASSWORD),
        Err(BundleError::NoCa)
    ));
}
