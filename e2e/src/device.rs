//! A device: its identity, its groups, its state file.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};

use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::mls;
use crate::store::{self, StoreKey, SALT_BYTES};
use crate::{
    safety_number, Commit, E2eError, KeyPackageOut, Member, Outgoing, Stored,
    HISTORY_MESSAGES_PER_CHAT_MAX, KEY_PACKAGES_PER_CALL_MAX, KEY_PACKAGE_LIFETIME_SECS_MAX,
    PAST_EPOCHS_KEPT_MAX, SENT_REMEMBERED_PER_CHAT_MAX,
};

/// The one ciphersuite of chatd's E2E chats.
pub(crate) const CIPHERSUITE: Ciphersuite =
    Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
/// Longest user or device name, in bytes.
pub const NAME_BYTES_MAX: usize = 256;
/// Longest chat id, in bytes (it is the MLS group id).
pub const CHAT_ID_BYTES_MAX: usize = 256;

/// What the device keeps per chat, beside openmls's group state.
#[derive(Default, Serialize, Deserialize)]
pub(crate) struct ChatState {
    /// The highest log seq processed.
    pub(crate) processed_seq: u64,
    /// The epoch this device joined the group at (0 for its creator).
    pub(crate) joined_epoch: u64,
    /// Our commit waiting for the log (or the server's refusal).
    pub(crate) pending: Option<PendingCommit>,
    /// Our application messages not yet seen back in the log (oldest first).
    pub(crate) sent: VecDeque<Sent>,
    /// Decrypted messages (ascending seq).
    pub(crate) history: VecDeque<Stored>,
}

#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct PendingCommit {
    pub(crate) data: Vec<u8>,
    pub(crate) welcome: Option<Vec<u8>>,
    pub(crate) epoch: u64,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct Sent {
    /// SHA-256 of the MLS message's bytes.
    pub(crate) hash: [u8; 32],
    pub(crate) plaintext: Vec<u8>,
}

/// The state as written (borrowed) ...
#[derive(Serialize)]
struct PersistedRef<'a> {
    user: &'a str,
    device: &'a str,
    signer: &'a SignatureKeyPair,
    storage: Vec<(&'a Vec<u8>, &'a Vec<u8>)>,
    chats: &'a BTreeMap<String, ChatState>,
}

/// ... and as read (owned). The two must stay field-for-field the same.
#[derive(Deserialize)]
struct Persisted {
    user: String,
    device: String,
    signer: SignatureKeyPair,
    storage: Vec<(Vec<u8>, Vec<u8>)>,
    chats: BTreeMap<String, ChatState>,
}

/// One device of one user: its signature key, its MLS groups (one per E2E chat) and what
/// it decrypted, kept in one encrypted state file. See the crate docs.
pub struct Device {
    pub(crate) path: PathBuf,
    pub(crate) key: StoreKey,
    pub(crate) salt: [u8; SALT_BYTES],
    pub(crate) user: String,
    pub(crate) device: String,
    pub(crate) signer: SignatureKeyPair,
    pub(crate) provider: OpenMlsRustCrypto,
    pub(crate) groups: BTreeMap<String, MlsGroup>,
    pub(crate) chats: BTreeMap<String, ChatState>,
    pub(crate) history_max: usize,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("path", &self.path)
            .field("user", &self.user)
            .field("device", &self.device)
            .field("chats", &self.groups.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn check_name(what: &str, name: &str) -> Result<(), E2eError> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX || name.contains('/') {
        return Err(E2eError::InvalidInput(format!(
            "{what} {name:?}: must be 1..={NAME_BYTES_MAX} bytes without '/'"
        )));
    }
    Ok(())
}

fn check_chat(chat: &str) -> Result<(), E2eError> {
    if chat.is_empty() || chat.len() > CHAT_ID_BYTES_MAX {
        return Err(E2eError::InvalidInput(format!(
            "chat id {chat:?}: must be 1..={CHAT_ID_BYTES_MAX} bytes"
        )));
    }
    Ok(())
}

/// The leaf capabilities of our KeyPackages and leaves: openmls's defaults plus the
/// last-resort extension (a KeyPackage may carry only extensions its leaf lists).
fn capabilities() -> Capabilities {
    Capabilities::builder()
        .extensions(vec![ExtensionType::LastResort])
        .build()
}

pub(crate) fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(true)
        .max_past_epochs(PAST_EPOCHS_KEPT_MAX)
        .build()
}

