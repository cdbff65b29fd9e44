//! Text for people: timestamps, log entries of every kind, and ordering of pushed
//! messages (a chat's log is gapless; pushes may skip seqs and are caught up with
//! `history`).

use std::collections::BTreeMap;

use chatd_proto::MessageView;

/// `YYYY-MM-DD HH:MM:SS` (UTC) for a timestamp in ms since the epoch.
pub fn format_time(ts_ms: u64) -> String {
    let secs = ts_ms / 1000;
    let (y, m, d) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// `HH:MM` (UTC) for a timestamp in ms since the epoch.
pub fn format_clock(ts_ms: u64) -> String {
    let rem = (ts_ms / 1000) % 86_400;
    format!("{:02}:{:02}", rem / 3600, (rem % 3600) / 60)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// Text safe to print on a terminal: control characters (escape sequences above all)
/// become `�`, except that newlines and tabs become spaces.
pub fn clean(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\n' | '\t' | '\r' => ' ',
            c if c.is_control() => '\u{fffd}',
            c => c,
        })
        .collect()
}

/// Like [`clean`], keeping line breaks: one cleaned string per line.
pub fn clean_lines(s: &str) -> Vec<String> {
    s.split('\n').map(clean).collect()
}

/// What an entry says, for a table cell or a line: the text of a message (with its
/// reply target and an edited mark), or a description of a membership change or marker.
pub fn describe(m: &MessageView) -> String {
    match m.kind.as_str() {
        "text" => {
            let mut s = String::new();
            if let Some(r) = m.reply_to {
                s.push_str(&format!("↪ #{r} "));
            }
            s.push_str(&m.text);
            if m.edited_ts.is_some() {
                s.push_str(" (edited)");
            }
            for f in &m.files {
                if !s.is_empty() {
                    s.push(' ');
                }
                s.push_str(&attachment(f));
            }
            s
        }
        "deleted" => "(message deleted)".to_string(),
        "join" if m.text == m.sender => format!("→ {} joined", m.text),
        "join" => format!("→ {} was added by {}", m.text, m.sender),
        "leave" if m.text == m.sender => format!("← {} left", m.text),
        "leave" => format!("← {} was removed by {}", m.text, m.sender),
        "edit" => match m.reply_to {
            Some(r) => format!("✎ edited #{r}: {}", m.text),
            None => format!("✎ edited: {}", m.text),
        },
        "delete" => match m.reply_to {
            Some(r) => format!("✗ deleted #{r}"),
            None => "✗ deleted a message".to_string(),
        },
        // E2E entries: ciphertext, shown as what they are (`chat-cli e2e read` and
        // `chat-cli chat` with this device's E2E state decrypt them).
        "mls_application" => {
            let pad = m.text.bytes().rev().take_while(|b| *b == b'=').count();
            let bytes = (m.text.len() / 4 * 3).saturating_sub(pad);
            format!("🔒 encrypted message ({bytes} bytes)")
        }
        "mls_commit" => match m.epoch {
            Some(e) => format!("🔒 group keys changed (epoch {e} → {})", e + 1),
            None => "🔒 group keys changed".to_string(),
        },
        "mls_welcome" => "🔒 welcome for the added devices".to_string(),
        "mls_proposal" => "🔒 proposal".to_string(),
        other => format!("[{other}] {}", m.text),
    }
}

/// One attachment as history and tail show it: `📎 name (size, type) f:…`.
pub fn attachment(f: &chatd_proto::FileView) -> String {
    format!(
        "📎 {} ({}, {}) {}",
        clean(&f.name),
        human_bytes(f.size),
        clean(&f.mime),
        f.file_id
    )
}

/// `n` bytes for people: B, KiB, MiB or GiB with one decimal.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Whether an entry is a message people wrote (as opposed to a membership change or an
/// edit/delete marker).
pub fn is_text(m: &MessageView) -> bool {
    matches!(m.kind.as_str(), "text" | "deleted")
}

/// Puts one chat's pushed messages in seq order without duplicates, and says when a
/// gap must be filled with `history` (`after` = [`Follower::high`]).
#[derive(Clone, Debug)]
pub struct Follower {
    /// The chat followed.
    pub chat: String,
    /// The highest seq handed out so far.
    pub high: u64,
    held: BTreeMap<u64, MessageView>,
    /// A catch-up `history` request is in flight.
    pub fetching: bool,
}

impl Follower {
    /// Follows `chat` from after `high`.
    pub fn new(chat: &str, high: u64) -> Self {
        Follower {
            chat: chat.to_string(),
            high,
            held: BTreeMap::new(),
            fetching: false,
        }
    }

    fn drain(&mut self, out: &mut Vec<MessageView>) {
        while let Some(entry) = self.held.first_entry() {
            let seq = *entry.key();
            if seq <= self.high {
                entry.remove();
            } else if seq == self.high + 1 {
                out.push(entry.remove());
                self.high = seq;
            } else {
                break;
            }
        }
    }

    /// A pushed message of this chat: the messages that are now in order (maybe none),
    /// and whether to ask for `history` after [`Follower::high`] (a gap, and no request
    /// in flight; the caller sends it and sets nothing: this sets `fetching`).
    pub fn push(&mut self, m: MessageView) -> (Vec<MessageView>, bool) {
        let mut out = Vec::new();
        if m.seq <= self.high {
            return (out, false);
        }
        self.held.insert(m.seq, m);
        self.drain(&mut out);
        let fetch = !self.held.is_empty() && !self.fetching;
        if fetch {
            self.fetching = true;
        }
        (out, fetch)
    }

