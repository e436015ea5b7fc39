//! The table of accepted settings: names, defaults, which are secret, and the
//! one-line docs of the configuration reference; and the `KEYWARD_*` variables
//! that are allowed in the environment without being settings.

/// One accepted setting.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The key in the TOML file; the environment variable is `KEYWARD_` + upper case.
    pub name: &'static str,
    /// The default, if the setting is optional.
    pub default: Option<&'static str>,
    /// Whether the value is a secret (never printed).
    pub secret: bool,
    /// One line for the configuration reference.
    pub doc: &'static str,
}

impl Setting {
    /// The environment variable for this setting.
    pub fn env_var(&self) -> String {
        format!("KEYWARD_{}", self.name.to_ascii_uppercase())
    }
}

/// Every setting Keyward accepts.
pub const SETTINGS: &[Setting] = &[
    Setting { name: "listen", default: Some("127.0.0.1:8480"), secret: false, doc: "Address and port to listen on." },
    Setting { name: "ops_listen", default: None, secret: false, doc: "Optional second address serving only `/healthz`, `/readyz` and `/metrics` over plain HTTP, for probes and scrapers that cannot present a client certificate. Carries no secrets, no API and no identifiers." },
    Setting { name: "database_url", default: None, secret: true, doc: "`sqlite://PATH` (created if missing) or `postgres://USER:PASSWORD@HOST:PORT/DB`." },
    Setting { name: "database_max_connections", default: Some("10"), secret: false, doc: "Size of the database connection pool." },
    Setting { name: "master_key_provider", default: Some("env"), secret: false, doc: "What wraps the root KEK: `env` (`master_key`), `aws-kms`, `vault`, `pkcs11`, `tpm` or `azure-key-vault`." },
    Setting { name: "master_key", default: None, secret: true, doc: "Base64 of 32 random bytes (`openssl rand -base64 32`): wraps the root KEK when the provider is `env`." },
    Setting { name: "new_master_key", default: None, secret: true, doc: "The target key of `keyward master-key migrate --to env` when the current provider is `env` too." },
    Setting { name: "aws_kms_key_id", default: None, secret: false, doc: "The KMS key (id, ARN or alias) for the `aws-kms` provider. Region and credentials come from the standard AWS chain (`AWS_REGION`, `AWS_ACCESS_KEY_ID`, profiles, roles)." },
    Setting { name: "aws_kms_endpoint", default: None, secret: false, doc: "A KMS-compatible endpoint URL instead of AWS's." },
    Setting { name: "vault_addr", default: None, secret: false, doc: "Vault or OpenBao address for the `vault` provider, e.g. `https://vault:8200`." },
    Setting { name: "vault_token", default: None, secret: true, doc: "A Vault token (renewed before it expires when renewable). Or use AppRole." },
    Setting { name: "vault_role_id", default: None, secret: false, doc: "AppRole role id (with `vault_secret_id`)." },
    Setting { name: "vault_secret_id", default: None, secret: true, doc: "AppRole secret id." },
    Setting { name: "vault_approle_mount", default: Some("approle"), secret: false, doc: "Where the AppRole auth method is mounted." },
    Setting { name: "vault_transit_mount", default: Some("transit"), secret: false, doc: "Where the transit secrets engine is mounted." },
    Setting { name: "vault_transit_key", default: None, secret: false, doc: "The transit key that wraps the root KEK." },
    Setting { name: "vault_ca_file", default: None, secret: false, doc: "PEM CA bundle to verify Vault's TLS certificate." },
    Setting { name: "pkcs11_module", default: None, secret: false, doc: "The PKCS#11 library (module) of the HSM or token for the `pkcs11` provider, e.g. `/usr/lib/softhsm/libsofthsm2.so`." },
    Setting { name: "pkcs11_token_label", default: None, secret: false, doc: "The label of the token holding the key (or give `pkcs11_slot`)." },
    Setting { name: "pkcs11_slot", default: None, secret: false, doc: "The slot id of the token, instead of `pkcs11_token_label`." },
    Setting { name: "pkcs11_pin", default: None, secret: true, doc: "The token's user PIN; best given as a reference (`env://`, `file://`, `vault://`)." },
    Setting { name: "pkcs11_key_label", default: None, secret: false, doc: "The label of the token's AES key that wraps the root KEK (AES-GCM where the token offers it, else AES key wrap with padding). Never leaves the token." },
    Setting { name: "pkcs11_mechanism", default: Some("auto"), secret: false, doc: "How the token wraps the root KEK: `auto` (AES-GCM where the token offers it, else AES key wrap with padding), `aes-gcm`, or `aes-key-wrap-pad` (RFC 5649 through `C_WrapKey`, for tokens without GCM or that refuse an IV from the caller, as some in FIPS mode do). Either unwraps what the other wrapped." },
    Setting { name: "azure_key_vault_url", default: None, secret: false, doc: "The vault for the `azure-key-vault` provider: `https://NAME.vault.azure.net`, or a Managed HSM's `https://NAME.managedhsm.azure.net`." },
    Setting { name: "azure_key_vault_key", default: None, secret: false, doc: "The name of the Key Vault key that wraps the root KEK (an RSA key, or an AES key on a Managed HSM). Keyward needs the `wrapKey` and `unwrapKey` key permissions (role Key Vault Crypto Service Encryption User)." },
    Setting { name: "azure_key_vault_algorithm", default: Some("RSA-OAEP-256"), secret: false, doc: "`RSA-OAEP-256` (an RSA key), or `A256KW` (AES key wrap with a Managed HSM's 256-bit AES key)." },
    Setting { name: "azure_key_vault_ca_file", default: None, secret: false, doc: "PEM CA bundle trusted, besides the system's roots, for Key Vault's and Entra ID's TLS (a private endpoint behind your own CA)." },
    Setting { name: "azure_key_vault_verify_challenge_resource", default: Some("true"), secret: false, doc: "Whether the vault's authentication challenge must name a resource whose domain the vault URL is under (the Azure SDK's safeguard against a vault URL that sends tokens elsewhere). `false` only for a vault reached under another name, such as a private endpoint's own DNS name." },
    Setting { name: "azure_credential", default: Some("workload-identity"), secret: false, doc: "How the `azure-key-vault` provider gets its Entra ID token: `workload-identity` (AKS workload identity: `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_FEDERATED_TOKEN_FILE` set by Azure's webhook), `managed-identity` (the VM's or App Service's identity; `azure_client_id` picks a user-assigned one) or `client-secret` (`azure_tenant_id`, `azure_client_id`, `azure_client_secret`). `AZURE_AUTHORITY_HOST` points at another cloud's Entra ID." },
    Setting { name: "azure_tenant_id", default: None, secret: false, doc: "The directory (tenant) id, with `azure_credential = client-secret`." },
    Setting { name: "azure_client_id", default: None, secret: false, doc: "The application (client) id, with `client-secret`; with `managed-identity`, a user-assigned identity's client id." },
    Setting { name: "azure_client_secret", default: None, secret: true, doc: "The service principal's client secret, with `azure_credential = client-secret`." },
    Setting { name: "tpm_tcti", default: Some("device:/dev/tpmrm0"), secret: false, doc: "How the `tpm` provider reaches the TPM 2.0: `device:/dev/tpmrm0` (the kernel's resource manager), `tabrmd:` (the access broker), or `swtpm:host=HOST,port=PORT` / `mssim:host=HOST,port=PORT` (a software TPM, for tests)." },
    Setting { name: "tpm_pcrs", default: None, secret: false, doc: "PCRs of the SHA-256 bank, e.g. `7` or `0,2,4,7`, that the `tpm` provider seals the root KEK's wrapping key to: it unseals only while they hold the values they held when it was sealed (a firmware, bootloader or Secure Boot change then stops Keyward from starting until the root KEK is migrated again). Unset: no PCR policy. Applies to keys sealed from now on; each sealed key remembers its own PCRs." },
    Setting { name: "max_body_bytes", default: Some("1048576"), secret: false, doc: "Largest accepted request body; larger bodies get 413." },
    Setting { name: "max_batch_items", default: Some("1000"), secret: false, doc: "Most items in one batch request; more get 413 `too_many_items`." },
    Setting { name: "max_batch_body_bytes", default: Some("16777216"), secret: false, doc: "Largest accepted batch request body." },
    Setting { name: "max_concurrent_body_bytes", default: Some("16777216"), secret: false, doc: "Most bytes of request bodies that batch requests, and other requests with bodies over 64 KiB, may hold at once (a body without a Content-Length counts as its route's limit; one larger than this counts as all of it, so it runs alone). Working memory is a few times the body (its items, their results and the response), so this bounds what concurrent large requests cost; a request that would go over gets 503 `server_busy` with Retry-After once its caller is authenticated, before its body is read, never an out-of-memory kill. At least `max_batch_body_bytes` lets the largest batch through." },
    Setting { name: "stream_max_concurrent", default: Some("16"), secret: false, doc: "Most streaming requests (`/v1/encrypt/stream`, `/v1/decrypt/stream`) served at once; one more gets 503 `server_busy` with Retry-After once its caller is authenticated, before its body is read. Each also takes its working memory from `max_concurrent_body_bytes` before its first chunk: four chunks and two body frames (about 1.25 MiB at the default 64 KiB chunk), all streams together at most half of that budget (503 `server_busy` beyond), and a chunk size whose memory is over that half is refused (400; 1,834,992 bytes at the defaults)." },
    Setting { name: "stream_read_timeout", default: Some("30s"), secret: false, doc: "A streaming request whose client sends no body bytes for this long is cut off: before the response started, 408 `request_timeout`; after, the response is aborted (no final chunk), so the client sees a failed transfer. A client that reads none of the response for this long loses its stream the same way (its slot is freed at once; the connection itself within `connection_max_age`)." },
    Setting { name: "max_api_keys_per_tenant", default: Some("1000"), secret: false, doc: "Most live (not revoked) API keys one tenant may hold; creating one more (over the API or with `keyward apikey create`) gets 409 `api_key_limit_reached` until a key is revoked. Bounds what one tenant's `admin` key can add to the listings, the audit and every replica's key cache." },
    Setting { name: "key_ring_capacity", default: Some("100000"), secret: false, doc: "Most encryptions whose unwrapped keys are kept in memory (and most API keys cached)." },
    Setting { name: "rate_limit", default: Some("10000"), secret: false, doc: "Requests per second per API key on each replica (a token bucket with one second of burst); over it, 429 `rate_limited` with Retry-After. 0: no limit. The default stops one runaway key from taking a whole replica; a platform key that needs more per replica (measure) gets its own value, and the benchmark sets 0." },
    Setting { name: "unauthenticated_rate_limit", default: Some("20"), secret: false, doc: "Requests without credentials (or with malformed ones) per second per client address (IPv6: per /64), with five seconds of burst; over it, 429 `rate_limited` with Retry-After. 0: no limit." },
    Setting { name: "auth_max_failures", default: Some("10"), secret: false, doc: "Refused secrets from one client address (IPv6: per /64) within `auth_lockout` before every further wrong secret from that address gets 429 `too_many_failed_attempts` (a right secret still works). Counted per address only, never per key id, so that knowing a key id is not enough to lock its holder out." },
    Setting { name: "auth_lockout", default: Some("5m"), secret: false, doc: "The window in which failures are counted, and how long a lockout lasts." },
    Setting { name: "trusted_proxies", default: None, secret: false, doc: "Comma-separated addresses (or the narrowest CIDR blocks) of the reverse proxies in front of Keyward that write the forwarding header, e.g. `10.0.3.17,10.0.3.18`; never a block that also holds clients, which could then name any address. Only for a request whose TCP peer is in this list is the client address taken from `trusted_proxy_header` (the right-most address that is not itself a trusted proxy); from anyone else the header is ignored. Unset: no proxy is trusted." },
    Setting { name: "trusted_proxy_header", default: Some("x-forwarded-for"), secret: false, doc: "The header the trusted proxies write: `x-forwarded-for` or `forwarded` (RFC 7239 `for=`). Only this one is read; a proxy passes the other through from the client untouched." },
    Setting { name: "audit_refused_per_minute", default: Some("10"), secret: false, doc: "Requests refused for their credentials (missing, invalid, locked out, rate limited) that are written to the audit in full per client address per minute, and 100 times as many from all addresses together; the rest are counted in the metric `keyward_audit_refused_unrecorded_total`." },
    Setting { name: "client_key_max_failures", default: Some("10"), secret: false, doc: "Wrong client keys (`X-Master-Key`) for one encryption within `client_key_lockout` before every further call with a client key on that encryption gets 429 `too_many_master_key_attempts`. Only callers holding the tenant's credentials can make these attempts." },
    Setting { name: "client_key_lockout", default: Some("5m"), secret: false, doc: "The window in which wrong client keys are counted, and how long the refusal lasts." },
    Setting { name: "rotate_after_encryptions", default: Some("2147483648"), secret: false, doc: "Rotate a platform encryption by itself once its active version has made this many encryptions (2^31 by default, half the 2^32 NIST allows per key with random 96-bit nonces)." },
    Setting { name: "max_encryptions_per_version", default: Some("4294967296"), secret: false, doc: "The nonce bound: no version (active, or `enabled` and named explicitly) encrypts more than this many times; counted with each replica's own uses not yet recorded, so a replica that cannot record them stops instead of running over. Beyond it, 409 `version_exhausted`, or for the active version of a platform encryption 503 `rotation_pending` until it is rotated. At least `rotate_after_encryptions`." },
    Setting { name: "maintenance_interval", default: Some("5s"), secret: false, doc: "How often use counts are flushed to the database and rotation policies (period, count) are checked." },
    Setting { name: "job_lease", default: Some("30s"), secret: false, doc: "How long a replica's claim on a re-encryption job lasts without renewal (renewed after every batch); after a crash another replica, or this one restarted, takes the job over once it ends." },
    Setting { name: "job_batch_rows", default: Some("500"), secret: false, doc: "Rows a re-encryption job reads and writes per batch (and per progress checkpoint)." },
    Setting { name: "job_sources_file", default: None, secret: false, doc: "A TOML file declaring the job sources: the only databases re-encryption jobs may reach. Each `[sources.NAME]` has `database_url` (or `database_url_file`, a file holding it) and `tenants`, the tenant names or ids it is granted to. Without it every job is refused. Keyward's own database is refused as a source. Read at start; keep it owner-only, it holds credentials." },
    Setting { name: "job_source_connect_timeout", default: Some("10s"), secret: false, doc: "Longest wait for a connection to a job source; longer, and the job fails with the generic source error." },
    Setting { name: "job_source_statement_timeout", default: Some("30s"), secret: false, doc: "Longest time one statement on a job source may take (on PostgreSQL also the session's `statement_timeout`); longer, and the job fails with the generic source error." },
    Setting { name: "job_max_running", default: Some("4"), secret: false, doc: "Re-encryption jobs one process runs at once, over all tenants." },
    Setting { name: "job_max_running_per_tenant", default: Some("1"), secret: false, doc: "Re-encryption jobs one process runs at once for one tenant, so that one tenant's slow or hung source holds up its own jobs only." },
    Setting { name: "sync_interval", default: Some("1s"), secret: false, doc: "How often the change feed is polled, bounding how long a rotation or revocation made by another process takes to reach this one." },
    Setting { name: "change_feed_max_lag", default: Some("30s"), secret: false, doc: "Longest the change feed may go unread before this process stops serving key operations from memory (503 `not_ready`, and `/readyz` says why): another replica may have rotated, disabled or destroyed a version meanwhile. At least three times `sync_interval`." },
    Setting { name: "key_cache_max_age", default: Some("5m"), secret: false, doc: "The oldest a cached encryption (its unwrapped keys and version states) may be before it is read from the database again, whatever the change feed said." },
    Setting { name: "destroy_grace", default: Some("24h"), secret: false, doc: "How long a version must have been `disabled` before it can be destroyed without `force`: every replica has stopped using it by then, and a ciphertext a job missed fails loudly (403 `version_disabled`) while re-enabling still recovers it. Longer than `change_feed_max_lag` plus `sync_interval`." },
    Setting { name: "request_timeout", default: Some("30s"), secret: false, doc: "Longest time one request may take." },
    Setting { name: "shutdown_timeout", default: Some("30s"), secret: false, doc: "On SIGTERM, how long requests in flight may take to finish." },
    Setting { name: "max_connections", default: Some("2048"), secret: false, doc: "Most connections the API listener serves at once. At it, the oldest connection that has sent no request yet is closed to make room for a new one; if every connection has sent a request, new connections wait in the operating system's listen queue until one closes. The first of a burst is logged." },
    Setting { name: "max_connections_per_address", default: Some("256"), secret: false, doc: "Most connections one client address (the TCP peer, not a forwarded header) may hold open on each listener; more are accepted and closed at once, counted in `keyward_connections_dropped_total`. Clients behind one NAT or load balancer share it: raise it (up to `max_connections`) when they reach Keyward through one address. On the ops listener it is at most half of `ops_max_connections`." },
    Setting { name: "connection_first_request_timeout", default: Some("10s"), secret: false, doc: "A new connection must complete its TLS handshake and send its first request within this time after it is accepted into a connection slot, or it is closed: a silent or half-open connection cannot hold a slot until the idle timeout." },
    Setting { name: "ops_max_connections", default: Some("64"), secret: false, doc: "Most connections the ops listener (`ops_listen`) serves at once; it has its own slots, apart from the API listener's `max_connections`. At it, the oldest connection that has sent no request, else the one idle the longest, is closed to make room for a probe." },
    Setting { name: "connection_idle_timeout", default: Some("120s"), secret: false, doc: "A connection (HTTP/1.1 or HTTP/2) with no request in flight for this long is closed. Longer than the usual client and load-balancer keep-alive (60 to 90 s), so that they close first." },
    Setting { name: "connection_max_age", default: Some("10m"), secret: false, doc: "A connection open this long is closed gracefully: HTTP/2 gets GOAWAY; on HTTP/1.1 the answer to the request in flight, or to the next one (an idle connection waits for it, or for its idle timeout), says `Connection: close`, so that no request is sent into a closing connection; requests in flight finish. Bounds how long a connection outlives a revoked client certificate (reloaded CRL) or a replaced server certificate." },
    Setting { name: "tls_cert", default: None, secret: false, doc: "PEM file with the server certificate chain (leaf first). With `tls_key`, serves HTTPS: TLS 1.3 only, HTTP/2 and HTTP/1.1." },
    Setting { name: "tls_key", default: None, secret: false, doc: "PEM file with the server's private key." },
    Setting { name: "tls_client_ca", default: None, secret: false, doc: "PEM bundle of CAs that client certificates must chain to: turns on mutual TLS (a client without a valid certificate fails the handshake)." },
    Setting { name: "tls_client_crl", default: None, secret: false, doc: "PEM file of CRLs for client certificates: a revoked certificate fails the handshake. Needs `tls_client_ca`." },
    Setting { name: "acme_directory", default: None, secret: false, doc: "ACME directory URL (e.g. `https://acme-v02.api.letsencrypt.org/directory`): `serve` obtains its server certificate through ACME and renews it in the background, instead of `tls_cert`/`tls_key`. Replicas on one PostgreSQL share it: one orders (a lease in the database), all serve it; the account and certificate keys are stored sealed under the root KEK. See docs/tls.md." },
    Setting { name: "acme_domains", default: None, secret: false, doc: "Comma-separated DNS names the ACME certificate is for (the first is its subject). Required with `acme_directory`." },
    Setting { name: "acme_contact", default: None, secret: false, doc: "Comma-separated contact URLs for the ACME account, e.g. `mailto:ops@example.com` (the CA's expiry and policy mail)." },
    Setting { name: "acme_directory_ca", default: None, secret: false, doc: "PEM CA certificate that the ACME directory's HTTPS certificate chains to, for a private ACME server (step-ca, Pebble); unset: the system's trusted roots." },
    Setting { name: "acme_challenge", default: Some("tls-alpn-01"), secret: false, doc: "`tls-alpn-01` (the CA connects to port 443 of each domain with ALPN `acme-tls/1`) or `http-01` (the CA fetches `http://DOMAIN/.well-known/acme-challenge/TOKEN` on port 80). Served on `acme_challenge_listen` by every replica." },
    Setting { name: "acme_challenge_listen", default: None, secret: false, doc: "Address of the challenge listener (its own, apart from `listen`): where port 443 (tls-alpn-01) or port 80 (http-01) of the domains reaches. Required with `acme_directory`." },
    Setting { name: "acme_check_interval", default: Some("1m"), secret: false, doc: "How often each replica reads the stored certificate: picks up one another replica renewed, and sees when renewal is due (two thirds into the certificate's lifetime)." },
    Setting { name: "acme_retry_min", default: Some("30s"), secret: false, doc: "After a failed ACME order, the first wait before the next (doubling per failure up to `acme_retry_max`); the current certificate is served meanwhile. Shared by the replicas through the lease." },
    Setting { name: "acme_retry_max", default: Some("1h"), secret: false, doc: "The longest wait between failed ACME orders." },
    Setting { name: "allow_plaintext", default: Some("false"), secret: false, doc: "Allow plain HTTP on a non-loopback address (e.g. behind a TLS-terminating proxy). Without TLS and without this, `serve` listens on loopback only." },
    Setting { name: "audit_file", default: Some("-"), secret: false, doc: "Where audit records go as hash-chained JSON lines: a file path (appended, created with mode 0600, its chain continued across restarts; one file per replica) or `-` for standard output. Every record also goes to the database (table `audit_segments`), read by `GET /v1/audit`." },
    Setting { name: "audit_file_max_bytes", default: Some("1073741824"), secret: false, doc: "The audit file is rotated once it reaches this size: the writer signs a checkpoint, renames the file to `FILE.SEQ` (SEQ: the first record's `seq`, 20 digits, so names sort in chain order) and starts a new `FILE` with the same checkpoint, the chain continuing. `keyward audit verify FILE.* FILE` checks the set as one chain. Archive or delete rotated files yourself. `0`: never rotate." },
    Setting { name: "audit_checkpoint_records", default: Some("1000"), secret: false, doc: "The audit writer signs a checkpoint (Ed25519, with a key derived from the root KEK) after this many records not yet covered by one, so that `keyward audit verify` detects a rewritten or cut file. Records after the last checkpoint are reported as not covered." },
    Setting { name: "audit_checkpoint_interval", default: Some("10s"), secret: false, doc: "Or once the oldest record not yet covered is this old; and always at shutdown. Bounds how long a record stays unsigned." },
    Setting { name: "audit_retention", default: Some("400d"), secret: false, doc: "How long records stay in the database's audit table (`GET /v1/audit`); older segments are deleted in the background, in batches. `forever` keeps everything. The audit file is never touched by retention: it rotates by size (`audit_file_max_bytes`)." },
    Setting { name: "memory_release_idle_after", default: Some("2s"), secret: false, doc: "Once the server has used under 2 % of a core for this long, idle SQLite connections drop their page caches and the allocators give free memory back to the operating system (once per idle period; busy again, it refills as it goes). `off` keeps everything for the next burst. See the memory table in docs/operations.md." },
    Setting { name: "metrics_refresh_interval", default: Some("15s"), secret: false, doc: "How often the `/metrics` figures read from the database (key versions and jobs per state) are refreshed. Scrapes never query the database." },
    Setting { name: "client_cert_expiry_warning", default: Some("14d"), secret: false, doc: "How far ahead a client certificate issued by `keyward client-cert issue` counts as expiring soon: `/metrics` carries the number of live, bound certificates expiring within it (`keyward_client_certificates_expiring_soon`, no identifiers); `GET /v1/admin/client-certificates` (operator) names them." },
    Setting { name: "log_format", default: Some("json"), secret: false, doc: "`json` (one object per line) or `text`." },
    Setting { name: "log_level", default: Some("info"), secret: false, doc: "A tracing filter: `info`, `debug`, or per target like `keyward=debug,info`." },
];

