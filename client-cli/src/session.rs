//! `chat-cli chat`: an interactive session. One input line at the bottom (see
//! [`crate::editor`]); incoming messages are printed above it while the user types;
//! the prompt names the chat and who is typing; the user's own messages get a mark when
//! stored (`✓`), and a line when another member has them delivered (`✓✓`) or read.
//!
//! Slash commands: `/chats`, `/open CHAT|N`, `/dm USER`, `/group NAME USER…`,
//! `/history [N]`, `/who`, `/help`, `/quit` (also Ctrl-D or Ctrl-C on an empty line).
//!
//! With a terminal on stdin the terminal is put in raw mode (and restored on every way
//! out); without one (a pipe), lines are read as they come and nothing is redrawn, so
//! the session can be scripted. A script names its chat (the `CHAT` argument, or `/open`,
//! `/dm` or `/group` before its first message): piped text with no chat chosen is
//! refused (exit 2, nothing sent) rather than sent to a guessed chat.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use chatd_proto::{ChatState, ClientFrame, MessageView, ServerFrame};
use clap::Args;
use crossterm::event::{Event, EventStream};
use futures::StreamExt;
use tokio::io::AsyncBufReadExt;

use crate::client::CliError;
use crate::editor::{Edit, Editor};
use crate::format::{clean, describe, format_clock, Follower};
use crate::messaging::{self, chat_title, read_history, sync_chats, Ended};
use crate::ws::{self, Connection, PING_INTERVAL};
use crate::Cli;

/// Most messages one `/history` prints.
pub const HISTORY_PAGE_MESSAGES_MAX: u64 = 500;
/// Messages typed but not yet acknowledged; Enter beyond it is refused with a message.
/// They are sent one at a time, each after the previous one's ack, so a person's
/// messages keep the order they were typed in (the server runs a session's requests
/// concurrently).
pub const PENDING_SENDS_MAX: usize = 256;
/// The refusal of piped text when no chat was chosen.
pub const NO_CHAT_CHOSEN: &str = "no chat chosen for piped input: name it (chat-cli chat CHAT) \
     or choose it first (/open CHAT, /dm USER, /group NAME USER…); nothing was sent";
/// How long a "… is typing" stays in the prompt without a new typing event.
const TYPING_SHOWN_FOR: Duration = Duration::from_secs(6);
/// Least time between two typing events this client sends for one chat.
const TYPING_SEND_EVERY: Duration = Duration::from_secs(3);
/// Users named in the prompt as typing.
const TYPING_NAMES_MAX: usize = 3;

/// `chat` arguments.
#[derive(Clone, Debug, Args)]
pub struct ChatArgs {
    /// The chat to open first (default on a terminal: the one with the newest message;
    /// with piped input none, so the script must choose one).
    pub chat: Option<String>,
    /// Messages of history shown when a chat is opened.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=500))]
    pub last: u64,
}

/// Puts the terminal in raw mode for as long as it lives.
struct RawMode;

impl RawMode {
    fn enable() -> Result<RawMode, CliError> {
        crossterm::terminal::enable_raw_mode()
            .map_err(|e| CliError::Failed(format!("cannot put the terminal in raw mode: {e}")))?;
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
        let mut out = std::io::stdout();
        let _ = out.write_all(b"\r\x1b[2K");
        let _ = out.flush();
    }
}

/// The screen: lines printed above the input line, and the input line itself.
struct Screen {
    raw: bool,
    editor: Editor,
    prompt: String,
}

impl Screen {
    fn columns() -> usize {
        crossterm::terminal::size()
            .ok()
            .filter(|(c, _)| *c > 0)
            .map_or(80, |(c, _)| usize::from(c))
    }

    /// Prints lines above the input line and redraws it.
    fn print(&mut self, lines: &[String]) {
        let mut out = std::io::stdout().lock();
        if self.raw {
            let mut s = String::from("\r\x1b[2K");
            for l in lines {
                s.push_str(l);
                s.push_str("\r\n");
            }
            s.push_str(&self.editor.render(&self.prompt, Self::columns()));
            let _ = out.write_all(s.as_bytes());
        } else {
            for l in lines {
                let _ = writeln!(out, "{l}");
            }
        }
        let _ = out.flush();
    }

    fn line(&mut self, line: impl Into<String>) {
        self.print(&[line.into()]);
    }

    fn redraw(&mut self) {
        self.print(&[]);
    }
}

