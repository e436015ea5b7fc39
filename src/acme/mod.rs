//! The server certificate through ACME (RFC 8555): obtained at start, renewed
//! in the background two thirds into its lifetime, and swapped into the TLS
//! listener without a restart ([`ManagedCert`]): new handshakes get the new
//! certificate, established connections keep theirs.
//!
//! Replicas on one database share one certificate. The row in
//! `acme_certificates` holds the chain, its private key and the ACME
//! account's credentials, both sealed under the root KEK; every replica reads
//! it every `acme_check_interval` and serves what it holds. When renewal is
//! due, the replica that takes the row's lease orders; the others wait and
//! pick up the result. A failed order keeps the lease until the next attempt
//! (exponential backoff from `acme_retry_min` to `acme_retry_max`), so the
//! backoff holds for all replicas, and the current certificate is served
//! meanwhile: `/readyz` shows the failures, the metrics count them, the log
//! warns, each before the certificate expires.
//!
//! The challenge responses are in the database too (`acme_challenges`), so
//! whichever replica the CA's validation reaches answers ([`challenge`]).

pub mod challenge;

pub use challenge::ChallengeKind;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, Identifier, NewAccount, NewOrder, Order,
    OrderStatus, RetryPolicy,
};
use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::crypto::sha256;
use crate::domain::cert_status::{CertState, CertStatus};
use crate::domain::ids::KekId;
use crate::domain::service::KeyService;
use crate::domain::time::now_ms;
use crate::store::{AcmeChallengeRow, AcmeRow, SealedSlot};
use crate::tls::ManagedCert;

/// The row name of the server certificate.
const NAME: &str = "server";
/// Longest one order may take (account, authorizations, finalize, download).
const ORDER_TIMEOUT: Duration = Duration::from_secs(180);
/// Challenge rows older than this are left-overs of a crashed order.
const STALE_CHALLENGE_MS: i64 = 3_600_000;

/// The ACME settings (`KEYWARD_ACME_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeSettings {
    /// The directory URL.
    pub directory: String,
    /// The DNS names of the certificate.
    pub domains: Vec<String>,
    /// The account's contact URLs (`mailto:`).
    pub contact: Vec<String>,
    /// CA of the directory's own HTTPS certificate (private ACME servers).
    pub directory_ca: Option<PathBuf>,
    /// The challenge answered.
    pub challenge: ChallengeKind,
    /// Where the challenge listener listens.
    pub challenge_listen: SocketAddr,
    /// How often the stored certificate is read.
    pub check_interval: Duration,
    /// First wait after a failed order.
    pub retry_min: Duration,
    /// Longest wait after failed orders.
    pub retry_max: Duration,
}

impl AcmeSettings {
    /// The domains as stored: sorted, comma-separated.
    fn domains_key(&self) -> String {
        let mut d = self.domains.clone();
        d.sort();
        d.join(",")
    }
}

/// Binds the challenge listener and starts it and the renewal task; returns
/// the challenge listener's address.
pub async fn start(
    settings: AcmeSettings,
    service: Arc<KeyService>,
    cert: Arc<ManagedCert>,
    status: Arc<CertStatus>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(settings.challenge_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (KEYWARD_ACME_CHALLENGE_LISTEN)",
                settings.challenge_listen
            )
        })?;
    let addr = listener.local_addr()?;
    tracing::info!(address = %addr, challenge = settings.challenge.name(), "ACME challenge listener");
    tokio::spawn(challenge::serve(
        listener,
        settings.challenge,
        Arc::new(challenge::Challenges::new(service.store().clone())),
        shutdown.clone(),
    ));
    let renewer = Renewer {
        holder: uuid::Uuid::new_v4().to_string(),
        settings,
        service,
        cert,
        status,
    };
    tokio::spawn(renewer.run(shutdown));
    Ok(addr)
}