/// `("user", "device")` of a BasicCredential whose identity is `"user/device"`.
pub(crate) fn identity(credential: &Credential) -> Option<(String, String)> {
    let basic = BasicCredential::try_from(credential.clone()).ok()?;
    let s = std::str::from_utf8(basic.identity()).ok()?;
    let (user, device) = s.split_once('/')?;
    if user.is_empty() || device.is_empty() {
        return None;
    }
    Some((user.to_string(), device.to_string()))
}

/// `"user/device"` of a credential, or a printable stand-in for a foreign one.
pub(crate) fn identity_string(credential: &Credential) -> String {
    match BasicCredential::try_from(credential.clone()) {
        Ok(basic) => String::from_utf8_lossy(basic.identity()).into_owned(),
        Err(_) => "<non-basic credential>".to_string(),
    }
}

/// The group of `chat`, ready for a new commit: we are a member, no commit is pending.
fn group_for_commit<'a>(
    groups: &'a mut BTreeMap<String, MlsGroup>,
    chats: &BTreeMap<String, ChatState>,
    chat: &str,
) -> Result<&'a mut MlsGroup, E2eError> {
    if chats.get(chat).is_some_and(|c| c.pending.is_some()) {
        return Err(E2eError::PendingCommit(chat.to_string()));
    }
    let group = groups
        .get_mut(chat)
        .ok_or_else(|| E2eError::NoGroup(chat.to_string()))?;
    if !group.is_active() {
        return Err(E2eError::NotMember(chat.to_string()));
    }
    Ok(group)
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

impl Device {
    /// Makes a new device identity (Ed25519 signature key, BasicCredential `"user/device"`)
    /// and writes its state file, which must not exist yet.
    pub fn create(
        path: &Path,
        key: &StoreKey,
        user: &str,
        device: &str,
    ) -> Result<Device, E2eError> {
        check_name("user", user)?;
        check_name("device", device)?;
        if path.exists() {
            return Err(E2eError::AlreadyExists(format!(
                "state file {}",
                path.display()
            )));
        }
        let signer = SignatureKeyPair::new(SignatureScheme::ED25519).map_err(mls)?;
        let mut dev = Device {
            path: path.to_path_buf(),
            key: key.duplicate(),
            salt: key.salt().unwrap_or_else(StoreKey::new_salt),
            user: user.to_string(),
            device: device.to_string(),
            signer,
            provider: OpenMlsRustCrypto::default(),
            groups: BTreeMap::new(),
            chats: BTreeMap::new(),
            history_max: HISTORY_MESSAGES_PER_CHAT_MAX,
        };
        dev.save()?;
        Ok(dev)
    }

    /// Opens an existing state file. A wrong key or changed bytes ([`E2eError::BadKey`]),
    /// a file that is not a state file ([`E2eError::Corrupt`]) or one over
    /// [`crate::STATE_FILE_BYTES_MAX`] ([`E2eError::TooLarge`]) are errors; the file is never
    /// written by opening.
    pub fn open(path: &Path, key: &StoreKey) -> Result<Device, E2eError> {
        let bytes = store::read_file(path)?;
        let (salt, plain) = store::open_bytes(key, &bytes)?;
        // chatd's one codec: a version byte, bincode 2, bounded, every byte consumed.
        let state: Persisted = chatd_codec::decode(&plain)
            .map_err(|e| E2eError::Corrupt(format!("state does not decode: {e}")))?;
        let provider = OpenMlsRustCrypto::default();
        {
            let mut values = provider
                .storage()
                .values
                .write()
                .map_err(|_| E2eError::Mls("storage lock poisoned".into()))?;
            *values = state.storage.into_iter().collect::<HashMap<_, _>>();
        }
        let mut groups = BTreeMap::new();
        for chat in state.chats.keys() {
            let group = MlsGroup::load(provider.storage(), &GroupId::from_slice(chat.as_bytes()))
                .map_err(|e| E2eError::Corrupt(format!("group of chat {chat:?}: {e}")))?;
            if let Some(group) = group {
                groups.insert(chat.clone(), group);
            }
        }
        Ok(Device {
            path: path.to_path_buf(),
            key: key.duplicate(),
            salt,
            user: state.user,
            device: state.device,
            signer: state.signer,
            provider,
            groups,
            chats: state.chats,
            history_max: HISTORY_MESSAGES_PER_CHAT_MAX,
        })
    }

