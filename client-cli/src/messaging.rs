//! Messaging commands with a user token, over the WebSocket API: `send`, `open-direct`,
//! `create-group`, `history`, `tail`, `sync`, `presence`.

use std::io::Write;
use std::time::Duration;

use chatd_proto::{ChatState, ClientFrame, MessageView, PresenceView, ServerFrame};
use clap::Args;

use crate::client::CliError;
use crate::format::{clean, describe, format_time, Follower};
use crate::render::{pretty_json, Align, Table};
use crate::ws::{self, Connection, Incoming, PING_INTERVAL};
use crate::Cli;

/// Most entries the server returns in one history page.
const PAGE: u32 = chatd_proto::HISTORY_PAGE_MAX;
/// Attempts of one `send` (the same `client_msg_id` each time).
const SEND_ATTEMPTS: u32 = 3;

/// `send` arguments.
#[derive(Clone, Debug, Args)]
pub struct SendArgs {
    /// The chat, e.g. `d:alice:bob` or `g:9f86d081884c7d65`.
    pub chat: String,
    /// The message text; `-` reads it from standard input.
    pub text: String,
    /// The seq of the message this one replies to.
    #[arg(long, value_name = "SEQ")]
    pub reply_to: Option<u64>,
    /// The idempotency key (default: a fresh one). Sending again with the same key never
    /// makes a second message: the original ack comes back with `duplicate: true`.
    #[arg(long, value_name = "ID")]
    pub client_msg_id: Option<String>,
}

/// `send-file` arguments.
#[derive(Clone, Debug, Args)]
pub struct SendFileArgs {
    /// The chat.
    pub chat: String,
    /// The file to upload and attach.
    pub path: std::path::PathBuf,
    /// A text to send with it.
    #[arg(long, default_value = "")]
    pub text: String,
    /// Its media type [default: from the file name's extension].
    #[arg(long)]
    pub mime: Option<String>,
    /// Continue an upload of this file that stopped (the id the interruption named).
    #[arg(long, value_name = "FILE_ID")]
    pub resume: Option<String>,
}

/// `history` arguments.
#[derive(Clone, Debug, Args)]
pub struct HistoryArgs {
    /// The chat.
    pub chat: String,
    /// Only entries with a seq below this one (the newest of them).
    #[arg(long, value_name = "SEQ", conflicts_with = "after")]
    pub before: Option<u64>,
    /// Only entries with a seq above this one (the oldest of them).
    #[arg(long, value_name = "SEQ")]
    pub after: Option<u64>,
    /// How many entries at most [default: 100].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
    /// Every entry in the direction asked (from the start without --before/--after),
    /// page by page.
    #[arg(long, conflicts_with = "limit")]
    pub all: bool,
}

/// `tail` arguments.
#[derive(Clone, Debug, Args)]
pub struct TailArgs {
    /// The chat to follow.
    pub chat: String,
    /// First print the entries after this seq (0: the whole history), then follow.
    #[arg(long, value_name = "SEQ")]
    pub from_seq: Option<u64>,
}

fn timeout(cli: &Cli) -> Duration {
    Duration::from_millis(cli.timeout_ms)
}

/// Connects with the user token of `cli`.
pub async fn connect(cli: &Cli) -> Result<Connection, CliError> {
    Connection::connect(&cli.server, cli.token.as_deref(), timeout(cli)).await
}

/// Prefixes a refusal with what was being done.
pub fn context(e: CliError, what: &str) -> CliError {
    match e {
        CliError::Failed(m) => CliError::Failed(format!("{what}: {m}")),
        other => other,
    }
}

fn json_line(v: &impl serde::Serialize) -> Result<String, CliError> {
    serde_json::to_string(v).map_err(|e| CliError::Failed(format!("cannot encode JSON: {e}")))
}

fn pretty(v: &impl serde::Serialize) -> Result<String, CliError> {
    let mut s = serde_json::to_string_pretty(v)
        .map_err(|e| CliError::Failed(format!("cannot encode JSON: {e}")))?;
    s.push('\n');
    Ok(s)
}

fn malformed(conn: &Connection, what: &str, f: &Incoming) -> CliError {
    CliError::Malformed {
        url: conn.url().to_string(),
        cause: format!("expected {what}, got {}", crate::client::snippet(&f.raw)),
    }
}

