//! The `aws-kms` provider: the root KEK is encrypted by an AWS KMS key (id, ARN
//! or alias in `KEYWARD_AWS_KMS_KEY_ID`). Region and credentials come from the
//! standard AWS chain (environment, profile, SSO, instance or task role);
//! `KEYWARD_AWS_KMS_ENDPOINT` points at a KMS-compatible endpoint instead of AWS.
//! The KEK id is bound as KMS encryption context, so a wrapped KEK copied onto
//! another row fails to decrypt.

use std::time::Duration;

use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;

use super::provider::{MasterKeyProvider, ProviderError, ProviderFuture};
use crate::crypto::DataKey;
use crate::domain::ids::KekId;

const CONTEXT_KEY: &str = "keyward:root-kek";

/// A KMS key in AWS KMS or a KMS-compatible service.
pub struct AwsKms {
    client: aws_sdk_kms::Client,
    key_id: String,
}

impl AwsKms {
    /// Builds the client from the standard AWS configuration chain.
    pub async fn new(key_id: String, endpoint: Option<String>) -> AwsKms {
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(3))
            .operation_attempt_timeout(Duration::from_secs(10))
            .operation_timeout(Duration::from_secs(30))
            .build();
        let mut loader =
            aws_config::defaults(aws_config::BehaviorVersion::latest()).timeout_config(timeouts);
        if let Some(endpoint) = endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let config = loader.load().await;
        AwsKms {
            client: aws_sdk_kms::Client::new(&config),
            key_id,
        }
    }

    /// Checks at start that the key exists where the client looks for it
    /// (`DescribeKey`): a key id that does not exist, or exists in another
    /// region, is a configuration error, reported at once instead of being
    /// retried as an outage. Unreachable, throttled or not allowed to
    /// describe keys: not decided here (the first real call reports it).
    pub async fn check_key(&self) -> Result<(), String> {
        let region = self
            .client
            .config()
            .region()
            .map(|r| r.to_string())
            .ok_or("no AWS region is configured (set AWS_REGION)")?;
        match self.client.describe_key().key_id(&self.key_id).send().await {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(service))
                if service.err().code() == Some("NotFoundException") =>
            {
                Err(format!(
                    "the KMS key `{}` (KEYWARD_AWS_KMS_KEY_ID) does not exist in region {region} (AWS_REGION): a wrong key id, or the wrong region",
                    self.key_id
                ))
            }
            Err(e) => {
                tracing::warn!(
                    error = %classify(e),
                    "could not check the AWS KMS key at start; the first call will tell"
                );
                Ok(())
            }
        }
    }
}

/// Sorts a KMS failure: a key that cannot decrypt this ciphertext is a
/// mismatch; everything else (network, throttling, permissions, a missing key)
/// is "unavailable", worth retrying and reported by readiness.
fn classify<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
    e: SdkError<E>,
) -> ProviderError {
    match &e {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("unknown");
            match code {
                "InvalidCiphertextException" | "IncorrectKeyException" => {
                    ProviderError::KeyMismatch
                }
                _ => ProviderError::Unavailable(format!(
                    "AWS KMS refused: {code}: {}",
                    service.err().message().unwrap_or("")
                )),
            }
        }
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
            ProviderError::Unavailable(format!(
                "AWS KMS unreachable: {}",
                aws_sdk_kms::error::DisplayErrorContext(&e)
            ))
        }
        _ => ProviderError::Unavailable(format!(
            "AWS KMS call failed: {}",
            aws_sdk_kms::error::DisplayErrorContext(&e)
        )),
    }
}

impl MasterKeyProvider for AwsKms {
    fn name(&self) -> &'static str {
        "aws-kms"
    }

    fn key_setting(&self) -> &'static str {
        "KEYWARD_AWS_KMS_KEY_ID"
    }

    fn wrap_root_kek<'a>(&'a self, kek_id: KekId, kek: &'a DataKey) -> ProviderFuture<'a, Vec<u8>> {
        Box::pin(async move {
            let out = self
                .client
                .encrypt()
                .key_id(&self.key_id)
                .plaintext(Blob::new(kek.expose().to_vec()))
                .encryption_context(CONTEXT_KEY, kek_id.to_string())
                .send()
                .await
                .map_err(classify)?;
            out.ciphertext_blob
                .map(|b| b.into_inner())
                .ok_or_else(|| ProviderError::Unavailable("AWS KMS returned no ciphertext".into()))
        })
    }

    fn unwrap_root_kek<'a>(
        &'a self,
        kek_id: KekId,
        wrapped: &'a [u8],
    ) -> ProviderFuture<'a, DataKey> {
        Box::pin(async move {
            let out = self
                .client
                .decrypt()
                .key_id(&self.key_id)
                .ciphertext_blob(Blob::new(wrapped.to_vec()))
                .encryption_context(CONTEXT_KEY, kek_id.to_string())
                .send()
                .await
                .map_err(classify)?;
            kek_from_kms(out.plaintext)
        })
    }
}

/// The root KEK from KMS's answer. `Blob::into_inner` hands over the buffer
/// the SDK decoded the KEK into (no copy), which is cleared here whatever
/// the outcome.
fn kek_from_kms(plaintext: Option<Blob>) -> Result<DataKey, ProviderError> {
    let plain = zeroize::Zeroizing::new(
        plaintext
            .map(Blob::into_inner)
            .ok_or_else(|| ProviderError::Unavailable("AWS KMS returned no plaintext".into()))?,
    );
    DataKey::from_slice(&plain).ok_or(ProviderError::KeyMismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The buffer cleared is the SDK's own (the same allocation, not a copy
    /// that would leave the original behind), and only a 32-byte answer is
    /// a KEK.
    #[test]
    fn the_kms_answer_buffer_itself_is_taken_into_zeroizing_memory() {
        let kek = DataKey::generate();
        let buffer = kek.expose().to_vec();
        let at = buffer.as_ptr();
        let blob = Blob::new(buffer);
        let back = zeroize::Zeroizing::new(Blob::into_inner(blob));
        assert_eq!(back.as_ptr(), at, "into_inner moves, never copies");
        assert_eq!(back.len(), 32);
        let blob = Blob::new(kek.expose().to_vec());
        assert_eq!(kek_from_kms(Some(blob)).unwrap().expose(), kek.expose());
        assert!(matches!(
            kek_from_kms(Some(Blob::new(vec![7u8; 31]))),
            Err(ProviderError::KeyMismatch)
        ));
        assert!(matches!(
            kek_from_kms(None),
            Err(ProviderError::Unavailable(_))
        ));
    }
}
