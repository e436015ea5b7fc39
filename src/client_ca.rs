//! The client CA Keyward holds itself, for client certificates without a
//! ceremony (`keyward client-cert issue|revoke|list`).
//!
//! The CA (ECDSA P-256, self-signed, ten years) is made on first use; its
//! key is sealed under the root KEK (purpose `client-ca:default`) in
//! `client_cas`, so it is re-sealed by a root-KEK rotation like every other
//! secret Keyward keeps, and only a process holding the master key can sign.
//! Issuing makes a new key pair for the caller (written to a file, never
//! stored), records the certificate, and binds the API key to its public key
//! in one transaction. Revoking puts the serial on the CA's CRL, signed and
//! stored in the same row. Every mutual-TLS listener trusts the CA and
//! enforces that CRL ([`follow`]): it rebuilds its verifier when the change
//! feed announces a change (within `sync_interval`, at once on PostgreSQL
//! through NOTIFY) and reads the row every minute in any case, so a
//! revocation reaches every replica without a restart.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::crypto::{hex, random_bytes, sha256};
use crate::domain::ids::KekId;
use crate::domain::service::KeyService;
use crate::domain::time::now_ms;
use crate::store::{ClientCaRow, ClientCertRow, SealedSlot, StoreError};
use crate::tls::{KeywardClientCa, ReloadableTls};

/// The one client CA's name.
pub const CA_NAME: &str = "default";
/// The CA certificate's lifetime.
const CA_DAYS: i64 = 3650;
/// Longest client certificate lifetime `issue` accepts.
pub const MAX_LIFETIME: Duration = Duration::from_secs(365 * 86_400);
/// How often the CA row is read even when the change feed says nothing.
const FALLBACK_POLL: Duration = Duration::from_secs(60);
/// How far notBefore is set back, for clocks a little behind.
const BACKDATE: Duration = Duration::from_secs(300);

/// A client certificate just issued, and its private key (never stored).
pub struct IssuedClientCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM.
    pub key_pem: Zeroizing<String>,
    /// The CA certificate, PEM (what a client's peer may want to trust).
    pub ca_pem: String,
    /// What was recorded.
    pub row: ClientCertRow,
}

fn purpose() -> String {
    SealedSlot::ClientCaKey(CA_NAME.into()).purpose()
}

fn offset(ms: i64) -> anyhow::Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| anyhow!("time out of range: {e}"))
}

/// The CA's row, made (with an empty CRL) if there is none yet.
pub async fn ensure_ca(service: &KeyService) -> anyhow::Result<ClientCaRow> {
    let store = service.store();
    if let Some(row) = store.client_ca(CA_NAME).await? {
        return Ok(row);
    }
    let now = now_ms();
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Keyward client CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = offset(now - BACKDATE.as_millis() as i64)?;
    params.not_after = offset(now + CA_DAYS * 86_400_000)?;
    params.serial_number = Some(SerialNumber::from_slice(&serial_bytes()));
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let key_pem = Zeroizing::new(key.serialize_pem());
    let cert_pem = cert.pem();
    let crl_der = sign_crl(&cert_pem, &key_pem, &[], 1)?;
    let (kek, key_sealed) = service.seal_secret(&purpose(), key_pem.as_bytes())?;
    let row = ClientCaRow {
        name: CA_NAME.into(),
        cert_pem,
        key_sealed,
        key_kek: kek.to_string(),
        crl_der,
        crl_number: 1,
    };
    if store.insert_client_ca(&row, now).await? {
        tracing::info!("made the Keyward client CA");
        return Ok(row);
    }
    // Another process made it meanwhile: use that one.
    store
        .client_ca(CA_NAME)
        .await?
        .ok_or_else(|| anyhow!("the client CA vanished while being made"))
}

/// 16 random bytes as a positive serial number without a leading zero.
fn serial_bytes() -> [u8; 16] {
    let mut b = random_bytes::<16>();
    b[0] = (b[0] & 0x3f) | 0x40;
    b
}