fn retryable(code: &str) -> bool {
    use chatd_proto::code;
    matches!(
        code,
        code::RATE_LIMITED | code::UNAVAILABLE | code::OUTCOME_UNKNOWN
    )
}

/// `send`: sends one message and waits for its ack. Retries after `rate_limited`,
/// `unavailable`, `outcome_unknown`, a lost connection or a timeout, with the same
/// `client_msg_id`, so the message is committed at most once.
pub async fn send(cli: &Cli, args: &SendArgs) -> Result<String, CliError> {
    let text = if args.text == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| CliError::Failed(format!("cannot read the text from stdin: {e}")))?;
        s.strip_suffix('\n').map(str::to_string).unwrap_or(s)
    } else {
        args.text.clone()
    };
    let client_msg_id = args
        .client_msg_id
        .clone()
        .unwrap_or_else(ws::new_client_msg_id);
    send_message(
        cli,
        &args.chat,
        text,
        args.reply_to,
        client_msg_id,
        Vec::new(),
    )
    .await
}

/// `send-file CHAT PATH [--text T]`: uploads the file (resumable, with progress), then
/// sends a message carrying it.
pub async fn send_file(cli: &Cli, args: &SendFileArgs) -> Result<String, CliError> {
    let up = crate::files::upload_file(
        cli,
        &args.path,
        args.mime.as_deref(),
        args.resume.as_deref(),
    )
    .await?;
    let file = chatd_proto::FileRef {
        file_id: up.file_id.clone(),
        name: None,
        mime: None,
        size: Some(up.size),
    };
    let sent = send_message(
        cli,
        &args.chat,
        args.text.clone(),
        None,
        ws::new_client_msg_id(),
        vec![file],
    )
    .await?;
    if cli.json {
        return Ok(sent);
    }
    Ok(format!(
        "{}  {}  {}\n{sent}",
        up.file_id,
        crate::format::human_bytes(up.size),
        up.mime
    ))
}

/// Sends one message and waits for its ack, retrying as [`send`] says.
async fn send_message(
    cli: &Cli,
    chat: &str,
    text: String,
    reply_to: Option<u64>,
    client_msg_id: String,
    files: Vec<chatd_proto::FileRef>,
) -> Result<String, CliError> {
    let what = format!("cannot send to {chat}");
    let mut conn = Some(connect(cli).await?);
    let mut last_error = None;
    for attempt in 1..=SEND_ATTEMPTS {
        if attempt > 1 {
            tokio::time::sleep(Duration::from_millis(250 << (attempt - 2))).await;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match connect(cli).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    last_error = Some(e);
                    continue;
                }
            },
        };
        let answer = c
            .request_raw(|id| ClientFrame::Send {
                id,
                chat: chat.to_string(),
                client_msg_id: client_msg_id.clone(),
                text: text.clone(),
                reply_to,
                files: files.clone(),
            })
            .await;
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                // Lost connection or no answer: resend on a new connection.
                conn = None;
                last_error = Some(e);
                continue;
            }
        };
        if let Some((code, message)) = answer.error() {
            let e = context(ws::refused(code, message), &what);
            if retryable(code) {
                last_error = Some(e);
                continue;
            }
            return Err(e);
        }
        let Some(ServerFrame::Ack {
            seq,
            msg_id,
            duplicate,
            ..
        }) = &answer.frame
        else {
            return Err(malformed(c, "an ack", &answer));
        };
        let out = if cli.json {
            let mut s = pretty_json(&answer.raw);
            s.push('\n');
            s
        } else if *duplicate {
            format!("seq {seq}  msg_id {msg_id}  (already sent: nothing new was written)\n")
        } else {
            format!("seq {seq}  msg_id {msg_id}\n")
        };
        if let Some(c) = conn.take() {
            c.close().await;
        }
        return Ok(out);
    }
    Err(last_error.unwrap_or(CliError::Failed(what)))
}

/// Sends one request that is answered with `done`; returns (chat, seq, raw answer).
async fn done_request(
    cli: &Cli,
    what: &str,
    make: impl FnOnce(String) -> ClientFrame,
) -> Result<(String, u64, Incoming), CliError> {
    let mut conn = connect(cli).await?;
    let answer = conn.request(make).await.map_err(|e| context(e, what))?;
    let Some(ServerFrame::Done { chat, seq, .. }) = &answer.frame else {
        return Err(malformed(&conn, "`done`", &answer));
    };
    let (chat, seq) = (chat.clone(), *seq);
    conn.close().await;
    Ok((chat, seq, answer))
}

