//! Proposal batching: concurrent proposals to one group ride one Raft entry.
//!
//! openraft appends each client write as its own entry and waits for its fsync before taking
//! the next, so one command per entry caps a group at one command per fsync. The batcher
//! drains every proposal waiting for a group into one entry (up to a bound), keeps a bounded
//! number of entries in flight per group, and hands each proposer its own answer. Order is
//! kept: proposals enter the log in the order they entered the queue.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::{Command, GroupId, NodeId, Raft};

/// Proposals that may wait for one group before callers are told it is overloaded.
pub const PROPOSAL_QUEUE_MAX: usize = 16_384;
/// Commands in one Raft entry.
pub const BATCH_COMMANDS_MAX: usize = 1024;
/// Bytes of commands in one Raft entry (a single larger command still goes, alone).
pub const BATCH_BYTES_MAX: usize = 1 << 20;
/// Entries of one group proposed and not yet answered. One: while it commits, the next
/// batch fills, which measured faster on this machine than pipelining small batches.
pub const BATCHES_IN_FLIGHT_MAX: usize = 1;

/// Why a proposal was not committed (all but `Raft` mean it certainly was not).
#[derive(Clone, Debug, thiserror::Error)]
pub enum ProposeError {
    /// This node does not lead the group; `leader` is its hint.
    #[error("not the leader (leader hint: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    /// This node does not host the group.
    #[error("group {0} is not hosted here")]
    NotHosted(GroupId),
    /// The group's proposal queue is full.
    #[error("group {group} has {max} proposals waiting; try again")]
    Overloaded { group: GroupId, max: usize },
    /// Raft failed or stopped while the proposal was in flight: outcome unknown.
    #[error("raft failed: {0}")]
    Raft(String),
}

/// A committed proposal: the entry's log index and the state machine's answer.
pub type Committed = (u64, Vec<u8>);

pub(crate) struct Proposal {
    pub(crate) command: Vec<u8>,
    pub(crate) reply: oneshot::Sender<Result<Committed, ProposeError>>,
}

/// What a group's batcher takes, in order.
pub(crate) enum Item {
    Proposal(Proposal),
    /// Answered once every item queued before it was handed to Raft (or refused): a
    /// handover waits for it before reading the leader's last log index.
    Barrier(oneshot::Sender<()>),
}

/// Starts the batcher of `group`; proposals go into the returned sender.
pub(crate) fn start(
    group: GroupId,
    raft: Raft,
    handing_over: Arc<AtomicBool>,
) -> mpsc::Sender<Item> {
    let (tx, rx) = mpsc::channel(PROPOSAL_QUEUE_MAX);
    tokio::spawn(run(group, raft, rx, handing_over));
    tx
}

async fn run(
    group: GroupId,
    raft: Raft,
    mut rx: mpsc::Receiver<Item>,
    handing_over: Arc<AtomicBool>,
) {
    let in_flight = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT_MAX));
    // A barrier met while filling a batch: answered right after that batch is handed on.
    let mut barrier: Option<oneshot::Sender<()>> = None;
    loop {
        if let Some(done) = barrier.take() {
            let _ = done.send(());
        }
        let first = match rx.recv().await {
            Some(Item::Proposal(p)) => p,
            Some(Item::Barrier(done)) => {
                let _ = done.send(());
                continue;
            }
            None => return,
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.command.len();
        let mut batch = vec![first];
        while batch.len() < BATCH_COMMANDS_MAX && bytes < BATCH_BYTES_MAX {
            match rx.try_recv() {
                Ok(Item::Proposal(p)) => {
                    bytes += p.command.len();
                    batch.push(p);
                }
                Ok(Item::Barrier(done)) => {
                    barrier = Some(done);
                    break;
                }
                Err(_) => break,
            }
        }
        // The leadership is being handed over: nothing more enters this leader's log, so
        // the target can hold all of it (not appended: the callers retry on the new leader).
        if handing_over.load(Ordering::Acquire) {
            for p in batch {
                let _ = p.reply.send(Err(ProposeError::NotLeader { leader: None }));
            }
            drop(permit);
            continue;
        }
        let mut commands = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for p in batch {
            commands.push(ByteBuf::from(p.command));
            replies.push(p.reply);
        }
        match raft.client_write_ff(Command(commands)).await {
            Err(fatal) => {
                let e = ProposeError::Raft(fatal.to_string());
                for r in replies {
                    let _ = r.send(Err(e.clone()));
                }
            }
            Ok(answer) => {
                let raft = raft.clone();
                tokio::spawn(async move {
                    let result = answer.await;
                    drop(permit);
                    match result {
                        Ok(Ok(resp)) => {
                            let index = resp.log_id.index;
                            let mut answers = resp.data.0.into_iter();
                            for r in replies {
                                let a = answers.next().map(ByteBuf::into_vec).ok_or_else(|| {
                                    ProposeError::Raft(
                                        "state machine answered fewer commands".into(),
                                    )
                                });
                                let _ = r.send(a.map(|a| (index, a)));
                            }
                        }
                        Ok(Err(openraft::error::ClientWriteError::ForwardToLeader(f))) => {
                            for r in replies {
                                let _ = r.send(Err(ProposeError::NotLeader {
                                    leader: f.leader_id,
                                }));
                            }
                        }
                        Ok(Err(e)) => {
                            let e = ProposeError::Raft(e.to_string());
                            for r in replies {
                                let _ = r.send(Err(e.clone()));
                            }
                        }
                        Err(_) => {
                            // openraft dropped the answer: its core stopped (a fatal
                            // error or a shutdown). Say which, for the operator.
                            let state = raft.metrics().borrow().running_state.clone();
                            tracing::warn!(
                                group,
                                ?state,
                                "raft dropped the answer to a proposal batch: outcome unknown"
                            );
                            let e = ProposeError::Raft(format!("group {group} stopped"));
                            for r in replies {
                                let _ = r.send(Err(e.clone()));
                            }
                        }
                    }
                });
            }
        }
    }
}