/// A message to send; resent with the same `client_msg_id` after a reconnect.
struct Pending {
    chat: String,
    client_msg_id: String,
    text: String,
    /// Files attached (uploaded before the message is queued).
    files: Vec<chatd_proto::FileRef>,
    /// In an E2E chat: the epoch and base64 MLS message `text` was encrypted to (sent as
    /// `e2e_send`; `text` never leaves this process).
    sealed: Option<(u64, String)>,
}

/// The chat being shown.
struct Current {
    chat: String,
    title: String,
    members: Vec<String>,
    follower: Follower,
    /// The lowest seq printed (for `/history`).
    oldest: u64,
    /// Highest seq of my own messages here.
    my_last: u64,
    /// Highest seq acknowledged to this session's sends here: before leaving, the session
    /// waits until it has shown the messages up to it (each with its `✓`).
    acked: u64,
    /// Per other member: (delivered, read) as last pushed.
    receipts: HashMap<String, (u64, u64)>,
    typing: BTreeMap<String, Instant>,
    typing_sent: Option<Instant>,
}

struct Session {
    me: String,
    chats: Vec<ChatState>,
    current: Option<Current>,
    /// Typed, not yet sent.
    outbox: VecDeque<Pending>,
    /// Sent (request id), awaiting its ack.
    in_flight: Option<(String, Pending)>,
    screen: Screen,
    last: u64,
    /// The command line's options, for uploads (`/file`).
    cli: Cli,
    /// This user's E2E device, if one is set up: E2E chats are decrypted and sent
    /// encrypted with it.
    e2e: Option<chatd_e2e::Device>,
}

enum Step {
    Go,
    Quit,
}