/// `open-direct`: the direct chat with a user (created on first use).
pub async fn open_direct(cli: &Cli, user: &str) -> Result<String, CliError> {
    let (chat, _, answer) = done_request(
        cli,
        &format!("cannot open a direct chat with {user}"),
        |id| ClientFrame::OpenDirect {
            id,
            user: user.to_string(),
        },
    )
    .await?;
    if cli.json {
        pretty(&answer.without_id())
    } else {
        Ok(format!("{chat}\n"))
    }
}

/// `create-group`: a new group with the caller and `members`.
pub async fn create_group(cli: &Cli, name: &str, members: &[String]) -> Result<String, CliError> {
    let (chat, _, answer) = done_request(cli, &format!("cannot create the group {name:?}"), |id| {
        ClientFrame::CreateGroup {
            id,
            name: name.to_string(),
            members: members.to_vec(),
        }
    })
    .await?;
    if cli.json {
        pretty(&answer.without_id())
    } else {
        Ok(format!("{chat}\n"))
    }
}

/// One page of history.
async fn history_page(
    conn: &mut Connection,
    chat: &str,
    before: Option<u64>,
    after: Option<u64>,
    limit: u32,
) -> Result<(Vec<MessageView>, bool), CliError> {
    let answer = conn
        .request(|id| ClientFrame::History {
            id,
            chat: chat.to_string(),
            before,
            after,
            limit: Some(limit),
        })
        .await
        .map_err(|e| context(e, &format!("cannot read the history of {chat}")))?;
    match answer.frame {
        Some(ServerFrame::History { messages, more, .. }) => Ok((messages, more)),
        _ => Err(malformed(conn, "a history page", &answer)),
    }
}

/// Reads history: backwards (newest first) with `before` or neither, forwards with
/// `after`; at most `want` entries (`None`: all of them). Returns the entries in
/// ascending seq order and whether more exist in the paging direction.
pub async fn read_history(
    conn: &mut Connection,
    chat: &str,
    before: Option<u64>,
    after: Option<u64>,
    want: Option<u64>,
) -> Result<(Vec<MessageView>, bool), CliError> {
    let page_limit = |have: usize| -> u32 {
        let left = want.map_or(u64::from(PAGE), |w| w.saturating_sub(have as u64));
        u32::try_from(left.min(u64::from(PAGE))).unwrap_or(PAGE)
    };
    let mut out: Vec<MessageView> = Vec::new();
    if let Some(mut after) = after {
        loop {
            let (page, more) =
                history_page(conn, chat, None, Some(after), page_limit(out.len())).await?;
            if let Some(last) = page.last() {
                after = last.seq;
            }
            let empty = page.is_empty();
            out.extend(page);
            let full = want.is_some_and(|w| out.len() as u64 >= w);
            if !more || empty || full {
                return Ok((out, more));
            }
        }
    }
    let mut before = before;
    let mut pages: Vec<Vec<MessageView>> = Vec::new();
    let mut have = 0usize;
    loop {
        let (page, more) = history_page(conn, chat, before, None, page_limit(have)).await?;
        if let Some(first) = page.first() {
            before = Some(first.seq);
        }
        let empty = page.is_empty();
        have += page.len();
        pages.push(page);
        let full = want.is_some_and(|w| have as u64 >= w);
        if !more || empty || full {
            out.extend(pages.into_iter().rev().flatten());
            return Ok((out, more));
        }
    }
}

/// `history`: a table of entries (SEQ, TIME, SENDER, TEXT) or, with `--json`,
/// `{"chat","messages","more"}`.
pub async fn history(cli: &Cli, args: &HistoryArgs, color: bool) -> Result<String, CliError> {
    let mut conn = connect(cli).await?;
    let (after, want) = if args.all {
        // Everything: from the start unless a direction was given.
        (args.after.or(args.before.is_none().then_some(0)), None)
    } else {
        (args.after, Some(args.limit.unwrap_or(u64::from(PAGE))))
    };
    let (messages, more) = read_history(&mut conn, &args.chat, args.before, after, want).await?;
    conn.close().await;
    if cli.json {
        return pretty(&serde_json::json!({
            "chat": args.chat,
            "messages": messages,
            "more": more,
        }));
    }
    if more {
        let hint = match (after, messages.first(), messages.last()) {
            (Some(_), _, Some(last)) => format!("newer entries follow: --after {}", last.seq),
            (None, Some(first), _) => format!("older entries exist: --before {}", first.seq),
            _ => "more entries exist".to_string(),
        };
        eprintln!("chat-cli: {hint} (or --all)");
    }
    if messages.is_empty() {
        return Ok(format!("no entries in {}\n", clean(&args.chat)));
    }
    Ok(history_table(&messages).render(color))
}

