//! Signed checkpoints: lines the writer puts between records, each stating
//! which records of the chain it covers, signed with the checkpoint key
//! (Ed25519, derived from the active root KEK; see
//! [`crate::crypto::CheckpointKey`]).
//!
//! A checkpoint line is `{"checkpoint":BODY,"signature":"HEX"}`, where the
//! signature is over `keyward:audit-checkpoint:v1\n` followed by BODY's bytes
//! exactly as written. BODY states the last record covered (`seq`, `hash`):
//! since each record's hash covers the one before, signing that hash signs
//! every record before it. It also states where the file starts
//! (`fileStart`, `fileStartPrev`: the `seq` and `prev` of the first record
//! the writer wrote into this file), so that a file whose head was cut says
//! so. Checkpoints are not records: they are not numbered, not part of the
//! chain, and not stored in the table.

use serde::{Deserialize, Serialize};

use crate::crypto::{
    checkpoint_key_id, hex_into, parse_hex, verify_checkpoint, CheckpointKey,
    CHECKPOINT_PUBLIC_KEY_LEN, CHECKPOINT_SIGNATURE_LEN,
};

/// How every checkpoint line starts (and no record line does).
const PREFIX: &[u8] = b"{\"checkpoint\":";
/// What separates the body from the signature.
const SIGNATURE: &[u8] = b",\"signature\":\"";

/// What a checkpoint states, fields in this order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint<S = String> {
    /// The `seq` of the last record covered (0: none yet).
    pub seq: u64,
    /// That record's `hash` (the chain's genesis value when `seq` is 0).
    pub hash: S,
    /// The `seq` of the first record the writer wrote into this file.
    pub file_start: u64,
    /// That record's `prev`.
    pub file_start_prev: S,
    /// When the checkpoint was written, RFC 3339 UTC.
    pub time: S,
    /// Why: `interval` (the record count or the time since the last one),
    /// or `shutdown`.
    pub reason: S,
    /// The signing key's id (see [`crate::crypto::checkpoint_key_id`]).
    pub key_id: S,
}

impl Checkpoint<&str> {
    /// Appends the signed checkpoint line (no newline) to `out`.
    pub(super) fn write_signed(&self, key: &CheckpointKey, out: &mut String) {
        out.push_str("{\"checkpoint\":");
        let start = out.len();
        crate::json::Object::new(out)
            .u64("seq", self.seq)
            .str("hash", self.hash)
            .u64("fileStart", self.file_start)
            .str("fileStartPrev", self.file_start_prev)
            .str("time", self.time)
            .str("reason", self.reason)
            .str("keyId", self.key_id)
            .end();
        let signature = key.sign(&out.as_bytes()[start..]);
        out.push_str(",\"signature\":\"");
        hex_into(&signature, out);
        out.push_str("\"}");
    }
}

/// A checkpoint line, taken apart.
#[derive(Debug)]
pub(super) struct SignedCheckpoint<'a> {
    /// What it states.
    pub(super) checkpoint: Checkpoint,
    /// The bytes the signature covers.
    body: &'a [u8],
    signature: [u8; CHECKPOINT_SIGNATURE_LEN],
}

impl SignedCheckpoint<'_> {
    /// Whether `public_key` signed it (and is the key it names).
    pub(super) fn signed_by(&self, public_key: &[u8; CHECKPOINT_PUBLIC_KEY_LEN]) -> bool {
        checkpoint_key_id(public_key) == self.checkpoint.key_id
            && verify_checkpoint(public_key, self.body, &self.signature)
    }
}

/// Whether `line` is a checkpoint line (it may still be malformed).
pub(super) fn is_checkpoint(line: &[u8]) -> bool {
    line.starts_with(PREFIX)
}

/// Takes a checkpoint line apart; why not, when it is malformed.
pub(super) fn parse(line: &[u8]) -> Result<SignedCheckpoint<'_>, &'static str> {
    let rest = line.strip_prefix(PREFIX).ok_or("not a checkpoint line")?;
    let rest = rest
        .strip_suffix(b"\"}")
        .ok_or("a checkpoint line must end with its signature")?;
    let split = rest
        .windows(SIGNATURE.len())
        .rposition(|w| w == SIGNATURE)
        .ok_or("a checkpoint line must end with its signature")?;
    let (body, signature) = (&rest[..split], &rest[split + SIGNATURE.len()..]);
    let checkpoint: Checkpoint = serde_json::from_slice(body)
        .map_err(|_| "the checkpoint's fields are missing or malformed")?;
    let signature = std::str::from_utf8(signature)
        .ok()
        .and_then(parse_hex)
        .and_then(|s| <[u8; CHECKPOINT_SIGNATURE_LEN]>::try_from(s).ok())
        .ok_or("the checkpoint's signature is not 64 bytes of hex")?;
    Ok(SignedCheckpoint {
        checkpoint,
        body,
        signature,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::DataKey;

    #[test]
    fn a_checkpoint_line_parses_back_and_verifies_only_unchanged() {
        let key = CheckpointKey::derive(&DataKey::from_slice(&[1; 32]).unwrap());
        let other = CheckpointKey::derive(&DataKey::from_slice(&[2; 32]).unwrap());
        let hash = "ab".repeat(32);
        let stated = Checkpoint {
            seq: 12,
            hash: hash.as_str(),
            file_start: 1,
            file_start_prev: crate::audit::GENESIS,
            time: "2026-01-01T00:00:00.000Z",
            reason: "interval",
            key_id: key.id(),
        };
        let mut line = String::new();
        stated.write_signed(&key, &mut line);
        assert!(is_checkpoint(line.as_bytes()));
        let parsed = parse(line.as_bytes()).unwrap();
        assert_eq!(parsed.checkpoint.seq, 12);
        assert_eq!(parsed.checkpoint.hash, hash);
        assert_eq!(parsed.checkpoint.key_id, key.id());
        assert!(parsed.signed_by(key.public_key()));
        assert!(!parsed.signed_by(other.public_key()));
        // The line is what serde writes for the body, plus the signature.
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["checkpoint"]["fileStartPrev"], crate::audit::GENESIS);

        let changed = line.replace("\"seq\":12", "\"seq\":13");
        assert!(!parse(changed.as_bytes())
            .unwrap()
            .signed_by(key.public_key()));
        for bad in [
            "{\"checkpoint\":{}}".to_string(),
            line.replace(",\"signature\"", ",\"sig\""),
            line[..line.len() - 4].to_string() + "\"}",
            line.replace("\"seq\":12,", ""),
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