struct Renewer {
    settings: AcmeSettings,
    service: Arc<KeyService>,
    cert: Arc<ManagedCert>,
    status: Arc<CertStatus>,
    /// This process, as lease holder.
    holder: String,
}

/// The certificate this replica serves: the digest of its PEM.
type Installed = Option<[u8; 32]>;

impl Renewer {
    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut installed: Installed = None;
        loop {
            let wait = match self.step(&mut installed).await {
                Ok(wait) => wait,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "ACME: cannot read the stored certificate; retrying");
                    self.settings.retry_min.min(self.settings.check_interval)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Installs the stored certificate if it is new here, orders one when
    /// renewal is due and this replica gets the lease; returns how long to
    /// wait before the next step.
    async fn step(&self, installed: &mut Installed) -> anyhow::Result<Duration> {
        let s = &self.settings;
        let store = self.service.store();
        let now = now_ms();
        let row = store.acme_row(NAME).await?;
        let domains = s.domains_key();
        let mut validity = None;
        if let Some(row) = row.as_ref().filter(|r| r.domains == domains) {
            validity = self.install(row, now, installed).await;
        }
        let renew_at = validity.map(|(nb, na): (i64, i64)| nb + (na - nb) * 2 / 3);
        let (failures, last_error, lease_until) = row.as_ref().map_or((0, None, 0), |r| {
            (r.failures, r.last_error.clone(), r.lease_until)
        });
        self.report(CertState {
            not_after: validity.map(|v| v.1),
            renew_at,
            failures,
            last_error,
            next_attempt: (failures > 0).then_some(lease_until),
        });
        let check = s.check_interval.as_millis() as i64;
        if let Some(renew_at) = renew_at.filter(|t| now < *t) {
            return Ok(ms((renew_at - now).min(check)));
        }
        // Due. After a failure, the lease holds every replica off until the
        // next attempt.
        if failures > 0 && lease_until > now {
            return Ok(ms((lease_until - now).min(check)));
        }
        let lease = now + ORDER_TIMEOUT.as_millis() as i64 + 30_000;
        if !store
            .acme_take_lease(NAME, &s.directory, &domains, &self.holder, now, lease)
            .await?
        {
            // Another replica is ordering: look again soon.
            return Ok(s
                .retry_min
                .min(s.check_interval)
                .min(Duration::from_secs(5)));
        }
        let outcome = tokio::time::timeout(ORDER_TIMEOUT, self.order(row.as_ref())).await;
        let error = match outcome {
            Ok(Ok(())) => {
                metrics::counter!("keyward_acme_orders_total", "outcome" => "success").increment(1);
                // The next step installs it.
                return Ok(Duration::ZERO);
            }
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => format!("no answer within {} s", ORDER_TIMEOUT.as_secs()),
        };
        metrics::counter!("keyward_acme_orders_total", "outcome" => "failure").increment(1);
        let error: String = error.chars().take(500).collect();
        let failures = failures + 1;
        let backoff = s
            .retry_min
            .saturating_mul(1u32 << (failures - 1).clamp(0, 20) as u32)
            .min(s.retry_max);
        let now = now_ms();
        let retry_at = now + backoff.as_millis() as i64;
        let failures = store
            .acme_record_failure(NAME, &self.holder, &error, retry_at, now)
            .await?;
        tracing::warn!(
            error = %error,
            failures,
            retry_in_s = backoff.as_secs(),
            not_after = validity.map(|v| v.1),
            "ACME: ordering the server certificate failed; the current certificate stays in use and the order is retried"
        );
        self.report(CertState {
            not_after: validity.map(|v| v.1),
            renew_at,
            failures,
            last_error: Some(error),
            next_attempt: Some(retry_at),
        });
        Ok(backoff)
    }

    /// Serves the row's certificate when it is unexpired and not served yet;
    /// returns its validity (notBefore, notAfter, Unix ms) if it is usable.
    async fn install(
        &self,
        row: &AcmeRow,
        now: i64,
        installed: &mut Installed,
    ) -> Option<(i64, i64)> {
        let (Some(pem), Some(sealed), Some(kek), Some(nb), Some(na)) = (
            &row.cert_pem,
            &row.key_sealed,
            &row.key_kek,
            row.not_before,
            row.not_after,
        ) else {
            return None;
        };
        if na <= now {
            return None;
        }
        let digest = sha256(pem.as_bytes());
        if *installed == Some(digest) {
            return Some((nb, na));
        }
        let key = async {
            let kek: KekId = kek.parse().map_err(|_| anyhow!("bad KEK id"))?;
            let key = self
                .service
                .open_secret(&key_purpose(), kek, sealed)
                .await?;
            ManagedCert::certified_key(pem.as_bytes(), &key).map_err(|e| anyhow!(e))
        };
        match key.await {
            Ok(key) => {
                self.cert.set(key);
                *installed = Some(digest);
                tracing::info!(
                    not_after_ms = na,
                    "ACME: serving the stored server certificate"
                );
                Some((nb, na))
            }
            Err(e) => {
                // Ordering anew is the remedy (e.g. its root KEK was retired).
                tracing::warn!(error = %format!("{e:#}"), "ACME: the stored certificate is unusable; ordering a new one");
                None
            }
        }
    }

    fn report(&self, state: CertState) {
        if let Some(na) = state.not_after {
            metrics::gauge!("keyward_server_certificate_expiry_timestamp_seconds")
                .set(na as f64 / 1000.0);
        }
        metrics::gauge!("keyward_acme_consecutive_failures").set(state.failures as f64);
        self.status.set(state);
    }

    /// One ACME order, holding the lease: account, authorizations (the
    /// challenge published for every replica), finalize, download; stores
    /// the result.
    async fn order(&self, row: Option<&AcmeRow>) -> anyhow::Result<()> {
        let s = &self.settings;
        let store = self.service.store();
        let builder = || -> anyhow::Result<_> {
            Ok(match &s.directory_ca {
                Some(ca) => Account::builder_with_root(ca)
                    .with_context(|| format!("KEYWARD_ACME_DIRECTORY_CA ({})", ca.display()))?,
                None => Account::builder()?,
            })
        };
        let stored = row
            .filter(|r| r.directory == s.directory)
            .and_then(|r| Some((r.account_sealed.as_ref()?, r.account_kek.as_ref()?)));
        // A stored account that cannot be opened (sealed under a root KEK
        // that is gone, say) is replaced by a new one: renewals go on.
        let opened = match stored {
            Some((sealed, kek)) => match self.open_account(sealed, kek).await {
                Ok(creds) => Some(creds),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "ACME: the stored account cannot be opened; creating a new one");
                    None
                }
            },
            None => None,
        };
        let account = match opened {
            Some(creds) => builder()?
                .from_credentials(creds)
                .await
                .context("ACME account")?,
            None => {
                let contact: Vec<&str> = s.contact.iter().map(String::as_str).collect();
                let (account, creds) = builder()?
                    .create(
                        &NewAccount {
                            contact: &contact,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        s.directory.clone(),
                        None,
                    )
                    .await
                    .context("creating the ACME account")?;
                let json = Zeroizing::new(serde_json::to_vec(&creds)?);
                let (kek, sealed) = self.service.seal_secret(&account_purpose(), &json)?;
                if !store
                    .acme_store_account(NAME, &self.holder, &s.directory, &sealed, &kek.to_string())
                    .await?
                {
                    bail!("lost the ordering lease");
                }
                tracing::info!(directory = %s.directory, "ACME: account created");
                account
            }
        };
        let identifiers: Vec<Identifier> = s.domains.iter().cloned().map(Identifier::Dns).collect();
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .context("new order")?;
        let mut tokens = Vec::new();
        let result = self.complete(&mut order, &mut tokens).await;
        if let Err(e) = store
            .acme_remove_challenges(&tokens, now_ms() - STALE_CHALLENGE_MS)
            .await
        {
            tracing::warn!(error = %e, "ACME: cannot remove the challenge responses");
        }
        let (chain, key_pem) = result?;
        ManagedCert::certified_key(chain.as_bytes(), key_pem.as_bytes())
            .map_err(|e| anyhow!("the CA's certificate is unusable: {e}"))?;
        let (nb, na) = validity(chain.as_bytes())?;
        let (kek, sealed) = self
            .service
            .seal_secret(&key_purpose(), key_pem.as_bytes())?;
        if !store
            .acme_store_certificate(
                NAME,
                &self.holder,
                &s.domains_key(),
                &chain,
                &sealed,
                &kek.to_string(),
                nb,
                na,
                now_ms(),
            )
            .await?
        {
            bail!("lost the ordering lease");
        }
        tracing::info!(domains = %s.domains_key(), not_after_ms = na, "ACME: obtained the server certificate");
        Ok(())
    }

