//! Shared fixtures for the certs integration tests.
#![allow(dead_code)]

use pinhole_certs::{CertificateAuthority, GatewayInfo, Identity, Pin, Validity};

/// A gateway CA with a server identity and a technician whose bundle pins that server.
pub struct World {
    pub ca: CertificateAuthority,
    pub server: Identity,
    pub info: GatewayInfo,
}

impl World {
    pub fn new() -> Self {
        let ca = CertificateAuthority::generate("acme").expect("ca");
        let server = ca
            .issue_server(
                &["localhost".into(), "127.0.0.1".into()],
                Validity::days_from_now(30),
            )
            .expect("server");
        let info = GatewayInfo::new(
            vec!["127.0.0.1:443".parse().expect("addr")],
            Pin::of_certificate(server.certificate()).expect("pin"),
        )
        .expect("info");
        Self { ca, server, info }
    }

    pub fn technician(&self, name: &str) -> Identity {
        self.ca
            .issue_technician(name, &self.info, Validity::days_from_now(30))
            .expect("technician")
    }
}