fn help() -> Vec<String> {
    [
        "commands:",
        "  /chats             list your chats (with unread counts)",
        "  /open CHAT|N       switch to a chat (by id, or its number in /chats)",
        "  /dm USER           open the direct chat with USER",
        "  /group NAME USER…  create a group and switch to it",
        "  /history [N]       show N older messages (default 20)",
        "  /who               who of this chat's members is online",
        "  /file PATH         upload a file and send it to this chat",
        "  /quit              leave (also Ctrl-D, or Ctrl-C on an empty line)",
        "anything else is sent to the current chat",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Session {
    fn prompt(&self) -> String {
        match &self.current {
            None => "[no chat] > ".to_string(),
            Some(c) => {
                let now = Instant::now();
                let typing: Vec<&str> = c
                    .typing
                    .iter()
                    .filter(|(_, t)| now.duration_since(**t) < TYPING_SHOWN_FOR)
                    .map(|(u, _)| u.as_str())
                    .take(TYPING_NAMES_MAX)
                    .collect();
                if typing.is_empty() {
                    format!("[{}] > ", clean(&c.title))
                } else {
                    format!(
                        "[{}] ({} typing…) > ",
                        clean(&c.title),
                        clean(&typing.join(", "))
                    )
                }
            }
        }
    }

    fn refresh_prompt(&mut self) {
        let p = self.prompt();
        if p != self.screen.prompt {
            self.screen.prompt = p;
            self.screen.redraw();
        }
    }

    fn message_line(&self, m: &MessageView) -> String {
        let mine = m.sender == self.me;
        let sent = m.kind == "text" || m.kind == "mls_application";
        let mark = if mine && sent { " ✓" } else { "" };
        format!(
            "{} #{} {}: {}{mark}",
            format_clock(m.ts),
            m.seq,
            clean(&m.sender),
            clean(&self.describe(m))
        )
    }

    /// What an entry says: an E2E message decrypted by this device when it could.
    fn describe(&self, m: &MessageView) -> String {
        if m.kind == "mls_application" {
            if let Some(dev) = &self.e2e {
                if let Some(d) = dev.history(&m.chat).iter().find(|d| d.seq == m.seq) {
                    return format!("🔒 {}", crate::e2e::line_of(&d.text));
                }
                if dev.processed_seq(&m.chat) >= m.seq {
                    return "🔒 (cannot decrypt on this device)".to_string();
                }
            }
        }
        describe(m)
    }

    /// Feeds E2E entries, in seq order, to this device (and saves it).
    fn decrypt(&mut self, ms: &[MessageView]) {
        let Some(dev) = self.e2e.as_mut() else {
            return;
        };
        let mut fed = false;
        for m in ms.iter().filter(|m| m.kind.starts_with("mls_")) {
            match crate::e2e::feed(dev, m) {
                Ok(e) => fed |= e.is_some(),
                Err(e) => {
                    self.screen.line(format!("✗ e2e: {e}"));
                    break;
                }
            }
        }
        if fed {
            if let Err(e) = dev.save() {
                self.screen
                    .line(format!("✗ e2e: cannot save this device's state: {e}"));
            }
        }
    }

    /// Prints messages of the current chat and reports them read.
    async fn show(&mut self, conn: &mut Connection, ms: &[MessageView]) -> Result<(), CliError> {
        if ms.is_empty() {
            return Ok(());
        }
        self.decrypt(ms);
        let lines: Vec<String> = ms.iter().map(|m| self.message_line(m)).collect();
        self.screen.print(&lines);
        let me = self.me.clone();
        let Some(c) = self.current.as_mut() else {
            return Ok(());
        };
        let mut high = 0;
        for m in ms {
            high = high.max(m.seq);
            c.oldest = c.oldest.min(m.seq);
            if m.sender == me {
                c.my_last = c.my_last.max(m.seq);
            } else {
                c.typing.remove(&m.sender);
            }
        }
        conn.send(&ClientFrame::Receipt {
            chat: c.chat.clone(),
            delivered: Some(high),
            read: Some(high),
        })
        .await
    }

    /// Makes `chat` the current one: prints its last messages and starts following it.
    /// The chat already open is not printed again (`/dm USER` or `/open CHAT` of it).
    async fn open(&mut self, conn: &mut Connection, chat: &str, last: u64) -> Result<(), CliError> {
        if let Some(c) = self.current.as_ref().filter(|c| c.chat == chat) {
            let line = format!("(already in {} ({}))", clean(&c.title), clean(chat));
            self.screen.line(line);
            return Ok(());
        }
        self.chats = sync_chats(conn).await?;
        let state = self.chats.iter().find(|c| c.chat == chat).cloned();
        // An E2E chat: the device processes everything after what it processed, in
        // order, before the last messages are shown (they are read from its history).
        if let Some(cursor) = self
            .e2e
            .as_ref()
            .filter(|_| chat.starts_with("e:"))
            .map(|d| d.processed_seq(chat))
        {
            let (all, _) = read_history(conn, chat, None, Some(cursor), None).await?;
            self.decrypt(&all);
        }
        let (messages, _) = read_history(conn, chat, None, None, Some(last.max(1))).await?;
        let shown: Vec<MessageView> = if last == 0 {
            Vec::new()
        } else {
            messages.clone()
        };
        let high = messages.last().map_or(0, |m| m.seq);
        let (title, members) = match &state {
            Some(s) => (chat_title(s, &self.me), s.members.clone()),
            None => (chat.to_string(), Vec::new()),
        };
        self.current = Some(Current {
            chat: chat.to_string(),
            title: title.clone(),
            members: members.clone(),
            follower: Follower::new(chat, high),
            oldest: shown.first().map_or(high + 1, |m| m.seq),
            my_last: 0,
            acked: 0,
            receipts: HashMap::new(),
            typing: BTreeMap::new(),
            typing_sent: None,
        });
        self.screen.prompt = self.prompt();
        self.screen.line(format!(
            "── {} ({}) · members: {} ──",
            clean(&title),
            clean(chat),
            clean(&members.join(", "))
        ));
        self.show(conn, &shown).await
    }

    async fn on_line(&mut self, conn: &mut Connection, line: String) -> Result<Step, CliError> {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            return Ok(Step::Go);
        }
        if let Some(cmd) = trimmed.strip_prefix('/') {
            return self.command(conn, cmd).await;
        }
        let Some(c) = &self.current else {
            if !self.screen.raw {
                // A script must say where its text goes; nothing is guessed.
                return Err(CliError::Usage(NO_CHAT_CHOSEN.to_string()));
            }
            self.screen
                .line("no chat open: /chats lists them, /open CHAT opens one");
            return Ok(Step::Go);
        };
        if self.pending() >= PENDING_SENDS_MAX {
            self.screen.line(format!(
                "✗ not sent: {PENDING_SENDS_MAX} messages are still waiting for their ack"
            ));
            return Ok(Step::Go);
        }
        let chat = c.chat.clone();
        let sealed = if chat.starts_with("e:") {
            let Some(dev) = self.e2e.as_mut() else {
                self.screen.line(
                    "✗ not sent: this chat is end-to-end encrypted and this device has no E2E state (chat-cli e2e init)",
                );
                return Ok(Step::Go);
            };
            match crate::e2e::seal_text(dev, &chat, &line) {
                Ok(s) => Some(s),
                Err(e) => {
                    self.screen.line(format!("✗ not sent: {e}"));
                    return Ok(Step::Go);
                }
            }
        } else {
            None
        };
        self.outbox.push_back(Pending {
            chat,
            client_msg_id: ws::new_client_msg_id(),
            text: line,
            files: Vec::new(),
            sealed,
        });
        self.pump(conn).await?;
        Ok(Step::Go)
    }

    /// Messages not yet acknowledged.
    fn pending(&self) -> usize {
        self.outbox.len() + usize::from(self.in_flight.is_some())
    }

    /// Sends the next message of the outbox when none is in flight.
    async fn pump(&mut self, conn: &mut Connection) -> Result<(), CliError> {
        if self.in_flight.is_some() {
            return Ok(());
        }
        let Some(p) = self.outbox.pop_front() else {
            return Ok(());
        };
        let id = format!("send-{}", conn.next_id());
        let frame = send_frame(&id, &p);
        self.in_flight = Some((id, p));
        conn.send(&frame).await
    }

    /// After a reconnect: the message in flight is sent again with its `client_msg_id`
    /// (stored once whatever happened to the first attempt), then the rest.
    async fn resend(&mut self, conn: &mut Connection) -> Result<(), CliError> {
        if let Some((_, p)) = self.in_flight.take() {
            self.outbox.push_front(p);
        }
        self.pump(conn).await
    }

    /// Takes the message in flight if `id` is its request id.
    fn answered(&mut self, id: &str) -> Option<Pending> {
        if self.in_flight.as_ref().is_some_and(|(i, _)| i == id) {
            self.in_flight.take().map(|(_, p)| p)
        } else {
            None
        }
    }

    /// Runs a slash command. Refusals of the server are printed, not fatal.
    async fn command(&mut self, conn: &mut Connection, cmd: &str) -> Result<Step, CliError> {
        let mut words = cmd.split_whitespace();
        let name = words.next().unwrap_or("");
        let args: Vec<&str> = words.collect();
        let r = match (name, args.as_slice()) {
            ("quit" | "exit" | "q", _) => return Ok(Step::Quit),
            ("help" | "h" | "?", _) => {
                self.screen.print(&help());
                Ok(())
            }
            ("chats", _) => self.list_chats(conn).await,
            ("open" | "switch", [target]) => {
                let chat = match target.parse::<usize>() {
                    Ok(n) if n >= 1 && n <= self.chats.len() => self.chats[n - 1].chat.clone(),
                    _ => (*target).to_string(),
                };
                self.open(conn, &chat, self.last).await
            }
            ("dm", [user]) => {
                let user = (*user).to_string();
                self.create_and_open(conn, |id| ClientFrame::OpenDirect { id, user })
                    .await
            }
            ("group", [name, members @ ..]) => {
                let (name, members) = (
                    (*name).to_string(),
                    members.iter().map(|m| (*m).to_string()).collect(),
                );
                self.create_and_open(conn, |id| ClientFrame::CreateGroup { id, name, members })
                    .await
            }
            ("history", rest) => {
                let n = match rest.first().map(|s| s.parse::<u64>()) {
                    None => Ok(20),
                    Some(Ok(n)) if (1..=HISTORY_PAGE_MESSAGES_MAX).contains(&n) => Ok(n),
                    Some(_) => Err(CliError::Failed(format!(
                        "/history takes a number of messages from 1 to {HISTORY_PAGE_MESSAGES_MAX}"
                    ))),
                };
                match n {
                    Ok(n) => self.older(conn, n).await,
                    Err(e) => Err(e),
                }
            }
            ("who", _) => self.who(conn).await,
            ("file", [_, ..]) => {
                // The path is the rest of the line (it may hold spaces).
                let path = cmd.trim_start()["file".len()..].trim().to_string();
                self.send_file(conn, &path).await
            }
            _ => {
                self.screen
                    .line(format!("unknown command /{cmd}: /help lists the commands"));
                Ok(())
            }
        };
        match r {
            Ok(()) => Ok(Step::Go),
            // A refusal (unknown chat, not a member, …): say it and go on.
            Err(CliError::Failed(m) | CliError::Api { message: m, .. }) => {
                self.screen.line(format!("✗ {m}"));
                Ok(Step::Go)
            }
            Err(e) => Err(e),
        }
    }

    /// `/file PATH`: uploads the file (resumable, progress on the status line), then
    /// queues a message carrying it to the current chat.
    async fn send_file(&mut self, conn: &mut Connection, path: &str) -> Result<(), CliError> {
        let Some(chat) = self.current.as_ref().map(|c| c.chat.clone()) else {
            return Err(CliError::Failed(
                "no chat open: /open one before /file".into(),
            ));
        };
        if chat.starts_with("e:") {
            // Encrypted with a key of its own, which travels inside the E2E message.
            let Some(_) = self.e2e.as_ref() else {
                return Err(CliError::Failed(
                    "this chat is end-to-end encrypted and this device has no E2E state".into(),
                ));
            };
            let (sealed, file_ref) =
                crate::e2e::seal_file(&self.cli, std::path::Path::new(path)).await?;
            let payload = crate::e2e::Payload {
                text: String::new(),
                files: vec![sealed],
            };
            let dev = self
                .e2e
                .as_mut()
                .ok_or_else(|| CliError::Failed("no E2E state".into()))?;
            let sealed = crate::e2e::seal_payload(dev, &chat, &payload)?;
            self.screen.line("uploaded the encrypted file, sending");
            self.outbox.push_back(Pending {
                chat,
                client_msg_id: ws::new_client_msg_id(),
                text: String::new(),
                files: vec![file_ref],
                sealed: Some(sealed),
            });
            return self.pump(conn).await;
        }
        let up = crate::files::upload_file(&self.cli, std::path::Path::new(path), None, None)
            .await
            .map_err(|e| CliError::Failed(e.to_string()))?;
        self.screen.line(format!(
            "uploaded {} ({}), sending",
            clean(&up.name),
            crate::format::human_bytes(up.size)
        ));
        self.outbox.push_back(Pending {
            chat,
            client_msg_id: ws::new_client_msg_id(),
            text: String::new(),
            files: vec![chatd_proto::FileRef {
                file_id: up.file_id,
                name: None,
                mime: None,
                size: Some(up.size),
            }],
            sealed: None,
        });
        self.pump(conn).await
    }

    /// Sends a request answered with `done` (open a direct chat, create a group) and
    /// opens the chat it names.
    async fn create_and_open(
        &mut self,
        conn: &mut Connection,
        make: impl FnOnce(String) -> ClientFrame,
    ) -> Result<(), CliError> {
        let answer = conn.request(make).await?;
        match answer.frame {
            Some(ServerFrame::Done { chat, .. }) => self.open(conn, &chat, self.last).await,
            _ => Err(CliError::Failed(format!(
                "unexpected answer {}",
                answer.raw
            ))),
        }
    }

    async fn list_chats(&mut self, conn: &mut Connection) -> Result<(), CliError> {
        self.chats = sync_chats(conn).await?;
        self.chats.sort_by(|a, b| a.chat.cmp(&b.chat));
        if self.chats.is_empty() {
            self.screen
                .line("no chats yet: /dm USER or /group NAME USER… starts one");
            return Ok(());
        }
        let lines: Vec<String> = self
            .chats
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let unread = if c.unread > 0 {
                    format!("  ({} unread)", c.unread)
                } else {
                    String::new()
                };
                format!(
                    "{:>3}. {}  {}{unread}",
                    i + 1,
                    clean(&c.chat),
                    clean(&chat_title(c, &self.me))
                )
            })
            .collect();
        self.screen.print(&lines);
        Ok(())
    }

    async fn older(&mut self, conn: &mut Connection, n: u64) -> Result<(), CliError> {
        let Some(c) = &self.current else {
            self.screen.line("no chat open");
            return Ok(());
        };
        if c.oldest <= 1 {
            self.screen.line("── start of the chat ──");
            return Ok(());
        }
        let chat = c.chat.clone();
        let (ms, more) = read_history(conn, &chat, Some(c.oldest), None, Some(n)).await?;
        let mut lines = vec![format!("── {} older message(s) ──", ms.len())];
        lines.extend(ms.iter().map(|m| self.message_line(m)));
        lines.push(if more {
            "── /history for more ──".to_string()
        } else {
            "── start of the chat ──".to_string()
        });
        self.screen.print(&lines);
        if let (Some(c), Some(first)) = (self.current.as_mut(), ms.first()) {
            c.oldest = first.seq;
        }
        if !more {
            if let Some(c) = self.current.as_mut() {
                c.oldest = 1;
            }
        }
        Ok(())
    }

    async fn who(&mut self, conn: &mut Connection) -> Result<(), CliError> {
        let Some(c) = &self.current else {
            self.screen.line("no chat open");
            return Ok(());
        };
        let members = c.members.clone();
        let list = messaging::presence_of(conn, &members).await?;
        let lines = list
            .iter()
            .map(|p| {
                let status = if p.online {
                    "online".to_string()
                } else {
                    match p.last_seen {
                        Some(t) => format!("offline, last seen {}", crate::format::format_time(t)),
                        None => "offline".to_string(),
                    }
                };
                format!("  {}: {status}", clean(&p.user))
            })
            .collect::<Vec<_>>();
        self.screen.print(&lines);
        Ok(())
    }

    /// The user typed: tell the chat, at most every few seconds.
    async fn typed(&mut self, conn: &mut Connection) -> Result<(), CliError> {
        if self.screen.editor.text().starts_with('/') {
            return Ok(());
        }
        let Some(c) = self.current.as_mut() else {
            return Ok(());
        };
        let now = Instant::now();
        if c.typing_sent
            .is_some_and(|t| now.duration_since(t) < TYPING_SEND_EVERY)
        {
            return Ok(());
        }
        c.typing_sent = Some(now);
        conn.send(&ClientFrame::Typing {
            chat: c.chat.clone(),
        })
        .await
    }

    async fn on_frame(
        &mut self,
        conn: &mut Connection,
        frame: ServerFrame,
    ) -> Result<(), CliError> {
        match frame {
            ServerFrame::Message { message } => {
                let current = self.current.as_ref().map(|c| c.chat.clone());
                if current.as_deref() == Some(message.chat.as_str()) {
                    let Some(c) = self.current.as_mut() else {
                        return Ok(());
                    };
                    let (ready, fetch) = c.follower.push(message);
                    if fetch {
                        let (chat, after) = (c.chat.clone(), c.follower.high);
                        messaging::request_catch_up(conn, &chat, after).await?;
                    }
                    self.show(conn, &ready).await?;
                } else if message.sender != self.me {
                    // Elsewhere: a notice, and the message counts as delivered.
                    let title = self
                        .chats
                        .iter()
                        .find(|c| c.chat == message.chat)
                        .map_or_else(|| message.chat.clone(), |c| chat_title(c, &self.me));
                    self.screen.line(format!(
                        "  ✉ {} in {}: {}   (/open {})",
                        clean(&message.sender),
                        clean(&title),
                        clean(&describe(&message)),
                        clean(&message.chat)
                    ));
                    conn.send(&ClientFrame::Receipt {
                        chat: message.chat.clone(),
                        delivered: Some(message.seq),
                        read: None,
                    })
                    .await?;
                }
            }
            ServerFrame::History {
                id, messages, more, ..
            } if id.starts_with("catchup-") => {
                let Some(c) = self.current.as_mut() else {
                    return Ok(());
                };
                let (ready, fetch) = c.follower.page(messages, more);
                if fetch {
                    let (chat, after) = (c.chat.clone(), c.follower.high);
                    messaging::request_catch_up(conn, &chat, after).await?;
                }
                self.show(conn, &ready).await?;
            }
            ServerFrame::Ack {
                id,
                chat,
                seq,
                duplicate,
                ..
            } if self.answered(&id).is_some() => {
                if let Some(c) = self.current.as_mut().filter(|c| c.chat == chat) {
                    c.acked = c.acked.max(seq);
                }
                if duplicate {
                    self.screen
                        .line(format!("  (#{seq} was already stored: not sent twice)"));
                }
                self.pump(conn).await?;
            }
            ServerFrame::Error {
                id: Some(id),
                code,
                message,
            } => {
                if let Some(p) = self.answered(&id) {
                    self.screen.line(format!(
                        "✗ not sent to {}: {code}: {message}: {}",
                        clean(&p.chat),
                        clean(&p.text)
                    ));
                    self.pump(conn).await?;
                } else if id.starts_with("catchup-") {
                    if let Some(c) = self.current.as_mut() {
                        c.follower.fetching = false;
                    }
                    self.screen
                        .line(format!("✗ cannot catch up: {code}: {message}"));
                }
            }
            ServerFrame::Error {
                id: None,
                code,
                message,
            } => self.screen.line(format!("✗ chatd: {code}: {message}")),
            ServerFrame::Receipt {
                chat,
                user,
                delivered,
                read,
            } => {
                let me = self.me.clone();
                let Some(c) = self.current.as_mut() else {
                    return Ok(());
                };
                if chat != c.chat || user == me {
                    return Ok(());
                }
                let (old_d, old_r) = c.receipts.get(&user).copied().unwrap_or((0, 0));
                c.receipts.insert(user.clone(), (delivered, read));
                let mine = c.my_last;
                if mine > 0 && read >= mine && old_r < mine {
                    self.screen
                        .line(format!("  ✓✓ read by {} (up to #{read})", clean(&user)));
                } else if mine > 0 && delivered >= mine && old_d < mine {
                    self.screen.line(format!(
                        "  ✓✓ delivered to {} (up to #{delivered})",
                        clean(&user)
                    ));
                }
            }
            ServerFrame::Typing { chat, user } => {
                if let Some(c) = self.current.as_mut() {
                    if c.chat == chat && user != self.me {
                        c.typing.insert(user, Instant::now());
                        self.refresh_prompt();
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn send_frame(id: &str, p: &Pending) -> ClientFrame {
    if let Some((epoch, data)) = &p.sealed {
        return ClientFrame::E2eSend {
            id: id.to_string(),
            chat: p.chat.clone(),
            client_msg_id: p.client_msg_id.clone(),
            kind: "application".into(),
            epoch: *epoch,
            data: data.clone(),
            welcome: None,
            add: Vec::new(),
            remove: Vec::new(),
            files: p.files.clone(),
        };
    }
    ClientFrame::Send {
        id: id.to_string(),
        chat: p.chat.clone(),
        client_msg_id: p.client_msg_id.clone(),
        text: p.text.clone(),
        reply_to: None,
        files: p.files.clone(),
    }
}

/// Input: keys from a raw terminal, or lines from a pipe.
enum Input {
    Keys(EventStream),
    Lines(tokio::io::Lines<tokio::io::BufReader<tokio::io::Stdin>>),
}

enum Got {
    Edit(Edit),
    Resize,
    Nothing,
    Eof,
}

impl Input {
    async fn next(&mut self, editor: &mut Editor) -> Result<Got, CliError> {
        match self {
            Input::Keys(keys) => match keys.next().await {
                Some(Ok(Event::Key(k))) => Ok(Got::Edit(editor.key(k))),
                Some(Ok(Event::Resize(..))) => Ok(Got::Resize),
                Some(Ok(_)) => Ok(Got::Nothing),
                Some(Err(e)) => Err(CliError::Failed(format!("cannot read the terminal: {e}"))),
                None => Ok(Got::Eof),
            },
            Input::Lines(lines) => match lines.next_line().await {
                Ok(Some(l)) => Ok(Got::Edit(Edit::Line(l))),
                Ok(None) => Ok(Got::Eof),
                Err(e) => Err(CliError::Failed(format!("cannot read stdin: {e}"))),
            },
        }
    }
}

/// Runs the interactive session until `/quit`, Ctrl-D, Ctrl-C on an empty line or
/// SIGTERM. A lost connection is re-established (with backoff) and the current chat
/// caught up; sends not yet acked are sent again with the same idempotency key.
pub async fn run(cli: &Cli, args: &ChatArgs) -> Result<String, CliError> {
    let mut conn = messaging::connect(cli).await?;
    let raw = std::io::stdin().is_terminal();
    let _raw_mode = if raw { Some(RawMode::enable()?) } else { None };
    let mut input = if raw {
        Input::Keys(EventStream::new())
    } else {
        Input::Lines(tokio::io::BufReader::new(tokio::io::stdin()).lines())
    };
    let mut s = Session {
        me: conn.user().to_string(),
        chats: Vec::new(),
        current: None,
        outbox: VecDeque::new(),
        in_flight: None,
        screen: Screen {
            raw,
            editor: Editor::new(),
            prompt: "[no chat] > ".to_string(),
        },
        last: args.last,
        cli: cli.clone(),
        e2e: None,
    };
    match crate::e2e::session_device(&s.me) {
        Ok(dev) => s.e2e = dev,
        Err(e) => s.screen.line(format!(
            "chat-cli: E2E chats stay encrypted in this session: {e}"
        )),
    }
    s.screen.line(format!(
        "chat-cli: {} connected to {} · /help for commands",
        clean(&s.me),
        clean(conn.url())
    ));
    let first = match &args.chat {
        Some(c) => Some(c.clone()),
        // Piped input: the script names its chat (see `NO_CHAT_CHOSEN`); never a guess.
        None if !raw => None,
        None => {
            let chats = sync_chats(&mut conn).await?;
            chats
                .iter()
                .max_by_key(|c| c.last_seq)
                .map(|c| c.chat.clone())
        }
    };
    match first {
        Some(chat) => {
            if let Err(e) = s.open(&mut conn, &chat, args.last).await {
                conn.close().await;
                return Err(e);
            }
        }
        None if !raw => {}
        None => s
            .screen
            .line("no chats yet: /dm USER or /group NAME USER… starts one"),
    }
    let mut stop = Box::pin(messaging::stop_signal());
    loop {
        match session_loop(&mut s, &mut conn, &mut input, &mut stop).await? {
            Ended::Stopped => {
                drain_pending(&mut s, &mut conn, Duration::from_millis(cli.timeout_ms)).await;
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
                s.screen.line(format!("chat-cli: {why}; reconnecting"));
                conn = match messaging::reconnect(cli, &why, &mut stop).await? {
                    Some(c) => c,
                    None => return Ok(String::new()),
                };
                s.screen.line("chat-cli: reconnected");
                // Resend what was not acked: the same client_msg_id is stored once.
                s.resend(&mut conn).await?;
                if let Some(c) = s.current.as_mut() {
                    c.follower.fetching = true;
                    let (chat, after) = (c.chat.clone(), c.follower.high);
                    messaging::request_catch_up(&mut conn, &chat, after).await?;
                }
            }
        }
    }
}

/// Before leaving (`/quit`, end of input, Ctrl-D, Ctrl-C, SIGTERM), waits (up to
/// `timeout`) for the acks of sends still pending and for the acknowledged messages of
/// the current chat to be shown with their `✓`, so a scripted `echo hi | chat-cli chat
/// CHAT` neither quits before its message is stored nor before it says so; whatever is
/// still unacknowledged then is reported.
async fn drain_pending(s: &mut Session, conn: &mut Connection, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if s.pending() == 0 {
            let Some(c) = s.current.as_mut().filter(|c| c.follower.high < c.acked) else {
                break;
            };
            // Every ack is in but not every acked message was pushed yet: ask for them
            // (the follower shows each seq once, whichever comes first).
            if !c.follower.fetching {
                c.follower.fetching = true;
                let (chat, after) = (c.chat.clone(), c.follower.high);
                if messaging::request_catch_up(conn, &chat, after)
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
        match tokio::time::timeout_at(deadline, conn.recv()).await {
            Ok(Ok(incoming)) => {
                if let Some(frame) = incoming.frame {
                    if s.on_frame(conn, frame).await.is_err() {
                        break;
                    }
                }
            }
            Ok(Err(_)) | Err(_) => break,
        }
    }
    if s.pending() > 0 {
        let lines: Vec<String> = s
            .in_flight
            .iter()
            .map(|(_, p)| p)
            .chain(s.outbox.iter())
            .map(|p| format!("✗ no ack (may or may not be stored): {}", clean(&p.text)))
            .collect();
        s.screen.print(&lines);
    }
}

async fn session_loop(
    s: &mut Session,
    conn: &mut Connection,
    input: &mut Input,
    stop: &mut std::pin::Pin<Box<impl std::future::Future<Output = ()>>>,
) -> Result<Ended, CliError> {
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let lost = |e: CliError| match e {
            e @ CliError::Unreachable { .. } => Ok(Ended::Lost(e)),
            e => Err(e),
        };
        tokio::select! {
            _ = stop.as_mut() => return Ok(Ended::Stopped),
            _ = ping.tick() => {
                let id = format!("ping-{}", conn.next_id());
                if let Err(e) = conn.send(&ClientFrame::Ping { id: Some(id) }).await {
                    return lost(e);
                }
            }
            _ = tick.tick() => s.refresh_prompt(),
            r = conn.recv() => {
                let incoming = match r {
                    Ok(f) => f,
                    Err(e) => return Ok(Ended::Lost(e)),
                };
                if let Some(frame) = incoming.frame {
                    if let Err(e) = s.on_frame(conn, frame).await {
                        return lost(e);
                    }
                }
            }
            got = input.next(&mut s.screen.editor) => {
                match got? {
                    Got::Eof | Got::Edit(Edit::Eof | Edit::Interrupt) => return Ok(Ended::Stopped),
                    Got::Edit(Edit::Line(line)) => {
                        match s.on_line(conn, line).await {
                            Ok(Step::Quit) => return Ok(Ended::Stopped),
                            Ok(Step::Go) => s.screen.redraw(),
                            Err(e) => return lost(e),
                        }
                    }
                    Got::Edit(Edit::Changed) => {
                        s.screen.redraw();
                        if !s.screen.editor.is_empty() {
                            if let Err(e) = s.typed(conn).await {
                                return lost(e);
                            }
                        }
                    }
                    Got::Edit(Edit::ClearScreen) => {
                        if s.screen.raw {
                            let mut out = std::io::stdout().lock();
                            let _ = out.write_all(b"\x1b[2J\x1b[H");
                            let _ = out.flush();
                        }
                        s.screen.redraw();
                    }
                    Got::Edit(Edit::Moved) | Got::Resize => s.screen.redraw(),
                    Got::Edit(Edit::None) | Got::Nothing => {}
                }
            }
        }
    }
}
