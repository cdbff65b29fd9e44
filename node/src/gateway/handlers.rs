//! Request handlers: what a session's frames ask for, turned into proposals and queries on
//! the partitions' leaders (sends, chats, receipts, history, sync, presence, typing) and the
//! answer frames. The session loop (`serve`) stays in the gateway; it calls [`handle`].

use super::*;

pub(super) fn propose_error(id: Option<String>, e: ProposeError) -> ServerFrame {
    match e {
        ProposeError::Unknown { .. } => err(id, code::OUTCOME_UNKNOWN, e.to_string()),
        ProposeError::Overloaded { .. } => err(id, code::RATE_LIMITED, e.to_string()),
        _ => err(id, code::UNAVAILABLE, e.to_string()),
    }
}

/// Proposes a chat command to `group` and decodes its reply.
pub(super) async fn propose_chat(
    node: &Node,
    group: u64,
    cmd: &ChatCommand,
) -> Result<ChatReply, ProposeError> {
    let bytes = chatd_codec::encode(cmd).map_err(|e| ProposeError::Unknown {
        group,
        cause: e.to_string(),
    })?;
    let p = node.propose(group, bytes).await?;
    chatd_codec::decode(&p.response).map_err(|e| ProposeError::Unknown {
        group,
        cause: e.to_string(),
    })
}

/// The `ack` of a stored send (or the original's, for a retry), with its latency counted.
pub(super) fn acked(
    node: &Node,
    started: Instant,
    id: String,
    chat: String,
    seq: u64,
    ts: u64,
    duplicate: bool,
) -> ServerFrame {
    node.gateway
        .metrics
        .ack_latency
        .record(started.elapsed().as_millis() as u64);
    ServerFrame::Ack {
        id,
        msg_id: format!("{chat}/{seq}"),
        chat,
        seq,
        ts,
        duplicate,
    }
}

/// Records `chat` in each user's chat index (idempotent; retried by the next change).
pub(super) async fn index_chat(node: &Node, chat: &str, users: &[String]) {
    for u in users {
        let cmd = ChatCommand::IndexChat {
            user: u.clone(),
            chat: chat.to_string(),
        };
        if let Err(e) = propose_chat(node, user_group(node, u), &cmd).await {
            tracing::warn!(user = %u, chat, error = %e, "chat index not updated");
        }
    }
}

fn done_or_error(id: String, chat: String, reply: Result<ChatReply, ProposeError>) -> ServerFrame {
    match reply {
        Ok(ChatReply::Done { seq }) => ServerFrame::Done { id, chat, seq },
        Ok(ChatReply::Rejected { code, message }) => err(Some(id), &code, message),
        Ok(other) => err(
            Some(id),
            code::INTERNAL,
            format!("unexpected reply {other:?}"),
        ),
        Err(e) => propose_error(Some(id), e),
    }
}

/// Opens the direct chat of `user` and `other` (idempotent) and indexes it for both.
/// `Err` for a request refused before anything was proposed (`other` unknown or `user`).
async fn open_direct(
    node: &Node,
    user: &str,
    other: &str,
) -> Result<Result<ChatReply, ProposeError>, (String, String)> {
    check_users(node, &[other.to_string()]).await?;
    if other == user {
        return Err((
            code::INVALID_FIELD.into(),
            "a direct chat needs another user".into(),
        ));
    }
    let chat = direct_chat_id(user, other);
    let cmd = ChatCommand::OpenDirect {
        chat: chat.clone(),
        a: user.to_string(),
        b: other.to_string(),
        ts: now_ms(),
    };
    let reply = propose_chat(node, chat_group(node, &chat), &cmd).await;
    if matches!(reply, Ok(ChatReply::Done { .. })) {
        index_chat(node, &chat, &[user.to_string(), other.to_string()]).await;
    }
    Ok(reply)
}

/// The other member named by `chat` if it is the id of a direct chat of `user` with
/// someone else, written as the server writes it (`d:<a>:<b>`, `a` < `b`).
fn direct_peer(chat: &str, user: &str) -> Option<String> {
    let mut parts = chat.strip_prefix("d:")?.split(':');
    let (a, b) = (parts.next()?, parts.next()?);
    if parts.next().is_some() || a >= b || (user != a && user != b) {
        return None;
    }
    Some(if user == a { b } else { a }.to_string())
}

