//! End-to-end encryption for chatd's E2E chats: the client's half of MLS (RFC 9420).
//!
//! `chat-cli` uses this crate to keep one **device** per state file: its signature key and
//! credential, the KeyPackages it has published, the MLS group of each E2E chat it belongs
//! to, and what it decrypted. The server never sees plaintext: it orders opaque MLS
//! messages in each chat's gapless log (seq 1, 2, 3, …) and accepts at most one commit per
//! epoch (a commit made on base epoch E is accepted only while the chat is at E; the chat
//! then moves to E + 1). A device feeds every log entry, in seq order, to
//! [`Device::process`], which turns it into an [`Event`].
//!
//! # MLS choices
//!
//! * Ciphersuite `MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519`; a `BasicCredential` whose
//!   identity is the UTF-8 string `"user/device"`.
//! * Group id = the chat id's bytes. The ratchet tree travels in the Welcome.
//! * Wire format policy: pure ciphertext. Application messages **and commits** are
//!   `PrivateMessage`s, so the server does not learn who was added or removed from the MLS
//!   messages (it knows the chat's members from its own records anyway). A commit is
//!   readable by the members of its base epoch, so a removed member still sees (and
//!   learns of) its own removal.
//! * The last [`PAST_EPOCHS_KEPT_MAX`] epochs' message secrets are kept, so application
//!   messages that were sent just before a commit and ordered after it still decrypt.
//! * Standalone proposals are not used: chat-cli's commits carry their proposals inline.
//!   A proposal found in the log is reported as [`Event::Ignored`] and not stored (storing
//!   it would block sending until someone commits it).
//! * Leaf lifetimes in the ratchet tree are not checked when joining (a member that never
//!   committed keeps its KeyPackage's lifetime forever); KeyPackages themselves are checked
//!   (signature, ciphersuite, lifetime) by [`Device::add`].
//!
//! # The state file
//!
//! One file per device, all of it encrypted (see [`store`]):
//!
//! ```text
//! b"CHATDE2E" | version 1 (1 byte) | salt (16 bytes) | nonce (24 bytes) | XChaCha20-Poly1305(state)
//! ```
//!
//! The associated data is the 49-byte header. The salt is the Argon2id salt of a
//! passphrase key ([`StoreKey::from_passphrase`]; read it back with [`read_salt`]); for a
//! raw key it is random and unused. The state (`chatd-codec`: a version byte, bincode 2) holds: user and device names,
//! the Ed25519 signature key pair, the whole openmls storage (group secrets, ratchet
//! trees, private KeyPackage keys), and per chat: the processed-seq cursor, the pending
//! commit's bytes, the plaintexts of our own messages not yet seen back in the log
//! (bounded by [`SENT_REMEMBERED_PER_CHAT_MAX`]) and the decrypted history (bounded by
//! [`HISTORY_MESSAGES_PER_CHAT_MAX`]). Saves are atomic (temporary file, fsync, rename,
//! fsync of the directory) and the file's mode is 0600. Every method that hands out bytes
//! to send (`key_packages`, `add`, `remove`, `update`, `encrypt`) saves the state first, so
//! nothing leaves the device that a crash could make it forget (a reused ratchet key, a
//! KeyPackage without its private key). [`Device::process`] does not save: call
//! [`Device::save`] after a batch; a crash before it only means re-feeding the same
//! entries, which the cursor makes harmless.
//!
//! # Threat model
//!
//! * The server (and anyone on the network) sees ciphertext, sizes, timing, the sender's
//!   account and MLS epochs and content types; it cannot read or forge messages. It can
//!   drop, withhold or refuse entries; it cannot make members accept two different commits
//!   for one epoch without them forking visibly. Application messages whose MLS sender's
//!   user differs from the server's sender are refused.
//! * Who a credential belongs to rests on the server (it hands out KeyPackages per user);
//!   users compare [safety numbers](safety_number) out of band to rule out a lying server.
//! * A stolen state file without the key (or passphrase) reveals nothing but its size.
//!   A stolen unlocked device reveals its history and current group secrets; forward
//!   secrecy covers only what MLS and the history bound already dropped.
//! * Attachments ([`encrypt_file`]) get a fresh key each; the key travels inside an MLS
//!   application message, the ciphertext through the server's file store.

pub mod bench;
mod device;
mod error;
pub mod files;
mod process;
mod safety;
pub mod store;
#[cfg(test)]
mod tests;

pub use device::Device;
pub use error::E2eError;
pub use files::{decrypt_file, encrypt_file, FileKey, FILE_CHUNK_BYTES};
pub use safety::safety_number;
pub use store::{read_salt, StoreKey};

