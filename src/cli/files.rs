//! `keyward encrypt-file IN OUT` and `keyward decrypt-file IN OUT`: a file of
//! any size sealed in Keyward's stream format (`crate::crypto::stream`) under
//! a data key from a running Keyward (`POST /v1/datakey`, and
//! `/v1/datakey/unwrap` to decrypt). Only the data key crosses the network,
//! never the file's bytes; memory stays at two chunks whatever the size.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use base64::Engine;
use reqwest::Method;
use serde::Deserialize;
use serde_json::json;

use crate::client::Remote;
use crate::crypto::stream::{
    decrypt_chunks, encrypt_stream, StreamCipher, StreamHeader, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
};
use crate::crypto::{DataKey, SecretString};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// `encrypt-file` arguments.
#[derive(Debug, clap::Args)]
pub(super) struct EncryptFileArgs {
    /// The file to encrypt (`-`: standard input).
    input: PathBuf,
    /// Where to write the stream (`-`: standard output).
    output: PathBuf,
    /// The encryption whose active version wraps the file's data key.
    #[arg(long, env = "KEYWARD_ENCRYPTION_ID")]
    encryption_id: String,
    /// A context bound into the wrapped data key: decrypt-file needs it again.
    #[arg(long)]
    context: Option<String>,
    /// Plaintext bytes per chunk (1 KiB to 16 MiB).
    #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
    #[command(flatten)]
    remote: Remote,
}

/// `decrypt-file` arguments.
#[derive(Debug, clap::Args)]
pub(super) struct DecryptFileArgs {
    /// The stream to decrypt (`-`: standard input).
    input: PathBuf,
    /// Where to write the plaintext; written to `OUT.partial` and renamed
    /// only once the whole stream verified (`-`: standard output, which may
    /// receive verified chunks before a cut is found at the end).
    output: PathBuf,
    /// The context encrypt-file was given.
    #[arg(long)]
    context: Option<String>,
    #[command(flatten)]
    remote: Remote,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DataKeyAnswer {
    #[serde(deserialize_with = "secret")]
    plaintext_key: SecretString,
    wrapped_key: String,
    encryption_version_id: uuid::Uuid,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UnwrapAnswer {
    #[serde(deserialize_with = "secret")]
    plaintext_key: SecretString,
}

/// A key field read into memory cleared on drop.
fn secret<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
    String::deserialize(d).map(SecretString::new)
}

fn data_key(b64: &SecretString) -> anyhow::Result<DataKey> {
    let raw = zeroize::Zeroizing::new(
        B64.decode(b64.as_bytes())
            .context("the data key is not base64")?,
    );
    DataKey::from_slice(&raw).context("the data key is not 32 bytes")
}

fn open_input(path: &Path) -> anyhow::Result<Box<dyn std::io::Read + Send>> {
    if path == Path::new("-") {
        return Ok(Box::new(std::io::stdin()));
    }
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(Box::new(BufReader::with_capacity(1 << 16, file)))
}

/// Where output goes until it is complete: `OUT.partial`, renamed at the end.
fn partial(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

/// Runs `write` into `output` (via `OUT.partial`, renamed on success and
/// removed on failure), on a blocking thread.
async fn write_output(
    output: PathBuf,
    write: impl FnOnce(&mut dyn std::io::Write) -> anyhow::Result<u64> + Send + 'static,
) -> anyhow::Result<u64> {
    tokio::task::spawn_blocking(move || {
        if output == Path::new("-") {
            let mut out = std::io::stdout().lock();
            return write(&mut out);
        }
        let tmp = partial(&output);
        let result = (|| {
            let file =
                File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
            let mut out = BufWriter::with_capacity(1 << 16, file);
            let n = write(&mut out)?;
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            Ok(n)
        })();
        match result {
            Ok(n) => {
                std::fs::rename(&tmp, &output)
                    .with_context(|| format!("cannot write {}", output.display()))?;
                Ok(n)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    })
    .await
    .context("the file task failed")?
}

/// `keyward encrypt-file`.
pub(super) async fn encrypt_file(args: EncryptFileArgs) -> anyhow::Result<()> {
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&args.chunk_size) {
        bail!("--chunk-size: expected {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes");
    }
    let encryption =
        uuid::Uuid::parse_str(&args.encryption_id).context("--encryption-id: not a UUID")?;
    let mut body = json!({"encryptionId": encryption.to_string()});
    if let Some(c) = &args.context {
        body["context"] = json!(c);
    }
    let answer: DataKeyAnswer = args
        .remote
        .call(Method::POST, "/v1/datakey", Some(&body))
        .await?;
    let key = data_key(&answer.plaintext_key)?;
    let wrapped = B64
        .decode(&answer.wrapped_key)
        .context("the wrapped key is not base64")?;
    let header = StreamHeader::new(
        args.chunk_size,
        *encryption.as_bytes(),
        *answer.encryption_version_id.as_bytes(),
        wrapped,
    );
    let mut input = open_input(&args.input)?;
    let n = write_output(args.output.clone(), move |mut out| {
        Ok(encrypt_stream(&key, &header, &mut input, &mut out)?)
    })
    .await?;
    eprintln!("encrypted {n} bytes to {}", args.output.display());
    Ok(())
}

/// `keyward decrypt-file`.
pub(super) async fn decrypt_file(args: DecryptFileArgs) -> anyhow::Result<()> {
    let mut input = open_input(&args.input)?;
    let (header, bytes) = StreamHeader::read_from(&mut input)?;
    let encryption = uuid::Uuid::from_bytes(header.encryption_id);
    let mut body = json!({
        "encryptionId": encryption.to_string(),
        "wrappedKey": B64.encode(&header.wrapped_key),
    });
    if let Some(c) = &args.context {
        body["context"] = json!(c);
    }
    let answer: UnwrapAnswer = args
        .remote
        .call(Method::POST, "/v1/datakey/unwrap", Some(&body))
        .await?;
    let key = data_key(&answer.plaintext_key)?;
    let mut cipher = StreamCipher::new(&key, &header, &bytes);
    drop(key);
    let n = write_output(args.output.clone(), move |mut out| {
        Ok(decrypt_chunks(&mut cipher, &mut input, &mut out)?)
    })
    .await?;
    eprintln!("decrypted {n} bytes to {}", args.output.display());
    Ok(())
}