pub(super) async fn check_users(node: &Node, users: &[String]) -> Result<(), (String, String)> {
    for u in users {
        if !valid_id(u, chatd_proto::USER_ID_BYTES_MAX) || !node.user_enabled_caught_up(u).await {
            return Err((code::UNKNOWN_USER.into(), format!("no user {u:?}")));
        }
    }
    Ok(())
}

/// Handles one request; `None` for frames that get no answer.
pub(super) async fn handle(
    node: &Node,
    user: &str,
    frame: ClientFrame,
    receipt_budget: &Arc<Semaphore>,
) -> Option<ServerFrame> {
    let cfg = &node.gateway.config;
    if frame
        .request_id()
        .is_some_and(|id| id.len() > chatd_proto::REQUEST_ID_BYTES_MAX)
    {
        return Some(err(
            None,
            code::INVALID_FIELD,
            "request id longer than 64 bytes",
        ));
    }
    let id_ok = |id: &str| id.len() <= chatd_proto::REQUEST_ID_BYTES_MAX;
    let chat_ok = |c: &str| valid_id(c, chatd_proto::CHAT_ID_BYTES_MAX);
    Some(match frame {
        ClientFrame::Auth { .. } => err(None, code::INVALID_FIELD, "already authenticated"),
        ClientFrame::Ping { id } => ServerFrame::Pong { id },
        ClientFrame::Send {
            id,
            chat,
            client_msg_id,
            text,
            reply_to,
            files,
        } => {
            if !id_ok(&id) || !chat_ok(&chat) {
                return Some(err(Some(id), code::INVALID_FIELD, "bad id or chat"));
            }
            if !valid_id(&client_msg_id, chatd_proto::CLIENT_MSG_ID_BYTES_MAX) {
                return Some(err(
                    Some(id),
                    code::INVALID_FIELD,
                    "client_msg_id must be 1-64 of A-Z a-z 0-9 _ . : -",
                ));
            }
            if text.len() > cfg.text_bytes_max {
                return Some(err(
                    Some(id),
                    code::TOO_LARGE,
                    format!(
                        "text of {} bytes exceeds {}",
                        text.len(),
                        cfg.text_bytes_max
                    ),
                ));
            }
            if !node.gateway.take_send_token(user) {
                return Some(err(
                    Some(id),
                    code::RATE_LIMITED,
                    "send rate limit: slow down",
                ));
            }
            node.gateway
                .metrics
                .messages_in
                .fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            let cmd = if files.is_empty() {
                ChatCommand::Send {
                    chat: chat.clone(),
                    sender: user.to_string(),
                    client_msg_id,
                    text,
                    reply_to,
                    ts: now_ms(),
                    dedup_window_ms: node.gateway.config.dedup_window_ms,
                }
            } else {
                let files = match crate::files::attachments(node, user, &chat, files).await {
                    Ok(f) => f,
                    Err((c, m)) => return Some(err(Some(id), &c, m)),
                };
                ChatCommand::SendWithFiles {
                    chat: chat.clone(),
                    sender: user.to_string(),
                    client_msg_id,
                    text,
                    reply_to,
                    ts: now_ms(),
                    dedup_window_ms: node.gateway.config.dedup_window_ms,
                    files,
                }
            };
            let mut reply = propose_chat(node, chat_group(node, &chat), &cmd).await;
            // A direct chat's id names its two members: the first send to one that does
            // not exist yet opens it (the rules of `open_direct`), then is sent again.
            if let (Ok(ChatReply::Rejected { code: c, .. }), Some(other)) =
                (&reply, direct_peer(&chat, user))
            {
                if c == code::UNKNOWN_CHAT {
                    match open_direct(node, user, &other).await {
                        Ok(Ok(ChatReply::Done { .. })) => {
                            reply = propose_chat(node, chat_group(node, &chat), &cmd).await;
                        }
                        Ok(Ok(ChatReply::Rejected { code, message })) => {
                            return Some(err(Some(id), &code, message));
                        }
                        Ok(Ok(other)) => {
                            return Some(err(
                                Some(id),
                                code::INTERNAL,
                                format!("unexpected reply {other:?}"),
                            ));
                        }
                        Ok(Err(e)) => return Some(propose_error(Some(id), e)),
                        Err((c, m)) => return Some(err(Some(id), &c, m)),
                    }
                }
            }
            match reply {
                Ok(ChatReply::Acked { seq, ts, duplicate }) => {
                    acked(node, started, id, chat, seq, ts, duplicate)
                }
                Ok(ChatReply::Rejected { code, message }) => err(Some(id), &code, message),
                Ok(other) => err(
                    Some(id),
                    code::INTERNAL,
                    format!("unexpected reply {other:?}"),
                ),
                Err(e) => propose_error(Some(id), e),
            }
        }
        ClientFrame::Edit {
            id,
            chat,
            seq,
            text,
        } => {
            if !chat_ok(&chat) {
                return Some(err(Some(id), code::INVALID_FIELD, "bad chat"));
            }
            if text.len() > cfg.text_bytes_max {
                return Some(err(Some(id), code::TOO_LARGE, "text too large"));
            }
            let cmd = ChatCommand::Edit {
                chat: chat.clone(),
                sender: user.to_string(),
                seq,
                text,
                ts: now_ms(),
            };
            done_or_error(
                id,
                chat.clone(),
                propose_chat(node, chat_group(node, &chat), &cmd).await,
            )
        }
        ClientFrame::Delete { id, chat, seq } => {
            if !chat_ok(&chat) {
                return Some(err(Some(id), code::INVALID_FIELD, "bad chat"));
            }
            let cmd = ChatCommand::Delete {
                chat: chat.clone(),
                sender: user.to_string(),
                seq,
                ts: now_ms(),
            };
            done_or_error(
                id,
                chat.clone(),
                propose_chat(node, chat_group(node, &chat), &cmd).await,
            )
        }
        ClientFrame::OpenDirect { id, user: other } => {
            let chat = direct_chat_id(user, &other);
            match open_direct(node, user, &other).await {
                Ok(reply) => done_or_error(id, chat, reply),
                Err((c, m)) => err(Some(id), &c, m),
            }
        }
        ClientFrame::CreateGroup { id, name, members } => {
            if name.len() > 128 {
                return Some(err(
                    Some(id),
                    code::INVALID_FIELD,
                    "name longer than 128 bytes",
                ));
            }
            if members.len() > cfg.group_members_max {
                return Some(err(Some(id), code::GROUP_FULL, "too many members"));
            }
            if let Err((c, m)) = check_users(node, &members).await {
                return Some(err(Some(id), &c, m));
            }
            let chat = format!("g:{:016x}", rand::random::<u64>());
            let cmd = ChatCommand::CreateGroup {
                chat: chat.clone(),
                creator: user.to_string(),
                name,
                members: members.clone(),
                members_max: cfg.group_members_max,
                ts: now_ms(),
            };
            let reply = propose_chat(node, chat_group(node, &chat), &cmd).await;
            if matches!(reply, Ok(ChatReply::Done { .. })) {
                let mut all = members;
                all.push(user.to_string());
                index_chat(node, &chat, &all).await;
            }
            done_or_error(id, chat, reply)
        }
        ClientFrame::AddMembers { id, chat, users } => {
            if !chat_ok(&chat) {
                return Some(err(Some(id), code::INVALID_FIELD, "bad chat"));
            }
            if users.len() > chatd_proto::ADD_MEMBERS_MAX {
                return Some(err(
                    Some(id),
                    code::GROUP_FULL,
                    "too many users in one request",
                ));
            }
            if let Err((c, m)) = check_users(node, &users).await {
                return Some(err(Some(id), &c, m));
            }
            let cmd = ChatCommand::AddMembers {
                chat: chat.clone(),
                by: user.to_string(),
                users: users.clone(),
                members_max: cfg.group_members_max,
                ts: now_ms(),
            };
            let reply = propose_chat(node, chat_group(node, &chat), &cmd).await;
            if matches!(reply, Ok(ChatReply::Done { .. })) {
                index_chat(node, &chat, &users).await;
            }
            done_or_error(id, chat, reply)
        }
        ClientFrame::RemoveMember {
            id,
            chat,
            user: who,
        } => {
            if !chat_ok(&chat) {
                return Some(err(Some(id), code::INVALID_FIELD, "bad chat"));
            }
            let cmd = ChatCommand::RemoveMember {
                chat: chat.clone(),
                by: user.to_string(),
                user: who,
                ts: now_ms(),
            };
            done_or_error(
                id,
                chat.clone(),
                propose_chat(node, chat_group(node, &chat), &cmd).await,
            )
        }
        ClientFrame::Leave { id, chat } => {
            if !chat_ok(&chat) {
                return Some(err(Some(id), code::INVALID_FIELD, "bad chat"));
            }
            let cmd = ChatCommand::RemoveMember {
                chat: chat.clone(),
                by: user.to_string(),
                user: user.to_string(),
                ts: now_ms(),
            };
            done_or_error(
                id,
                chat.clone(),
                propose_chat(node, chat_group(node, &chat), &cmd).await,
            )
        }
        ClientFrame::History {
            id,
            chat,
            before,
            after,
            limit,
        } => {
            if !chat_ok(&chat) {
                return Some(err(Some(id), code::INVALID_FIELD, "bad chat"));
            }
            if before.is_some() && after.is_some() {
                return Some(err(
                    Some(id),
                    code::INVALID_FIELD,
                    "give before or after, not both",
                ));
            }
            let limit = limit.unwrap_or(chatd_proto::HISTORY_PAGE_MAX);
            if limit == 0 || limit > chatd_proto::HISTORY_PAGE_MAX {
                return Some(err(Some(id), code::INVALID_FIELD, "limit must be 1-100"));
            }
            let q = ChatQuery::History {
                chat: chat.clone(),
                user: user.to_string(),
                before,
                after,
                limit,
            };
            match node.query(chat_group(node, &chat), q).await {
                Ok(ChatQueryReply::History { messages, more }) => ServerFrame::History {
                    id,
                    chat,
                    messages: messages.iter().map(view).collect(),
                    more,
                },
                Ok(ChatQueryReply::Rejected { code, message }) => err(Some(id), &code, message),
                Ok(other) => err(Some(id), code::INTERNAL, format!("unexpected {other:?}")),
                Err(e) => err(Some(id), code::UNAVAILABLE, e.to_string()),
            }
        }
        ClientFrame::Cursors { id, chat } => {
            if !chat_ok(&chat) {
                return Some(err(Some(id), code::INVALID_FIELD, "bad chat"));
            }
            let q = ChatQuery::Cursors {
                chat: chat.clone(),
                user: user.to_string(),
            };
            match node.query(chat_group(node, &chat), q).await {
                Ok(ChatQueryReply::Cursors(rows)) => ServerFrame::Cursors {
                    id,
                    chat,
                    cursors: rows
                        .into_iter()
                        .map(|(user, delivered, read)| chatd_proto::CursorView {
                            user,
                            delivered,
                            read,
                        })
                        .collect(),
                },
                Ok(ChatQueryReply::Rejected { code, message }) => err(Some(id), &code, message),
                Ok(other) => err(Some(id), code::INTERNAL, format!("unexpected {other:?}")),
                Err(e) => err(Some(id), code::UNAVAILABLE, e.to_string()),
            }
        }
        ClientFrame::Sync { id, after, limit } => {
            if after.as_deref().is_some_and(|a| !chat_ok(a)) {
                return Some(err(
                    Some(id),
                    code::INVALID_FIELD,
                    "after must be a chat id",
                ));
            }
            let limit = limit.unwrap_or(chatd_proto::SYNC_PAGE_CHATS_MAX);
            if limit == 0 || limit > chatd_proto::SYNC_PAGE_CHATS_MAX {
                return Some(err(
                    Some(id),
                    code::INVALID_FIELD,
                    format!("limit must be 1-{}", chatd_proto::SYNC_PAGE_CHATS_MAX),
                ));
            }
            match sync(node, user, after, limit).await {
                Ok((chats, next)) => ServerFrame::Chats { id, chats, next },
                Err(e) => err(Some(id), code::UNAVAILABLE, e),
            }
        }
        ClientFrame::Receipt {
            chat,
            delivered,
            read,
        } => {
            if !chat_ok(&chat) {
                return Some(err(None, code::INVALID_FIELD, "bad chat"));
            }
            let update = ReceiptUpdate {
                chat,
                user: user.to_string(),
                delivered,
                read,
            };
            return match node.gateway.receipts.offer(receipt_budget, update) {
                Ok(()) => None,
                Err(crate::receipts::Refused::Session) => Some(err(
                    None,
                    code::RATE_LIMITED,
                    format!(
                        "{} receipts of this connection are waiting to be written; retry",
                        crate::receipts::RECEIPTS_PENDING_PER_SESSION_MAX
                    ),
                )),
                Err(crate::receipts::Refused::Node) => Some(err(
                    None,
                    code::RATE_LIMITED,
                    "the node's receipt queue is full; retry",
                )),
            };
        }
        ClientFrame::Presence { id, users } => {
            if users.len() > chatd_proto::PRESENCE_USERS_MAX {
                return Some(err(Some(id), code::INVALID_FIELD, "at most 256 users"));
            }
            ServerFrame::PresenceList {
                id,
                users: node.gateway.presence_of(&users),
            }
        }
        ClientFrame::Subscribe { id, users } => {
            if users.len() > chatd_proto::PRESENCE_USERS_MAX {
                return Some(err(Some(id), code::INVALID_FIELD, "at most 256 users"));
            }
            if !node.gateway.presence.subscribe(user, &users) {
                return Some(err(
                    Some(id),
                    code::INVALID_FIELD,
                    format!(
                        "at most {} subscriptions per user",
                        crate::presence::SUBSCRIPTIONS_PER_USER_MAX
                    ),
                ));
            }
            ServerFrame::PresenceList {
                id,
                users: node.gateway.presence_of(&users),
            }
        }
        f @ (ClientFrame::CreateE2e { .. }
        | ClientFrame::E2eSend { .. }
        | ClientFrame::KeyPackagesUpload { .. }
        | ClientFrame::KeyPackagesClaim { .. }
        | ClientFrame::Devices { .. }
        | ClientFrame::RetireDevice { .. }) => super::e2e::handle(node, user, f).await,
        ClientFrame::Typing { chat } => {
            if !chat_ok(&chat) {
                return Some(err(None, code::INVALID_FIELD, "bad chat"));
            }
            // The rate limit was applied by the session's reader. Members come from the
            // cache while fresh; a miss reads them from the partition's leader once.
            let members = match node.gateway.typing_members.get(&chat) {
                Some(m) => m,
                None => match node
                    .query(
                        chat_group(node, &chat),
                        ChatQuery::Members { chat: chat.clone() },
                    )
                    .await
                {
                    Ok(ChatQueryReply::Members(Some(m))) => {
                        let m = Arc::new(m);
                        node.gateway.typing_members.insert(&chat, m.clone());
                        m
                    }
                    Ok(_) => return Some(err(None, code::UNKNOWN_CHAT, "no such chat")),
                    Err(e) => return Some(err(None, code::UNAVAILABLE, e.to_string())),
                },
            };
            if !members.iter().any(|x| x == user) {
                return Some(err(None, code::NOT_MEMBER, "not a member"));
            }
            let members = members.as_ref().clone();
            let item = Ephemeral::Typing {
                chat,
                user: user.to_string(),
                recipients: members,
            };
            node.gateway.ephemeral_local(std::slice::from_ref(&item));
            node.broadcast_ephemeral(vec![item]);
            return None;
        }
    })
}