/// The CA's key, opened.
async fn ca_key(service: &KeyService, ca: &ClientCaRow) -> anyhow::Result<Zeroizing<String>> {
    let kek: KekId = ca
        .key_kek
        .parse()
        .map_err(|_| anyhow!("the client CA names a bad KEK id"))?;
    let plain = service
        .open_secret(&purpose(), kek, &ca.key_sealed)
        .await
        .context("the client CA's key cannot be opened")?;
    let pem = std::str::from_utf8(&plain).map_err(|_| anyhow!("the client CA's key is not PEM"))?;
    Ok(Zeroizing::new(pem.to_string()))
}

/// Issues a client certificate valid for `lifetime` to live API key
/// `api_key` of `tenant`, and binds the key to it. The key's previous
/// binding, if any, is replaced: a certificate issued before for it no
/// longer authenticates it.
pub async fn issue(
    service: &KeyService,
    tenant: &str,
    api_key: &str,
    lifetime: Duration,
) -> anyhow::Result<IssuedClientCert> {
    if lifetime.is_zero() || lifetime > MAX_LIFETIME {
        bail!("the lifetime must be between 1 second and 365 days");
    }
    let ca = ensure_ca(service).await?;
    let ca_key_pem = ca_key(service, &ca).await?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let now = now_ms();
    let serial = serial_bytes();
    let not_before = now - BACKDATE.as_millis() as i64;
    let not_after = now + lifetime.as_millis() as i64;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, api_key);
    params
        .distinguished_name
        .push(DnType::OrganizationName, format!("Keyward tenant {tenant}"));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.not_before = offset(not_before)?;
    params.not_after = offset(not_after)?;
    params.use_authority_key_identifier_extension = true;
    params.key_identifier_method = KeyIdMethod::Sha256;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.der())
        .map_err(|e| anyhow!("the issued certificate does not parse: {e}"))?;
    let row = ClientCertRow {
        serial: hex(&serial),
        ca_name: CA_NAME.into(),
        tenant_id: tenant.to_string(),
        api_key_id: api_key.to_string(),
        spki_sha256: sha256(parsed.public_key().raw).to_vec(),
        // Whole seconds, as in the certificate.
        not_before: parsed.validity().not_before.timestamp() * 1000,
        not_after: parsed.validity().not_after.timestamp() * 1000,
        issued_at: now,
        revoked_at: None,
        bound: true,
    };
    if !service.store().insert_client_certificate(&row).await? {
        bail!("no live API key `{api_key}` of tenant {tenant}");
    }
    Ok(IssuedClientCert {
        cert_pem: cert.pem(),
        key_pem: Zeroizing::new(key.serialize_pem()),
        ca_pem: ca.cert_pem,
        row,
    })
}

/// Revokes the live certificates with serial `serial` (hex, colons and case
/// ignored) or issued for `api_key`: they go on the CRL, which every
/// listener picks up. Returns those revoked now (empty: none was live).
pub async fn revoke(
    service: &KeyService,
    serial: Option<&str>,
    api_key: Option<&str>,
) -> anyhow::Result<Vec<ClientCertRow>> {
    let serial = serial.map(normalize_serial).transpose()?;
    let store = service.store();
    let now = now_ms();
    let targets: Vec<ClientCertRow> = store
        .client_certificates_matching(serial.as_deref(), api_key)
        .await?
        .into_iter()
        .filter(|c| c.revoked_at.is_none())
        .collect();
    if targets.is_empty() {
        return Ok(targets);
    }
    let ca = store
        .client_ca(CA_NAME)
        .await?
        .ok_or_else(|| anyhow!("there is no client CA"))?;
    let ca_key_pem = ca_key(service, &ca).await?;
    let mut revoked = store.revoked_client_certificates(CA_NAME, now).await?;
    revoked.extend(
        targets
            .iter()
            .filter(|c| c.not_after > now)
            .map(|c| (c.serial.clone(), now)),
    );
    let number = ca.crl_number + 1;
    let crl = sign_crl(&ca.cert_pem, &ca_key_pem, &revoked, number)?;
    let serials: Vec<String> = targets.iter().map(|c| c.serial.clone()).collect();
    match store
        .revoke_client_certificates(CA_NAME, &serials, now, ca.crl_number, &crl, number)
        .await
    {
        Ok(()) => Ok(targets),
        Err(StoreError::Raced(why)) => bail!("{why}"),
        Err(e) => Err(e.into()),
    }
}

