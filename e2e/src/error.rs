//! The crate's one error type.

/// Why an E2E operation failed.
#[derive(Debug, thiserror::Error)]
pub enum E2eError {
    /// Reading or writing the state file failed.
    #[error("state file I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The state file does not decrypt: wrong key, or its bytes were changed.
    #[error("wrong key, or the state file was tampered with")]
    BadKey,
    /// The state file is not one this build can read (bad magic, version or contents).
    #[error("corrupt state file: {0}")]
    Corrupt(String),
    /// The state file (or the state to write) is bigger than `STATE_FILE_BYTES_MAX`.
    #[error("state file of {bytes} bytes is over the limit of {max} bytes")]
    TooLarge { bytes: u64, max: u64 },
    /// This device has no group for the chat.
    #[error("no E2E group for chat {0:?} on this device")]
    NoGroup(String),
    /// The state file or the chat's group exists already.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// A KeyPackage did not parse or verify (signature, ciphersuite, lifetime, identity).
    #[error("bad key package: {0}")]
    BadKeyPackage(String),
    /// No member of the group matched the users to remove.
    #[error("nothing to remove: no other member matches")]
    NothingToRemove,
    /// A commit is already pending for the chat: wait for the log to show it, or discard it.
    #[error("a commit is already pending for chat {0:?}")]
    PendingCommit(String),
    /// This device was removed from the chat's group.
    #[error("this device is no longer a member of chat {0:?}")]
    NotMember(String),
    /// A caller's argument is not acceptable (an empty name, a name with '/', a bad salt).
    #[error("invalid argument: {0}")]
    InvalidInput(String),
    /// An encrypted file did not decrypt: wrong key, tampered, truncated or extended.
    #[error("encrypted file does not decrypt: {0}")]
    BadFile(&'static str),
    /// openmls refused or failed.
    #[error("mls: {0}")]
    Mls(String),
}

/// Maps any openmls error into [`E2eError::Mls`] with its message.
pub(crate) fn mls<E: std::fmt::Display>(e: E) -> E2eError {
    E2eError::Mls(e.to_string())
}