    /// Writes the state file atomically (temporary file, fsync, rename, fsync of the
    /// directory; mode 0600), encrypted under a fresh nonce.
    pub fn save(&mut self) -> Result<(), E2eError> {
        let plain = {
            let values = self
                .provider
                .storage()
                .values
                .read()
                .map_err(|_| E2eError::Mls("storage lock poisoned".into()))?;
            let mut storage: Vec<(&Vec<u8>, &Vec<u8>)> = values.iter().collect();
            storage.sort();
            let state = PersistedRef {
                user: &self.user,
                device: &self.device,
                signer: &self.signer,
                storage,
                chats: &self.chats,
            };
            Zeroizing::new(
                chatd_codec::encode(&state)
                    .map_err(|e| E2eError::Corrupt(format!("state does not encode: {e}")))?,
            )
        };
        let file = store::seal(&self.key, &self.salt, &plain)?;
        store::write_atomic(&self.path, &file)
    }

    /// The user this device belongs to.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// This device's id.
    pub fn device_id(&self) -> &str {
        &self.device
    }

    /// The state file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This device's [`safety_number`].
    pub fn safety_number(&self) -> String {
        safety_number(self.signer.public())
    }

    fn credential_with_key(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(format!("{}/{}", self.user, self.device).into_bytes())
                .into(),
            signature_key: self.signer.public().into(),
        }
    }

    /// Makes `n` fresh KeyPackages (their private keys stay in the state), each valid for
    /// `lifetime_secs` (cut to [`KEY_PACKAGE_LIFETIME_SECS_MAX`]; 0 makes packages that
    /// are already expired), and with `last_resort` one more carrying MLS's last_resort
    /// extension (it is not consumed by a join, so it can be handed out many times).
    /// Saves the state before returning.
    pub fn key_packages(
        &mut self,
        n: usize,
        lifetime_secs: u64,
        last_resort: bool,
    ) -> Result<Vec<KeyPackageOut>, E2eError> {
        let total = n + usize::from(last_resort);
        if total > KEY_PACKAGES_PER_CALL_MAX {
            return Err(E2eError::InvalidInput(format!(
                "{total} key packages asked, at most {KEY_PACKAGES_PER_CALL_MAX} per call"
            )));
        }
        let lifetime = lifetime_secs.min(KEY_PACKAGE_LIFETIME_SECS_MAX);
        let mut out = Vec::with_capacity(total);
        for i in 0..total {
            let is_last_resort = i == n;
            let mut builder = KeyPackage::builder()
                .key_package_lifetime(Lifetime::new(lifetime))
                .leaf_node_capabilities(capabilities());
            if is_last_resort {
                builder = builder.mark_as_last_resort();
            }
            let bundle = builder
                .build(
                    CIPHERSUITE,
                    &self.provider,
                    &self.signer,
                    self.credential_with_key(),
                )
                .map_err(mls)?;
            let kp = bundle.key_package();
            let expires_ms = kp.life_time().not_after().saturating_mul(1000);
            let data = MlsMessageOut::from(kp.clone()).to_bytes().map_err(mls)?;
            out.push(KeyPackageOut {
                data,
                expires_ms,
                last_resort: is_last_resort,
            });
        }
        self.save()?;
        Ok(out)
    }

    /// Creates the MLS group of `chat` (group id = the chat id's bytes) at epoch 0 with this
    /// device as its only member. Saves the state.
    pub fn create_group(&mut self, chat: &str) -> Result<(), E2eError> {
        check_chat(chat)?;
        if self.groups.contains_key(chat) {
            return Err(E2eError::AlreadyExists(format!("group of chat {chat:?}")));
        }
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
            .use_ratchet_tree_extension(true)
            .max_past_epochs(PAST_EPOCHS_KEPT_MAX)
            .capabilities(capabilities())
            .build();
        let group = MlsGroup::new_with_group_id(
            &self.provider,
            &self.signer,
            &config,
            GroupId::from_slice(chat.as_bytes()),
            self.credential_with_key(),
        )
        .map_err(mls)?;
        self.groups.insert(chat.to_string(), group);
        let state = self.chats.entry(chat.to_string()).or_default();
        state.pending = None;
        state.joined_epoch = 0;
        self.save()
    }

    /// Whether this device has a group for `chat` (also one it was removed from).
    pub fn has_group(&self, chat: &str) -> bool {
        self.groups.contains_key(chat)
    }

    /// Whether this device is an active member of `chat`'s group (not removed).
    pub fn is_member(&self, chat: &str) -> bool {
        self.groups.get(chat).is_some_and(|g| g.is_active())
    }

    /// The group's current epoch.
    pub fn epoch(&self, chat: &str) -> Option<u64> {
        self.groups.get(chat).map(|g| g.epoch().as_u64())
    }

    /// The group's members, in leaf order (empty without a group).
    pub fn members(&self, chat: &str) -> Vec<Member> {
        let Some(group) = self.groups.get(chat) else {
            return Vec::new();
        };
        group
            .members()
            .map(|m| {
                let (user, device) = identity(&m.credential)
                    .unwrap_or_else(|| (identity_string(&m.credential), String::new()));
                Member {
                    user,
                    device,
                    safety_number: safety_number(&m.signature_key),
                }
            })
            .collect()
    }

    /// Parses and verifies one uploaded KeyPackage.
    fn validate_key_package(&self, bytes: &[u8]) -> Result<KeyPackage, E2eError> {
        let msg = crate::process::parse_mls_message(bytes)
            .map_err(|e| E2eError::BadKeyPackage(format!("does not parse: {e}")))?;
        let MlsMessageBodyIn::KeyPackage(kp) = msg.extract() else {
            return Err(E2eError::BadKeyPackage("not a key package message".into()));
        };
        let kp = kp
            .validate(self.provider.crypto(), ProtocolVersion::Mls10)
            .map_err(|e| E2eError::BadKeyPackage(e.to_string()))?;
        if kp.ciphersuite() != CIPHERSUITE {
            return Err(E2eError::BadKeyPackage(format!(
                "ciphersuite {:?}",
                kp.ciphersuite()
            )));
        }
        if identity(kp.leaf_node().credential()).is_none() {
            return Err(E2eError::BadKeyPackage(format!(
                "credential {:?} is not \"user/device\"",
                identity_string(kp.leaf_node().credential())
            )));
        }
        if kp.leaf_node().signature_key().as_slice() == self.signer.public() {
            return Err(E2eError::BadKeyPackage(
                "this device's own key package".into(),
            ));
        }
        Ok(kp)
    }

    fn set_pending(&mut self, chat: &str, commit: &Commit) -> Result<(), E2eError> {
        self.chats.entry(chat.to_string()).or_default().pending = Some(PendingCommit {
            data: commit.data.clone(),
            welcome: commit.welcome.clone(),
            epoch: commit.epoch,
        });
        self.save()
    }

    /// A commit adding the devices of these KeyPackages (as uploaded: MLS messages of wire
    /// format key package), each verified first. The commit stays pending until the log
    /// shows it ([`Device::process`]) or the server refuses it ([`Device::discard_pending`]).
    /// Saves the state.
    pub fn add(&mut self, chat: &str, key_packages: &[Vec<u8>]) -> Result<Commit, E2eError> {
        if key_packages.is_empty() {
            return Err(E2eError::InvalidInput("no key packages to add".into()));
        }
        group_for_commit(&mut self.groups, &self.chats, chat)?;
        let kps = key_packages
            .iter()
            .map(|b| self.validate_key_package(b))
            .collect::<Result<Vec<_>, _>>()?;
        let group = group_for_commit(&mut self.groups, &self.chats, chat)?;
        let epoch = group.epoch().as_u64();
        let (commit, welcome, _group_info) = group
            .add_members(&self.provider, &self.signer, &kps)
            .map_err(|e| E2eError::BadKeyPackage(format!("add refused: {e}")))?;
        let commit = Commit {
            data: commit.to_bytes().map_err(mls)?,
            welcome: Some(welcome.to_bytes().map_err(mls)?),
            epoch,
        };
        self.set_pending(chat, &commit)?;
        Ok(commit)
    }

    /// A commit removing every other device whose credential matches one of `users`: a
    /// plain user name matches all of that user's devices, `"user/device"` exactly one.
    /// This device never removes itself. Pending like [`Device::add`]; saves the state.
    pub fn remove(&mut self, chat: &str, users: &[String]) -> Result<Commit, E2eError> {
        let group = group_for_commit(&mut self.groups, &self.chats, chat)?;
        let own = group.own_leaf_index();
        let targets: Vec<LeafNodeIndex> = group
            .members()
            .filter(|m| m.index != own)
            .filter(|m| {
                let id = identity_string(&m.credential);
                let user = id.split_once('/').map_or(id.as_str(), |(u, _)| u);
                users
                    .iter()
                    .any(|u| if u.contains('/') { *u == id } else { u == user })
            })
            .map(|m| m.index)
            .collect();
        if targets.is_empty() {
            return Err(E2eError::NothingToRemove);
        }
        let epoch = group.epoch().as_u64();
        let (commit, welcome, _group_info) = group
            .remove_members(&self.provider, &self.signer, &targets)
            .map_err(mls)?;
        let commit = Commit {
            data: commit.to_bytes().map_err(mls)?,
            welcome: welcome.map(|w| w.to_bytes()).transpose().map_err(mls)?,
            epoch,
        };
        self.set_pending(chat, &commit)?;
        Ok(commit)
    }

    /// A commit with no proposals: a fresh leaf key for this device and a new epoch secret
    /// for the group. Pending like [`Device::add`]; saves the state.
    pub fn update(&mut self, chat: &str) -> Result<Commit, E2eError> {
        let group = group_for_commit(&mut self.groups, &self.chats, chat)?;
        let epoch = group.epoch().as_u64();
        let bundle = group
            .self_update(&self.provider, &self.signer, LeafNodeParameters::default())
            .map_err(mls)?;
        let commit = Commit {
            data: bundle.commit().to_bytes().map_err(mls)?,
            welcome: bundle
                .to_welcome_msg()
                .map(|w| w.to_bytes())
                .transpose()
                .map_err(mls)?,
            epoch,
        };
        self.set_pending(chat, &commit)?;
        Ok(commit)
    }

    /// Forgets the pending commit: the server refused it (another commit took its epoch).
    /// Call this only on a definite refusal: a commit that reached the log after all is
    /// then one this device cannot follow (openmls cannot decrypt its own commits). Does
    /// not save; call [`Device::save`].
    pub fn discard_pending(&mut self, chat: &str) {
        if let Some(state) = self.chats.get_mut(chat) {
            state.pending = None;
        }
        if let Some(group) = self.groups.get_mut(chat) {
            // MemoryStorage's writes cannot fail; the group state in memory is cleared anyway.
            let _ = group.clear_pending_commit(self.provider.storage());
        }
    }

    /// The commit waiting for the log, if any.
    pub fn pending_commit(&self, chat: &str) -> Option<Commit> {
        let p = self.chats.get(chat)?.pending.as_ref()?;
        Some(Commit {
            data: p.data.clone(),
            welcome: p.welcome.clone(),
            epoch: p.epoch,
        })
    }

    /// Encrypts an application message in the current epoch. The plaintext is remembered
    /// (by the SHA-256 of the message) until [`Device::process`] sees the message in the
    /// log, where it yields [`crate::Event::Message`] like anyone else's. Saves the state.
    pub fn encrypt(&mut self, chat: &str, plaintext: &[u8]) -> Result<Outgoing, E2eError> {
        let group = self
            .groups
            .get_mut(chat)
            .ok_or_else(|| E2eError::NoGroup(chat.to_string()))?;
        if !group.is_active() {
            return Err(E2eError::NotMember(chat.to_string()));
        }
        let epoch = group.epoch().as_u64();
        let msg = group
            .create_message(&self.provider, &self.signer, plaintext)
            .map_err(mls)?;
        let data = msg.to_bytes().map_err(mls)?;
        let state = self.chats.entry(chat.to_string()).or_default();
        state.sent.push_back(Sent {
            hash: sha256(&data),
            plaintext: plaintext.to_vec(),
        });
        while state.sent.len() > SENT_REMEMBERED_PER_CHAT_MAX {
            state.sent.pop_front();
        }
        self.save()?;
        Ok(Outgoing { data, epoch })
    }

    /// The highest log seq of `chat` processed (0 before any).
    pub fn processed_seq(&self, chat: &str) -> u64 {
        self.chats.get(chat).map_or(0, |c| c.processed_seq)
    }

    /// The decrypted history of `chat` on this device, ascending seq (at most
    /// [`HISTORY_MESSAGES_PER_CHAT_MAX`] messages: the newest).
    pub fn history(&self, chat: &str) -> Vec<Stored> {
        self.chats
            .get(chat)
            .map(|c| c.history.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The chats this device has a group for, sorted.
    pub fn chats(&self) -> Vec<String> {
        self.groups.keys().cloned().collect()
    }

    /// Appends a decrypted message to the chat's history, dropping the oldest over the cap.
    pub(crate) fn remember(&mut self, chat: &str, stored: Stored) {
        let max = self.history_max;
        let state = self.chats.entry(chat.to_string()).or_default();
        state.history.push_back(stored);
        while state.history.len() > max {
            state.history.pop_front();
        }
    }

    /// Test-only: a smaller history cap.
    #[cfg(test)]
    pub(crate) fn set_history_max(&mut self, max: usize) {
        self.history_max = max;
    }
}
