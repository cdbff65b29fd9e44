//! Reads of chat state, run on a partition's leader (so they see every acknowledged write).
//!
//! [`run`] reads RocksDB synchronously: callers on the async runtime run it with
//! [`run_blocking`] (a blocking-pool thread). Every query's work is bounded: a history page
//! by `HISTORY_PAGE_MAX`, a sync page by `SYNC_PAGE_CHATS_MAX` chats (and
//! `UNREAD_SCAN_MAX` entries per chat for its unread count), the user index page by
//! its `limit`.

use chatd_chat::{HistoryPage, MessageRecord};
use chatd_raftlog::GroupId;
use chatd_storage::Storage;
use serde::{Deserialize, Serialize};

/// A read of one partition's chat state on behalf of `user`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ChatQuery {
    /// A page of `chat`'s history as `user` may see it.
    History {
        chat: String,
        user: String,
        before: Option<u64>,
        after: Option<u64>,
        limit: u32,
    },
    /// The state of `chats` for `user` (sync); at most `SYNC_PAGE_CHATS_MAX` chats are
    /// read, the rest are ignored.
    Summaries { chats: Vec<String>, user: String },
    /// One page of the chats indexed for `user` on its own partition: after `after`
    /// (exclusive), at most `limit` (capped at `SYNC_PAGE_CHATS_MAX` + 1, which the
    /// gateway asks for to learn whether another page follows).
    UserChats {
        user: String,
        after: Option<String>,
        limit: u32,
    },
    /// Current members of `chat`, if it exists.
    Members { chat: String },
    /// Everything about `chat` (admin).
    Inspect { chat: String },
    /// The record of `file` (in its home partition).
    File { file: String },
    /// Whether `user` may read `file` through `chat` (in the chat's partition): a message
    /// of `chat` inside the user's span carries it.
    FileAccess {
        chat: String,
        file: String,
        user: String,
    },
    /// Whether some message of `chat` carries `file` (collection); answered `Allowed`.
    FileCarried { chat: String, file: String },
    /// The record of `file` with its state (dedup, release), in its home partition.
    FileEntry { file: String },
    /// What the content index of `sha256` says for `file` (in the content's partition).
    ContentOf { sha256: String, file: String },
    /// What `user` holds against the quota (in the user's partition).
    Quota { user: String },
    /// The cursors of `chat`'s current members, for `user` (a current member).
    Cursors { chat: String, user: String },
    /// `user`'s E2E devices and their KeyPackages left at `now_ms` (in the user's
    /// partition).
    Devices {
        user: String,
        bounds: chatd_chat::e2e::KeyPackageBounds,
        now_ms: u64,
    },
}

/// The admin view of a chat.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChatInspection {
    pub chat: String,
    pub kind: String,
    pub name: String,
    pub creator: String,
    pub created_ts: u64,
    pub last_seq: u64,
    /// (user, from seq, to seq or none while a member).
    pub members: Vec<(String, u64, Option<u64>)>,
    /// (user, delivered, read).
    pub cursors: Vec<(String, u64, u64)>,
}

/// Answers to [`ChatQuery`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ChatQueryReply {
    History {
        messages: Vec<MessageRecord>,
        more: bool,
    },
    Summaries(Vec<chatd_proto::ChatState>),
    UserChats(Vec<String>),
    Members(Option<Vec<String>>),
    Inspection(Option<ChatInspection>),
    /// Refused (a protocol error code and a sentence); nothing was read.
    Rejected {
        code: String,
        message: String,
    },
    /// A file's record, if it exists.
    File(Option<chatd_chat::FileRecord>),
    /// The answer to [`ChatQuery::FileAccess`].
    Allowed(bool),
    /// A file's record and state, if it exists.
    FileEntry(Option<(chatd_chat::FileRecord, chatd_chat::FileState)>),
    /// The answer to [`ChatQuery::ContentOf`].
    ContentOf(chatd_chat::content::ContentOf),
    /// The answer to [`ChatQuery::Quota`].
    Quota(chatd_chat::quota::QuotaUsage),
    /// The answer to [`ChatQuery::Cursors`]: (user, delivered, read), sorted by user.
    Cursors(Vec<(String, u64, u64)>),
    /// The answer to [`ChatQuery::Devices`].
    Devices(Vec<chatd_chat::e2e::DeviceInfo>),
}

fn rejected(code: &str, message: impl Into<String>) -> ChatQueryReply {
    ChatQueryReply::Rejected {
        code: code.into(),
        message: message.into(),
    }
}

/// Most index entries one `UserChats` query reads: a sync page and one more, which tells
/// whether another page follows.
pub const USER_CHATS_QUERY_MAX: usize = chatd_proto::SYNC_PAGE_CHATS_MAX as usize + 1;