/// Variables read by the CLI's client commands (`keyward job ...`), not by the
/// server: allowed in the environment, not settings.
pub const CLIENT_VARIABLES: &[&str] = &["KEYWARD_URL", "KEYWARD_API_KEY", "KEYWARD_API_SECRET"];

/// Kubernetes injects `{SERVICE}_SERVICE_HOST`, `{SERVICE}_PORT...` variables for
/// every Service in the namespace; a Service named `keyward` yields
/// `KEYWARD_SERVICE_HOST`, `KEYWARD_PORT_8480_TCP` and the like. They are not
/// settings (no setting has such a name), so they are skipped, not refused.
pub(super) fn is_service_link(rest: &str) -> bool {
    rest == "PORT"
        || rest.starts_with("PORT_")
        || rest.ends_with("_SERVICE_HOST")
        || rest.contains("_SERVICE_PORT")
        || rest.ends_with("_PORT")
        || rest.contains("_PORT_")
        || rest == "SERVICE_HOST"
        || rest.starts_with("SERVICE_PORT")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_reference_documents_exactly_the_accepted_settings() {
        let doc = include_str!("../../docs/configuration.md");
        for s in SETTINGS {
            let row = format!("| `{}` | `{}` |", s.name, s.env_var());
            assert!(
                doc.contains(&row),
                "docs/configuration.md lacks a row for {}",
                s.name
            );
        }
        for word in doc.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if let Some(rest) = word.strip_prefix("KEYWARD_").filter(|r| {
                !r.is_empty() && !is_service_link(r) && !CLIENT_VARIABLES.contains(&word)
            }) {
                assert!(
                    SETTINGS.iter().any(|s| s.name.eq_ignore_ascii_case(rest)),
                    "docs/configuration.md mentions {word}, which Keyward does not accept"
                );
            }
        }
    }
}