/// The history table: SEQ, TIME (UTC), SENDER, TEXT.
pub fn history_table(messages: &[MessageView]) -> Table {
    let mut t = Table::new(&[
        ("SEQ", Align::Right),
        ("TIME (UTC)", Align::Left),
        ("SENDER", Align::Left),
        ("TEXT", Align::Left),
    ]);
    for m in messages {
        t.row(
            false,
            vec![
                m.seq.to_string(),
                format_time(m.ts),
                m.sender.clone(),
                clean(&describe(m)),
            ],
        );
    }
    t
}

/// `sync`: every chat of the user with its last seq, cursors and unread count.
pub async fn sync(cli: &Cli, color: bool) -> Result<String, CliError> {
    let mut conn = connect(cli).await?;
    let chats = sync_chats(&mut conn).await?;
    let me = conn.user().to_string();
    conn.close().await;
    if cli.json {
        return pretty(&chats);
    }
    if chats.is_empty() {
        return Ok(format!("{me} has no chats\n"));
    }
    Ok(sync_table(&chats, &me).render(color))
}

/// Every chat of the user: `sync` pages (the server's default size), each from the
/// previous page's `next`, until a page has none.
pub async fn sync_chats(conn: &mut Connection) -> Result<Vec<ChatState>, CliError> {
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let answer = conn
            .request(|id| ClientFrame::Sync {
                id,
                after: after.clone(),
                limit: None,
            })
            .await
            .map_err(|e| context(e, "cannot sync"))?;
        match answer.frame {
            Some(ServerFrame::Chats { chats, next, .. }) => {
                all.extend(chats);
                // A server that does not move forward would loop forever: stop there.
                match next {
                    Some(n) if after.as_ref().is_none_or(|a| *a < n) => after = Some(n),
                    _ => return Ok(all),
                }
            }
            _ => return Err(malformed(conn, "a chat list", &answer)),
        }
    }
}

/// A chat's name for people: the group name, or `with <other user>` for a direct chat.
pub fn chat_title(c: &ChatState, me: &str) -> String {
    if c.kind.starts_with("e2e") {
        // End-to-end encrypted: marked, named by its members when it has no name.
        let others: Vec<&str> = c
            .members
            .iter()
            .map(String::as_str)
            .filter(|m| *m != me)
            .collect();
        let name = if c.name.is_empty() {
            format!("with {}", others.join(", "))
        } else {
            c.name.clone()
        };
        return format!("🔒 {name}");
    }
    if c.kind == "direct" {
        let other = c
            .chat
            .strip_prefix("d:")
            .and_then(|rest| rest.split_once(':'))
            .map(|(a, b)| if a == me { b } else { a })
            .unwrap_or("?");
        format!("with {other}")
    } else {
        c.name.clone()
    }
}

/// The sync table: CHAT, KIND, NAME, MEMBERS, LAST, DELIVERED, READ, UNREAD; chats with
/// unread messages are flagged, chats the user left say so.
pub fn sync_table(chats: &[ChatState], me: &str) -> Table {
    let mut t = Table::new(&[
        ("CHAT", Align::Left),
        ("KIND", Align::Left),
        ("NAME", Align::Left),
        ("MEMBERS", Align::Right),
        ("LAST", Align::Right),
        ("DELIVERED", Align::Right),
        ("READ", Align::Right),
        ("UNREAD", Align::Right),
    ]);
    for c in chats {
        let mut name = chat_title(c, me);
        if !c.members.iter().any(|m| m == me) {
            name.push_str(" (left)");
        }
        t.row(
            c.unread > 0,
            vec![
                c.chat.clone(),
                c.kind.clone(),
                name,
                c.members.len().to_string(),
                c.last_seq.to_string(),
                c.delivered.to_string(),
                c.read.to_string(),
                c.unread.to_string(),
            ],
        );
    }
    t
}