/// [`run`] on a blocking-pool thread, so RocksDB reads never stall the async runtime.
pub async fn run_blocking(store: &Storage, group: GroupId, query: ChatQuery) -> ChatQueryReply {
    let store = store.clone();
    match tokio::task::spawn_blocking(move || run(&store, group, query)).await {
        Ok(r) => r,
        Err(e) => rejected(
            chatd_proto::code::INTERNAL,
            format!("query task failed: {e}"),
        ),
    }
}

/// Runs `query` against this node's committed state of `group`. Blocks on RocksDB: call
/// it from a blocking thread ([`run_blocking`]).
pub fn run(store: &Storage, group: GroupId, query: ChatQuery) -> ChatQueryReply {
    match run_inner(store, group, query) {
        Ok(r) => r,
        Err(e) => rejected(chatd_proto::code::INTERNAL, e.to_string()),
    }
}

fn run_inner(
    store: &Storage,
    group: GroupId,
    query: ChatQuery,
) -> Result<ChatQueryReply, chatd_storage::StorageError> {
    Ok(match query {
        ChatQuery::History {
            chat,
            user,
            before,
            after,
            limit,
        } => {
            let Some(record) = chatd_chat::chat_record(store, group, &chat)? else {
                return Ok(rejected(
                    chatd_proto::code::UNKNOWN_CHAT,
                    format!("no chat {chat}"),
                ));
            };
            let Some(span) = record.span_of(&user) else {
                return Ok(rejected(
                    chatd_proto::code::NOT_MEMBER,
                    format!("{user} is not in {chat}"),
                ));
            };
            let limit = limit.clamp(1, chatd_proto::HISTORY_PAGE_MAX) as usize;
            let HistoryPage { messages, more } = chatd_chat::history(
                store,
                group,
                &chat,
                span,
                record.last_seq,
                chatd_chat::PageRequest {
                    before,
                    after,
                    limit,
                },
            )?;
            ChatQueryReply::History { messages, more }
        }
        ChatQuery::Summaries { chats, user } => {
            let mut out = Vec::new();
            for chat in chats
                .into_iter()
                .take(chatd_proto::SYNC_PAGE_CHATS_MAX as usize)
            {
                let Some(record) = chatd_chat::chat_record(store, group, &chat)? else {
                    continue;
                };
                let Some(span) = record.span_of(&user) else {
                    continue;
                };
                let cursor = chatd_chat::cursor(store, group, &chat, &user)?;
                let visible_last = span.to.unwrap_or(record.last_seq).min(record.last_seq);
                let unread = chatd_chat::unread(
                    store,
                    group,
                    &chat,
                    &user,
                    span,
                    record.last_seq,
                    cursor.read,
                )?;
                out.push(chatd_proto::ChatState {
                    kind: record.kind.as_str().into(),
                    name: record.name.clone(),
                    members: record.current_members(),
                    last_seq: visible_last,
                    delivered: cursor.delivered,
                    read: cursor.read,
                    unread,
                    chat,
                });
            }
            ChatQueryReply::Summaries(out)
        }
        ChatQuery::UserChats { user, after, limit } => {
            ChatQueryReply::UserChats(chatd_chat::user_chats(
                store,
                group,
                &user,
                after.as_deref(),
                (limit as usize).min(USER_CHATS_QUERY_MAX),
            )?)
        }
        ChatQuery::Members { chat } => ChatQueryReply::Members(
            chatd_chat::chat_record(store, group, &chat)?.map(|r| r.current_members()),
        ),
        ChatQuery::File { file } => {
            ChatQueryReply::File(chatd_chat::files::read(store, group, &file)?)
        }
        ChatQuery::FileAccess { chat, file, user } => ChatQueryReply::Allowed(
            chatd_chat::file_readable(store, group, &chat, &file, &user)?,
        ),
        ChatQuery::Cursors { chat, user } => {
            let Some(record) = chatd_chat::chat_record(store, group, &chat)? else {
                return Ok(rejected(
                    chatd_proto::code::UNKNOWN_CHAT,
                    format!("no chat {chat}"),
                ));
            };
            if !record.is_member(&user) {
                return Ok(rejected(
                    chatd_proto::code::NOT_MEMBER,
                    format!("{user} is not a member of {chat}"),
                ));
            }
            let all = chatd_chat::cursors(store, group, &chat)?;
            ChatQueryReply::Cursors(
                record
                    .current_members()
                    .into_iter()
                    .map(|u| {
                        let c = all.get(&u).copied().unwrap_or_default();
                        (u, c.delivered, c.read)
                    })
                    .collect(),
            )
        }
        ChatQuery::FileEntry { file } => match chatd_chat::files::read(store, group, &file)? {
            None => ChatQueryReply::FileEntry(None),
            Some(r) => {
                let state = chatd_chat::files::read_state(store, group, &file)?;
                ChatQueryReply::FileEntry(Some((r, state)))
            }
        },
        ChatQuery::ContentOf { sha256, file } => {
            ChatQueryReply::ContentOf(chatd_chat::content::read_of(store, group, &sha256, &file)?)
        }
        ChatQuery::Quota { user } => {
            ChatQueryReply::Quota(chatd_chat::quota::usage(store, group, &user)?)
        }
        ChatQuery::FileCarried { chat, file } => {
            ChatQueryReply::Allowed(chatd_chat::file_carried(store, group, &chat, &file)?)
        }
        ChatQuery::Devices {
            user,
            bounds,
            now_ms,
        } => ChatQueryReply::Devices(chatd_chat::e2e::device_infos(
            store, group, &user, bounds, now_ms,
        )?),
        ChatQuery::Inspect { chat } => match chatd_chat::chat_record(store, group, &chat)? {
            None => ChatQueryReply::Inspection(None),
            Some(r) => {
                let cursors = chatd_chat::cursors(store, group, &chat)?
                    .into_iter()
                    .map(|(u, c)| (u, c.delivered, c.read))
                    .collect();
                ChatQueryReply::Inspection(Some(ChatInspection {
                    kind: r.kind.as_str().into(),
                    name: r.name,
                    creator: r.creator,
                    created_ts: r.created_ts,
                    last_seq: r.last_seq,
                    members: r
                        .members
                        .iter()
                        .map(|(u, s)| (u.clone(), s.from, s.to))
                        .collect(),
                    cursors,
                    chat,
                }))
            }
        },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use chatd_chat::{ChatApplier, ChatCommand};
    use chatd_raftlog::{Applier, ApplyTxn};
    use chatd_storage::{NodeIdentity, StorageOptions};

    const G: GroupId = 2;

    /// A partition where `user` is in `n` direct chats, all indexed for it.
    fn partition_with_chats(user: &str, n: usize) -> (tempfile::TempDir, Storage, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Storage::open(
            dir.path(),
            &NodeIdentity {
                cluster_id: "t".into(),
                node_id: 1,
            },
            &StorageOptions::default(),
        )
        .unwrap();
        let applier = ChatApplier::new(|_, _| {});
        let mut chats = Vec::new();
        let mut txn = ApplyTxn::standalone(G, &store);
        for i in 0..n {
            let other = format!("u{i:04}");
            let chat = crate::gateway::direct_chat_id(user, &other);
            for cmd in [
                ChatCommand::OpenDirect {
                    chat: chat.clone(),
                    a: user.into(),
                    b: other,
                    ts: 1,
                },
                ChatCommand::IndexChat {
                    user: user.into(),
                    chat: chat.clone(),
                },
            ] {
                let bytes = chatd_codec::encode(&cmd).unwrap();
                applier.apply(G, i as u64 + 1, &bytes, &mut txn).unwrap();
            }
            chats.push(chat);
        }
        txn.commit().unwrap();
        chats.sort();
        (dir, store, chats)
    }

    #[test]
    fn sync_queries_read_at_most_a_page() {
        let page = chatd_proto::SYNC_PAGE_CHATS_MAX as usize;
        let (_dir, store, chats) = partition_with_chats("alice", page + 2);
        // The index query stops at a page and one more, whatever limit it is given.
        let ChatQueryReply::UserChats(listed) = run(
            &store,
            G,
            ChatQuery::UserChats {
                user: "alice".into(),
                after: None,
                limit: u32::MAX,
            },
        ) else {
            panic!("not a chat list")
        };
        assert_eq!(listed.len(), USER_CHATS_QUERY_MAX);
        assert_eq!(listed, chats[..USER_CHATS_QUERY_MAX]);
        let ChatQueryReply::UserChats(rest) = run(
            &store,
            G,
            ChatQuery::UserChats {
                user: "alice".into(),
                after: Some(chats[page - 1].clone()),
                limit: USER_CHATS_QUERY_MAX as u32,
            },
        ) else {
            panic!("not a chat list")
        };
        assert_eq!(rest, chats[page..], "exclusive cursor");
        // The states of at most a page of chats are read.
        let ChatQueryReply::Summaries(states) = run(
            &store,
            G,
            ChatQuery::Summaries {
                chats: chats.clone(),
                user: "alice".into(),
            },
        ) else {
            panic!("not summaries")
        };
        assert_eq!(states.len(), page);
        assert_eq!(
            states.iter().map(|s| s.chat.clone()).collect::<Vec<_>>(),
            chats[..page]
        );
    }

    #[tokio::test]
    async fn run_blocking_answers_as_run_does() {
        let (_dir, store, chats) = partition_with_chats("alice", 1);
        let reply = run_blocking(
            &store,
            G,
            ChatQuery::Members {
                chat: chats[0].clone(),
            },
        )
        .await;
        let ChatQueryReply::Members(Some(members)) = reply else {
            panic!("{reply:?}")
        };
        assert_eq!(members, vec!["alice".to_string(), "u0000".to_string()]);
    }
}