    /// The stored account's credentials.
    async fn open_account(&self, sealed: &[u8], kek: &str) -> anyhow::Result<AccountCredentials> {
        let kek: KekId = kek.parse().map_err(|_| anyhow!("bad KEK id"))?;
        let plain = self
            .service
            .open_secret(&account_purpose(), kek, sealed)
            .await?;
        serde_json::from_slice(&plain).context("the stored ACME account does not parse")
    }

    /// Answers the authorizations and finalizes: the chain and its key.
    async fn complete(
        &self,
        order: &mut Order,
        tokens: &mut Vec<String>,
    ) -> anyhow::Result<(String, Zeroizing<String>)> {
        let store = self.service.store();
        let kind = self.settings.challenge;
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.context("authorization")?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => bail!("an authorization is {other:?}"),
            }
            let mut challenge = authz
                .challenge(kind.acme_type())
                .ok_or_else(|| anyhow!("the CA offers no {} challenge", kind.name()))?;
            let response = AcmeChallengeRow {
                token: challenge.token.clone(),
                domain: challenge.identifier().to_string(),
                key_authorization: challenge.key_authorization().as_str().to_string(),
            };
            store.acme_put_challenge(&response, now_ms()).await?;
            tokens.push(response.token);
            challenge.set_ready().await.context("challenge ready")?;
        }
        let status = order
            .poll_ready(&RetryPolicy::new().timeout(Duration::from_secs(90)))
            .await
            .context("waiting for the order")?;
        if status != OrderStatus::Ready {
            bail!("the order is {status:?}, not ready");
        }
        let key_pem = Zeroizing::new(order.finalize().await.context("finalize")?);
        let chain = order
            .poll_certificate(&RetryPolicy::new().timeout(Duration::from_secs(90)))
            .await
            .context("downloading the certificate")?;
        Ok((chain, key_pem))
    }
}

fn account_purpose() -> String {
    SealedSlot::AcmeAccount(NAME.into()).purpose()
}

fn key_purpose() -> String {
    SealedSlot::AcmeKey(NAME.into()).purpose()
}

fn ms(ms: i64) -> Duration {
    Duration::from_millis(ms.max(0) as u64)
}

/// notBefore and notAfter (Unix ms) of the first certificate in a PEM chain.
fn validity(chain_pem: &[u8]) -> anyhow::Result<(i64, i64)> {
    use rustls::pki_types::pem::PemObject;
    let first = rustls::pki_types::CertificateDer::pem_slice_iter(chain_pem)
        .next()
        .ok_or_else(|| anyhow!("no certificate in the chain"))??;
    let (_, cert) = x509_parser::parse_x509_certificate(&first)
        .map_err(|e| anyhow!("the certificate does not parse: {e}"))?;
    let v = cert.validity();
    Ok((
        v.not_before.timestamp() * 1000,
        v.not_after.timestamp() * 1000,
    ))
}