/// The `presence` request.
pub async fn presence_of(
    conn: &mut Connection,
    users: &[String],
) -> Result<Vec<PresenceView>, CliError> {
    let answer = conn
        .request(|id| ClientFrame::Presence {
            id,
            users: users.to_vec(),
        })
        .await
        .map_err(|e| context(e, "cannot ask for presence"))?;
    match answer.frame {
        Some(ServerFrame::PresenceList { users, .. }) => Ok(users),
        _ => Err(malformed(conn, "a presence list", &answer)),
    }
}

/// `presence`: who is online among `users`.
pub async fn presence(cli: &Cli, users: &[String], color: bool) -> Result<String, CliError> {
    let mut conn = connect(cli).await?;
    let list = presence_of(&mut conn, users).await?;
    conn.close().await;
    if cli.json {
        return pretty(&list);
    }
    let mut t = Table::new(&[
        ("USER", Align::Left),
        ("STATUS", Align::Left),
        ("LAST SEEN (UTC)", Align::Left),
    ]);
    for p in &list {
        t.row(
            false,
            vec![
                p.user.clone(),
                if p.online { "online" } else { "offline" }.to_string(),
                p.last_seen.map_or_else(|| "-".to_string(), format_time),
            ],
        );
    }
    Ok(t.render(color))
}

/// A line of `tail` output for a message.
pub fn tail_line(m: &MessageView) -> String {
    format!(
        "[#{} {}] {}: {}",
        m.seq,
        format_time(m.ts),
        clean(&m.sender),
        clean(&describe(m))
    )
}

/// Where `tail` writes; a closed stdout (`| head`) ends the command quietly.
struct Out {
    json: bool,
}

impl Out {
    /// Writes one line; `false` when stdout is gone.
    fn line(&self, text: &str) -> bool {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{text}").and_then(|()| out.flush()).is_ok()
    }

    fn message(&self, m: &MessageView) -> Result<bool, CliError> {
        if self.json {
            let v = serde_json::json!({"type": "message", "message": m});
            Ok(self.line(&json_line(&v)?))
        } else {
            Ok(self.line(&tail_line(m)))
        }
    }

