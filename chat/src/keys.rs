//! Key layout inside a partition (raftlog adds the group prefix). Ids never contain `\0`
//! (the gateway validates them), so `\0` separates the parts.

pub(crate) const LOG_COUNT: &[u8] = b"n";

fn join(parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

pub(crate) fn log_record(seq: u64) -> Vec<u8> {
    [b"l".as_slice(), &seq.to_be_bytes()].concat()
}
pub(crate) fn chat(chat: &str) -> Vec<u8> {
    join(&[b"c", chat.as_bytes()])
}
pub(crate) fn message(chat: &str, seq: u64) -> Vec<u8> {
    join(&[b"m", chat.as_bytes(), &seq.to_be_bytes()])
}
pub(crate) fn dedup(sender: &str, client_msg_id: &str) -> Vec<u8> {
    join(&[b"d", sender.as_bytes(), client_msg_id.as_bytes()])
}
pub(crate) fn cursor(chat: &str, user: &str) -> Vec<u8> {
    join(&[b"r", chat.as_bytes(), user.as_bytes()])
}
pub(crate) fn cursor_prefix(chat: &str) -> Vec<u8> {
    join(&[b"r", chat.as_bytes(), b""])
}
pub(crate) fn user_chat(user: &str, chat: &str) -> Vec<u8> {
    join(&[b"u", user.as_bytes(), chat.as_bytes()])
}
pub(crate) fn user_chat_prefix(user: &str) -> Vec<u8> {
    join(&[b"u", user.as_bytes(), b""])
}

/// The smallest key greater than every key starting with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    end.push(0xff);
    end
}
