//! The partition state machine. For now it is an ordered, replicated record log (what the
//! foundation needs and tests); the chat layer extends the command set.

use chatd_raftlog::{Applier, ApplyTxn, GroupId};
use serde::{Deserialize, Serialize};

/// Commands of a partition group.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PartitionCommand {
    /// Appends an opaque record; the answer is its sequence number in the partition.
    Append(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// A stored record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Its sequence number in the partition, from 1, gapless.
    pub seq: u64,
    /// The Raft log index it was committed at.
    pub index: u64,
    /// The record.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// The answer to a partition command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PartitionReply {
    /// The record's sequence number.
    Appended { seq: u64 },
    /// The command could not be decoded; nothing changed.
    Malformed(String),
}

const COUNT_KEY: &[u8] = b"n";

/// Key of record `seq`: `r | seq (BE)`, so records sort by seq.
pub fn record_key(seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'r';
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Applies partition commands.
#[derive(Default)]
pub struct PartitionApplier;

fn corrupt(e: chatd_codec::CodecError) -> chatd_storage::StorageError {
    chatd_storage::StorageError::Corrupt {
        cf: "sm",
        cause: e.to_string(),
    }
}

impl Applier for PartitionApplier {
    fn apply(
        &self,
        _group: GroupId,
        index: u64,
        command: &[u8],
        txn: &mut ApplyTxn<'_>,
    ) -> Result<Vec<u8>, chatd_storage::StorageError> {
        let reply = match chatd_codec::decode::<PartitionCommand>(command) {
            Err(e) => PartitionReply::Malformed(e.to_string()),
            Ok(PartitionCommand::Append(payload)) => {
                let count = match txn.get(COUNT_KEY)? {
                    Some(b) => chatd_codec::decode::<u64>(&b).map_err(corrupt)?,
                    None => 0,
                };
                let seq = count + 1;
                let record = LogRecord {
                    seq,
                    index,
                    payload,
                };
                txn.put(
                    &record_key(seq),
                    chatd_codec::encode(&record).map_err(corrupt)?,
                );
                txn.put(COUNT_KEY, chatd_codec::encode(&seq).map_err(corrupt)?);
                PartitionReply::Appended { seq }
            }
        };
        chatd_codec::encode(&reply).map_err(corrupt)
    }
}

/// Number of records in a partition's committed state.
pub fn record_count(store: &chatd_storage::Storage, group: GroupId) -> Result<u64, anyhow::Error> {
    Ok(match chatd_raftlog::read_record(store, group, COUNT_KEY)? {
        Some(b) => chatd_codec::decode::<u64>(&b)?,
        None => 0,
    })
}

/// Up to `limit` records from `from_seq` on.
pub fn read_records(
    store: &chatd_storage::Storage,
    group: GroupId,
    from_seq: u64,
    limit: usize,
) -> Result<Vec<LogRecord>, anyhow::Error> {
    let rows = chatd_raftlog::scan_records(
        store,
        group,
        &record_key(from_seq),
        &record_key(u64::MAX),
        limit,
    )?;
    rows.iter()
        .map(|(_, v)| chatd_codec::decode::<LogRecord>(v).map_err(Into::into))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn golden_bytes_of_partition_formats() {
        let cmd = chatd_codec::encode(&PartitionCommand::Append(b"hi".to_vec())).unwrap();
        assert_eq!(cmd, vec![1, 0, 2, b'h', b'i']);
        let rec = chatd_codec::encode(&LogRecord {
            seq: 1,
            index: 300,
            payload: b"x".to_vec(),
        })
        .unwrap();
        assert_eq!(rec, vec![1, 1, 251, 44, 1, 1, b'x']);
        let reply = chatd_codec::encode(&PartitionReply::Appended { seq: 7 }).unwrap();
        assert_eq!(reply, vec![1, 0, 7]);
        assert_eq!(record_key(258), [b'r', 0, 0, 0, 0, 0, 0, 1, 2]);
    }
}