    /// A `history` page asked for after [`Follower::high`]: the messages now in order,
    /// and whether to ask for the next page. The page is authoritative (a member's span
    /// may start after `high`); with no more pages, held pushes beyond a remaining gap
    /// are handed out as they are.
    pub fn page(&mut self, messages: Vec<MessageView>, more: bool) -> (Vec<MessageView>, bool) {
        self.fetching = false;
        let mut out = Vec::new();
        for m in messages {
            if m.seq > self.high {
                self.high = m.seq;
                self.held.remove(&m.seq);
                out.push(m);
            }
        }
        self.drain(&mut out);
        if self.held.is_empty() {
            return (out, false);
        }
        if more {
            self.fetching = true;
            return (out, true);
        }
        let rest = std::mem::take(&mut self.held);
        for (seq, m) in rest {
            if seq > self.high {
                self.high = seq;
                out.push(m);
            }
        }
        (out, false)
    }

    /// Whether messages are held back, waiting for a gap to be filled.
    pub fn holding(&self) -> bool {
        !self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn attachments_are_shown_with_name_size_and_type() {
        let mut m = msg(3);
        m.text = "look".into();
        m.files.push(chatd_proto::FileView {
            file_id: "f:1".into(),
            name: "cat.png".into(),
            mime: "image/png".into(),
            size: 1536,
        });
        assert_eq!(describe(&m), "look 📎 cat.png (1.5 KiB, image/png) f:1");
        assert_eq!(human_bytes(5), "5 B");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    fn msg(seq: u64) -> MessageView {
        MessageView {
            chat: "c".into(),
            seq,
            msg_id: format!("c/{seq}"),
            sender: "bob".into(),
            kind: "text".into(),
            text: format!("m{seq}"),
            ts: 0,
            reply_to: None,
            edited_ts: None,
            files: Vec::new(),
            epoch: None,
        }
    }

    fn seqs(v: &[MessageView]) -> Vec<u64> {
        v.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn times() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_time(1_718_000_010_000), "2024-06-10 06:13:30");
        assert_eq!(format_time(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(format_clock(1_718_000_010_000), "06:13");
    }

    #[test]
    fn descriptions() {
        let mut m = msg(1);
        m.reply_to = Some(3);
        m.edited_ts = Some(1);
        assert_eq!(describe(&m), "↪ #3 m1 (edited)");
        m.kind = "join".into();
        m.text = "carol".into();
        assert_eq!(describe(&m), "→ carol was added by bob");
        m.text = "bob".into();
        assert_eq!(describe(&m), "→ bob joined");
        m.kind = "leave".into();
        assert_eq!(describe(&m), "← bob left");
        m.kind = "delete".into();
        assert_eq!(describe(&m), "✗ deleted #3");
        m.kind = "edit".into();
        m.text = "new".into();
        assert_eq!(describe(&m), "✎ edited #3: new");
        m.kind = "deleted".into();
        assert_eq!(describe(&m), "(message deleted)");
        assert_eq!(clean("a\x1b[2Jb\nc"), "a\u{fffd}[2Jb c");
        assert_eq!(clean_lines("a\nb"), vec!["a", "b"]);
    }

    #[test]
    fn follower_orders_dedups_and_fills_gaps() {
        let mut f = Follower::new("c", 2);
        assert_eq!(seqs(&f.push(msg(2)).0), Vec::<u64>::new());
        let (out, fetch) = f.push(msg(3));
        assert_eq!((seqs(&out), fetch), (vec![3], false));
        // A gap: 4 is missing.
        let (out, fetch) = f.push(msg(5));
        assert_eq!((seqs(&out), fetch), (vec![], true));
        assert!(f.holding());
        // Another push while fetching: no second request.
        let (out, fetch) = f.push(msg(6));
        assert_eq!((seqs(&out), fetch), (vec![], false));
        let (out, more) = f.page(vec![msg(4), msg(5)], false);
        assert_eq!((seqs(&out), more), (vec![4, 5, 6], false));
        assert_eq!(f.high, 6);
        // A page that does not reach the held push, with more to come.
        let (_, fetch) = f.push(msg(9));
        assert!(fetch);
        let (out, more) = f.page(vec![msg(7)], true);
        assert_eq!((seqs(&out), more), (vec![7], true));
        // The last page says nothing more: what is held is handed out.
        let (out, more) = f.page(vec![], false);
        assert_eq!((seqs(&out), more), (vec![9], false));
    }

    #[test]
    fn e2e_entries_say_what_they_are_never_their_base64() {
        let mut m = msg(3);
        m.kind = "mls_application".into();
        m.text = "QUJDREVGR0g=".into();
        assert_eq!(describe(&m), "🔒 encrypted message (8 bytes)");
        m.kind = "mls_commit".into();
        m.epoch = Some(4);
        assert_eq!(describe(&m), "🔒 group keys changed (epoch 4 → 5)");
        m.kind = "mls_welcome".into();
        assert!(!describe(&m).contains("QUJD"));
    }
}