/// Default lifetime of a published KeyPackage: 28 days.
pub const KEY_PACKAGE_LIFETIME_SECS_DEFAULT: u64 = 28 * 24 * 3600;
/// Longest KeyPackage lifetime openmls accepts (84 days plus its one-hour margin);
/// longer requests are cut to this.
pub const KEY_PACKAGE_LIFETIME_SECS_MAX: u64 = 84 * 24 * 3600;
/// KeyPackages made by one call of [`Device::key_packages`].
pub const KEY_PACKAGES_PER_CALL_MAX: usize = 1000;
/// openmls `max_past_epochs`: application messages of this many old epochs still decrypt.
pub const PAST_EPOCHS_KEPT_MAX: usize = 16;
/// Decrypted messages kept per chat; the oldest are dropped.
pub const HISTORY_MESSAGES_PER_CHAT_MAX: usize = 10_000;
/// Own sent plaintexts remembered per chat until seen back in the log; the oldest are
/// dropped (seen back later, such a message is [`Event::Undecryptable`]).
pub const SENT_REMEMBERED_PER_CHAT_MAX: usize = 1_000;
/// A state file bigger than this is refused (and never written).
pub const STATE_FILE_BYTES_MAX: u64 = 256 << 20;

/// The kind of a chat log entry of an E2E chat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Application,
    Commit,
    Welcome,
    Proposal,
}

impl Kind {
    /// The protocol's name of the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Application => "application",
            Kind::Commit => "commit",
            Kind::Welcome => "welcome",
            Kind::Proposal => "proposal",
        }
    }

    /// Parses a protocol name; the server's entry kinds (`"mls_commit"`, …) are accepted too.
    pub fn parse(s: &str) -> Option<Kind> {
        match s.strip_prefix("mls_").unwrap_or(s) {
            "application" => Some(Kind::Application),
            "commit" => Some(Kind::Commit),
            "welcome" => Some(Kind::Welcome),
            "proposal" => Some(Kind::Proposal),
            _ => None,
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A KeyPackage to upload: an MLS message (wire format `mls_key_package`), TLS-encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPackageOut {
    pub data: Vec<u8>,
    /// When the KeyPackage stops being valid (its lifetime's `not_after`), Unix ms.
    pub expires_ms: u64,
    pub last_resort: bool,
}

/// A commit to send: `data` (kind commit) and, when it adds members, `welcome`
/// (kind welcome, to be stored after the commit was accepted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    pub data: Vec<u8>,
    pub welcome: Option<Vec<u8>>,
    /// The base epoch: the commit applies to the group at this epoch and moves it to
    /// `epoch + 1`.
    pub epoch: u64,
}

/// An application message to send, made in `epoch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub data: Vec<u8>,
    pub epoch: u64,
}

/// A member of a group: one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub user: String,
    pub device: String,
    /// [`safety_number`] of the member's signature key.
    pub safety_number: String,
}

/// What one log entry meant for this device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A decrypted application message (also for our own messages seen back in the log).
    Message {
        seq: u64,
        sender_user: String,
        sender_device: String,
        plaintext: Vec<u8>,
    },
    /// A commit moved the group to `epoch`; `added`/`removed` are "user/device" strings.
    Epoch {
        seq: u64,
        epoch: u64,
        added: Vec<String>,
        removed: Vec<String>,
        removed_self: bool,
    },
    /// This device joined from a Welcome.
    Joined { seq: u64, epoch: u64 },
    /// Nothing to do for this device (a welcome for others, a stale commit, an entry before
    /// we joined, a seq already processed), with a short reason.
    Ignored { seq: u64, reason: String },
    /// Could not decrypt or process the entry (removed from the group, an epoch no longer
    /// held, malformed bytes). The device's state is unchanged but for the cursor.
    Undecryptable { seq: u64, reason: String },
}

impl Event {
    /// The log seq the event is about.
    pub fn seq(&self) -> u64 {
        match self {
            Event::Message { seq, .. }
            | Event::Epoch { seq, .. }
            | Event::Joined { seq, .. }
            | Event::Ignored { seq, .. }
            | Event::Undecryptable { seq, .. } => *seq,
        }
    }
}

/// One decrypted message of a chat's history on this device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stored {
    pub seq: u64,
    pub sender_user: String,
    pub sender_device: String,
    pub text: Vec<u8>,
    /// The server's display timestamp of the log entry.
    pub ts_ms: u64,
}
