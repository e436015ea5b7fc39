//! Dev-mode certificates: a CA, a server certificate for `localhost` and
//! 127.0.0.1, and one client certificate, all PEM files in one folder.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use super::private::write_private;

/// Where the dev certificates are.
#[derive(Debug, Clone)]
pub struct DevCerts {
    /// The dev CA certificate (trust it as `--cacert`).
    pub ca: PathBuf,
    /// Server certificate.
    pub server_cert: PathBuf,
    /// Server key.
    pub server_key: PathBuf,
    /// Client certificate.
    pub client_cert: PathBuf,
    /// Client key.
    pub client_key: PathBuf,
}

/// Uses the certificates in `dir`, creating them when missing.
pub fn ensure(dir: &Path) -> anyhow::Result<DevCerts> {
    let certs = DevCerts {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server-key.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client-key.pem"),
    };
    let all = [
        &certs.ca,
        &certs.server_cert,
        &certs.server_key,
        &certs.client_cert,
        &certs.client_key,
    ];
    if all.iter().all(|p| p.exists()) {
        return Ok(certs);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let now = time::OffsetDateTime::now_utc();
    let validity = |p: &mut CertificateParams| {
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(365);
    };

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Keyward dev CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca_params);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let mut server =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut server);
    let server_key = KeyPair::generate()?;
    let server_cert = server.signed_by(&server_key, &ca)?;

    let mut client = CertificateParams::new(Vec::<String>::new())?;
    client
        .distinguished_name
        .push(DnType::CommonName, "keyward-dev-client");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut client);
    let client_key = KeyPair::generate()?;
    let client_cert = client.signed_by(&client_key, &ca)?;

    write_private(&certs.ca, ca.pem().as_bytes())?;
    write_private(&certs.server_cert, server_cert.pem().as_bytes())?;
    write_private(&certs.server_key, server_key.serialize_pem().as_bytes())?;
    write_private(&certs.client_cert, client_cert.pem().as_bytes())?;
    write_private(&certs.client_key, client_key.serialize_pem().as_bytes())?;
    Ok(certs)
}
