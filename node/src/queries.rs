//! Reads of chat state, run on a partition's leader (so they see every acknowledged write).

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
    /// The state of `chats` for `user` (sync).
    Summaries { chats: Vec<String>, user: String },
    /// The chats indexed for `user` on its own partition.
    UserChats { user: String },
    /// Current members of `chat`, if it exists.
    Members { chat: String },
    /// Everything about `chat` (admin).
    Inspect { chat: String },
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
}

fn rejected(code: &str, message: impl Into<String>) -> ChatQueryReply {
    ChatQueryReply::Rejected {
        code: code.into(),
        message: message.into(),
    }
}

/// Runs `query` against this node's committed state of `group`.
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
            for chat in chats {
                let Some(record) = chatd_chat::chat_record(store, group, &chat)? else {
                    continue;
                };
                let Some(span) = record.span_of(&user) else {
                    continue;
                };
                let cursor = chatd_chat::cursors(store, group, &chat)?
                    .remove(&user)
                    .unwrap_or_default();
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
                    kind: match record.kind {
                        chatd_chat::ChatKind::Direct => "direct".into(),
                        chatd_chat::ChatKind::Group => "group".into(),
                    },
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
        ChatQuery::UserChats { user } => {
            ChatQueryReply::UserChats(chatd_chat::user_chats(store, group, &user)?)
        }
        ChatQuery::Members { chat } => ChatQueryReply::Members(
            chatd_chat::chat_record(store, group, &chat)?.map(|r| r.current_members()),
        ),
        ChatQuery::Inspect { chat } => match chatd_chat::chat_record(store, group, &chat)? {
            None => ChatQueryReply::Inspection(None),
            Some(r) => {
                let cursors = chatd_chat::cursors(store, group, &chat)?
                    .into_iter()
                    .map(|(u, c)| (u, c.delivered, c.read))
                    .collect();
                ChatQueryReply::Inspection(Some(ChatInspection {
                    kind: match r.kind {
                        chatd_chat::ChatKind::Direct => "direct".into(),
                        chatd_chat::ChatKind::Group => "group".into(),
                    },
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
