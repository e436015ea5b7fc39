//! Dev-mode certificates: a CA, a server certificate for `localhost` and
//! 127.0.0.1, and one client certificate, all PEM files in one folder. Valid
//! for a year; made anew at start when any of them is within
//! [`RENEW_BEFORE`] of expiry (or past it, or unreadable), so a long-lived dev
//! folder never serves an expired certificate.

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

/// How long the dev certificates are valid.
const LIFETIME: time::Duration = time::Duration::days(365);
/// Certificates this close to expiry are made anew at start.
pub const RENEW_BEFORE: time::Duration = time::Duration::days(30);

/// Uses the certificates in `dir`, creating them when missing and making them
/// anew when one nears expiry.
pub fn ensure(dir: &Path) -> anyhow::Result<DevCerts> {
    ensure_at(dir, time::OffsetDateTime::now_utc(), LIFETIME)
}

/// The earliest notAfter of the certificates in `paths`, or `None` if one
/// does not read or parse.
fn earliest_expiry(paths: &[&PathBuf]) -> Option<time::OffsetDateTime> {
    let mut earliest: Option<time::OffsetDateTime> = None;
    for path in paths {
        let pem = std::fs::read(path).ok()?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
        let cert = pem.parse_x509().ok()?;
        let not_after = cert.validity().not_after.to_datetime();
        earliest = Some(earliest.map_or(not_after, |e| e.min(not_after)));
    }
    earliest
}

/// [`ensure`] at time `now`, new certificates valid for `lifetime`.
fn ensure_at(
    dir: &Path,
    now: time::OffsetDateTime,
    lifetime: time::Duration,
) -> anyhow::Result<DevCerts> {
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
        match earliest_expiry(&[&certs.ca, &certs.server_cert, &certs.client_cert]) {
            Some(expiry) if expiry - now > RENEW_BEFORE => return Ok(certs),
            Some(expiry) => tracing::info!(
                expires = %expiry,
                "the dev certificates near expiry: making new ones (a new dev CA too; its key is not kept)"
            ),
            None => tracing::warn!(
                dir = %dir.display(),
                "a dev certificate does not read: making new ones"
            ),
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let validity = |p: &mut CertificateParams| {
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + lifetime;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn expiry(path: &Path) -> time::OffsetDateTime {
        earliest_expiry(&[&path.to_path_buf()]).unwrap()
    }

    #[test]
    fn dev_certificates_are_reused_while_fresh_and_renewed_near_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let now = time::OffsetDateTime::now_utc();
        // Made 340 days ago with a year's validity: 25 days left, inside the
        // renewal window.
        let old = ensure_at(dir.path(), now - time::Duration::days(340), LIFETIME).unwrap();
        let old_server = std::fs::read(&old.server_cert).unwrap();
        let old_ca = std::fs::read(&old.ca).unwrap();
        assert!(expiry(&old.server_cert) - now < RENEW_BEFORE);

        let renewed = ensure_at(dir.path(), now, LIFETIME).unwrap();
        assert_ne!(std::fs::read(&renewed.server_cert).unwrap(), old_server);
        assert_ne!(std::fs::read(&renewed.ca).unwrap(), old_ca);
        assert!(expiry(&renewed.server_cert) - now > time::Duration::days(360));
        assert!(expiry(&renewed.client_cert) - now > time::Duration::days(360));
        // The new server and client certificates chain to the new CA.
        let ca = std::fs::read(&renewed.ca).unwrap();
        let (_, ca) = x509_parser::pem::parse_x509_pem(&ca).unwrap();
        let ca = ca.parse_x509().unwrap();
        for leaf in [&renewed.server_cert, &renewed.client_cert] {
            let pem = std::fs::read(leaf).unwrap();
            let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
            let cert = pem.parse_x509().unwrap();
            cert.verify_signature(Some(ca.public_key())).unwrap();
        }

        // Fresh ones are reused as they are.
        let server = std::fs::read(&renewed.server_cert).unwrap();
        let again = ensure(dir.path()).unwrap();
        assert_eq!(std::fs::read(&again.server_cert).unwrap(), server);

        // An expired or unreadable one is replaced too.
        std::fs::write(&again.client_cert, b"not a certificate").unwrap();
        let replaced = ensure(dir.path()).unwrap();
        assert!(expiry(&replaced.client_cert) - now > time::Duration::days(360));
        assert_ne!(std::fs::read(&replaced.server_cert).unwrap(), server);
    }
}