/// One page of the caller's chats with their state: at most `limit` entries of the user's
/// index after `after`, then those chats' states from their partitions. Answers the page
/// and the `after` of the next one (`None` on the last page).
async fn sync(
    node: &Node,
    user: &str,
    after: Option<String>,
    limit: u32,
) -> Result<(Vec<chatd_proto::ChatState>, Option<String>), String> {
    let mut chats = match node
        .query(
            user_group(node, user),
            ChatQuery::UserChats {
                user: user.to_string(),
                after,
                // One more than the page tells whether another page follows.
                limit: limit + 1,
            },
        )
        .await
    {
        Ok(ChatQueryReply::UserChats(c)) => c,
        Ok(other) => return Err(format!("unexpected {other:?}")),
        Err(e) => return Err(e.to_string()),
    };
    let next = if chats.len() > limit as usize {
        chats.truncate(limit as usize);
        chats.last().cloned()
    } else {
        None
    };
    let mut by_group: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for c in chats {
        by_group.entry(chat_group(node, &c)).or_default().push(c);
    }
    let queries = by_group.into_iter().map(|(g, chats)| {
        node.query(
            g,
            ChatQuery::Summaries {
                chats,
                user: user.to_string(),
            },
        )
    });
    let mut out = Vec::new();
    for r in futures::future::join_all(queries).await {
        match r {
            Ok(ChatQueryReply::Summaries(list)) => out.extend(list),
            Ok(other) => return Err(format!("unexpected {other:?}")),
            Err(e) => return Err(e.to_string()),
        }
    }
    out.sort_by(|a, b| a.chat.cmp(&b.chat));
    Ok((out, next))
}