/// A serial as stored: lower-case hex without separators.
fn normalize_serial(s: &str) -> anyhow::Result<String> {
    let clean: String = s
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if clean.is_empty() || clean.len() > 40 || !clean.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("`{s}` is not a certificate serial number (hex)");
    }
    Ok(clean)
}

/// The CRL of the CA: `revoked` (serial hex, revoked at), number `number`.
/// Its nextUpdate is far ahead: this CRL is not published for others to
/// fetch; every replica reads the current one from the database, which is
/// where its freshness comes from.
fn sign_crl(
    ca_pem: &str,
    ca_key_pem: &str,
    revoked: &[(String, i64)],
    number: i64,
) -> anyhow::Result<Vec<u8>> {
    let issuer = Issuer::from_ca_cert_pem(ca_pem, KeyPair::from_pem(ca_key_pem)?)?;
    let now = now_ms();
    let mut revoked_certs = Vec::with_capacity(revoked.len());
    for (serial, at) in revoked {
        let bytes = crate::crypto::parse_hex(serial)
            .ok_or_else(|| anyhow!("a stored serial is not hex: {serial}"))?;
        revoked_certs.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&bytes),
            revocation_time: offset(*at)?,
            reason_code: None,
            invalidity_date: None,
        });
    }
    let params = CertificateRevocationListParams {
        this_update: offset(now - BACKDATE.as_millis() as i64)?,
        next_update: offset(now + CA_DAYS * 86_400_000)?,
        crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(&issuer)?.der().to_vec())
}

/// What the mutual-TLS verifier needs of the CA: its certificate and CRL.
fn trust(row: &ClientCaRow) -> anyhow::Result<KeywardClientCa> {
    let cert = CertificateDer::from_pem_slice(row.cert_pem.as_bytes())
        .map_err(|e| anyhow!("the client CA certificate does not parse: {e}"))?;
    Ok(KeywardClientCa {
        cert,
        crl: CertificateRevocationListDer::from(row.crl_der.clone()),
        crl_number: row.crl_number,
    })
}

/// Keeps the mutual-TLS listener's trust in the Keyward client CA current:
/// reads the CA row at start, whenever the change feed announces a change
/// (the feed is read every `sync_interval`, at once on a PostgreSQL NOTIFY),
/// and every [`FALLBACK_POLL`] in any case; rebuilds the verifier when the
/// CRL number moved.
pub async fn follow(
    service: Arc<KeyService>,
    tls: Arc<ReloadableTls>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut current: Option<i64> = None;
    loop {
        match service.store().client_ca(CA_NAME).await {
            Ok(Some(row)) if current != Some(row.crl_number) => match trust(&row) {
                Ok(ca) => match tls.set_keyward_ca(Some(ca)) {
                    Ok(()) => {
                        current = Some(row.crl_number);
                        tracing::info!(
                            crl_number = row.crl_number,
                            "mutual TLS: trusting the Keyward client CA with its current CRL"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "mutual TLS: cannot use the Keyward client CA")
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "mutual TLS: the Keyward client CA is unusable")
                }
            },
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "mutual TLS: cannot read the Keyward client CA"),
        }
        tokio::select! {
            _ = tokio::time::sleep(FALLBACK_POLL) => {}
            _ = service.client_ca_changed().notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}