    fn messages(&self, ms: &[MessageView]) -> Result<bool, CliError> {
        for m in ms {
            if !self.message(m)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Resolves when the process is asked to stop: Ctrl-C (SIGINT) or SIGTERM.
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// How one connection of a long-lived session ended.
pub enum Ended {
    /// The user asked to stop (or stdout went away).
    Stopped,
    /// The connection was lost; reconnect and catch up.
    Lost(CliError),
}

/// Reconnects after a lost connection, with backoff (0.5 s doubling up to 10 s), until
/// it works, the token is refused, or `stop` fires (then `None`).
pub async fn reconnect(
    cli: &Cli,
    why: &CliError,
    stop: &mut std::pin::Pin<Box<impl std::future::Future<Output = ()>>>,
) -> Result<Option<Connection>, CliError> {
    eprintln!("chat-cli: {why}; reconnecting");
    let mut delay = Duration::from_millis(500);
    loop {
        tokio::select! {
            _ = stop.as_mut() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
        match connect(cli).await {
            Ok(c) => {
                eprintln!("chat-cli: reconnected");
                return Ok(Some(c));
            }
            // A refused token (or a bad address) will not get better.
            Err(
                e @ (CliError::Failed(_)
                | CliError::BadServer { .. }
                | CliError::BadToken(_)
                | CliError::NoToken(_)
                | CliError::TokenRefused(_)
                | CliError::Usage(_)),
            ) => return Err(e),
            Err(e) => {
                eprintln!("chat-cli: {e}; retrying in {} s", (delay * 2).as_secs_f32());
            }
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// `tail`: prints the chat's new entries as they arrive (and receipts and typing), until
/// Ctrl-C or SIGTERM. Reconnects and catches up after a lost connection.
pub async fn tail(cli: &Cli, args: &TailArgs) -> Result<String, CliError> {
    let out = Out { json: cli.json };
    let mut conn = connect(cli).await?;
    // Where to start: after --from-seq (printing what follows), else after the last entry.
    let high = match args.from_seq {
        Some(from) => {
            let (messages, _) = read_history(&mut conn, &args.chat, None, Some(from), None).await?;
            if !out.messages(&messages)? {
                return Ok(String::new());
            }
            messages.last().map_or(from, |m| m.seq)
        }
        None => {
            let (messages, _) = read_history(&mut conn, &args.chat, None, None, Some(1)).await?;
            messages.last().map_or(0, |m| m.seq)
        }
    };
    let mut follower = Follower::new(&args.chat, high);
    let mut stop = Box::pin(stop_signal());
    loop {
        match follow(&mut conn, &mut follower, &out, &mut stop).await? {
            Ended::Stopped => {
                conn.close().await;
                return Ok(String::new());
            }
            Ended::Lost(why) => {
                if conn.close_code() == Some(chatd_proto::close::UNAUTHORIZED) {
                    return Err(CliError::TokenRefused(ws::USER_TOKEN_REFUSED.to_string()));
                }
                if conn.close_code() == Some(chatd_proto::close::REVOKED) {
                    return Err(CliError::TokenRefused(ws::USER_TOKEN_REVOKED.to_string()));
                }
                match reconnect(cli, &why, &mut stop).await? {
                    Some(c) => conn = c,
                    None => return Ok(String::new()),
                }
                // Catch up from the last entry printed.
                follower.fetching = true;
                let after = follower.high;
                if let Err(e) = request_catch_up(&mut conn, &follower.chat, after).await {
                    eprintln!("chat-cli: {e}");
                }
            }
        }
    }
}

/// Asks for the entries after `after` (the answer's id starts with `catchup-`).
pub async fn request_catch_up(
    conn: &mut Connection,
    chat: &str,
    after: u64,
) -> Result<(), CliError> {
    let id = format!("catchup-{}", conn.next_id());
    conn.send(&ClientFrame::History {
        id,
        chat: chat.to_string(),
        before: None,
        after: Some(after),
        limit: Some(PAGE),
    })
    .await
}

/// Follows one connection until it is lost or `stop` fires.
async fn follow(
    conn: &mut Connection,
    follower: &mut Follower,
    out: &Out,
    stop: &mut std::pin::Pin<Box<impl std::future::Future<Output = ()>>>,
) -> Result<Ended, CliError> {
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    loop {
        let incoming = tokio::select! {
            _ = stop.as_mut() => return Ok(Ended::Stopped),
            _ = ping.tick() => {
                let id = format!("ping-{}", conn.next_id());
                if let Err(e) = conn.send(&ClientFrame::Ping { id: Some(id) }).await {
                    return Ok(Ended::Lost(e));
                }
                continue;
            }
            r = conn.recv() => match r {
                Ok(f) => f,
                Err(e) => return Ok(Ended::Lost(e)),
            },
        };
        let Some(frame) = &incoming.frame else {
            continue;
        };
        let ok = match frame {
            ServerFrame::Message { message } if message.chat == follower.chat => {
                let (ready, fetch) = follower.push(message.clone());
                if fetch {
                    if let Err(e) = request_catch_up(conn, &follower.chat, follower.high).await {
                        return Ok(Ended::Lost(e));
                    }
                }
                out.messages(&ready)?
            }
            ServerFrame::History {
                id, messages, more, ..
            } if id.starts_with("catchup-") => {
                let (ready, fetch) = follower.page(messages.clone(), *more);
                if fetch {
                    if let Err(e) = request_catch_up(conn, &follower.chat, follower.high).await {
                        return Ok(Ended::Lost(e));
                    }
                }
                out.messages(&ready)?
            }
            ServerFrame::Error {
                id: Some(id),
                code,
                message,
            } if id.starts_with("catchup-") => {
                follower.fetching = false;
                eprintln!(
                    "chat-cli: cannot catch up on {}: {code}: {message}",
                    follower.chat
                );
                true
            }
            ServerFrame::Error {
                id: None,
                code,
                message,
            } => {
                eprintln!("chat-cli: chatd: {code}: {message}");
                true
            }
            // The edit/delete marker that follows in the log says it for people.
            ServerFrame::Updated { message } if message.chat == follower.chat && out.json => {
                out.line(&incoming.raw)
            }
            ServerFrame::Receipt {
                chat,
                user,
                delivered,
                read,
            } if *chat == follower.chat => {
                if out.json {
                    out.line(&incoming.raw)
                } else {
                    out.line(&format!(
                        "  ✓ {}: delivered up to #{delivered}, read up to #{read}",
                        clean(user)
                    ))
                }
            }
            ServerFrame::Typing { chat, user } if *chat == follower.chat => {
                if out.json {
                    out.line(&incoming.raw)
                } else {
                    out.line(&format!("  … {} is typing", clean(user)))
                }
            }
            _ => true,
        };
        if !ok {
            return Ok(Ended::Stopped);
        }
    }
}
