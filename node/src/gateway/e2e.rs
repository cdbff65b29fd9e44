//! The E2E frames (docs/protocol.md §20): creating an E2E chat, storing opaque MLS
//! messages in its log, and the KeyPackages of each user's devices. The gateway checks
//! ids, sizes and base64; the chat state machine (`chatd_chat::e2e`) checks everything that
//! depends on state (membership, the epoch, the per-device bounds). Nothing here decrypts.

use base64::Engine as _;
use chatd_chat::e2e::{E2eMessage, KeyPackage, KeyPackageBounds, MlsKind};
use chatd_proto::e2e as limits;
use chatd_proto::{ClaimedKeyPackage, DeviceView, KeyPackageUpload};

use super::handlers::{acked, check_users, index_chat, propose_chat, propose_error};
use super::*;

/// The bounds every KeyPackage command and read is applied with.
pub(crate) const KEY_PACKAGE_BOUNDS: KeyPackageBounds = KeyPackageBounds {
    per_device_max: limits::KEY_PACKAGES_PER_DEVICE_MAX as u64,
    devices_max: limits::DEVICES_PER_USER_MAX as u64,
};

/// The bytes of `b64` if it is standard base64 of 1 to `max` bytes.
fn decoded_len(b64: &str, max: usize, what: &str) -> Result<usize, String> {
    // Checked before decoding, so an oversized field costs no allocation.
    if b64.len() > max.div_ceil(3) * 4 {
        return Err(format!("{what} larger than {max} bytes"));
    }
    match base64::engine::general_purpose::STANDARD.decode(b64) {
        Ok(b) if b.is_empty() => Err(format!("{what} is empty")),
        Ok(b) if b.len() > max => Err(format!("{what} larger than {max} bytes")),
        Ok(b) => Ok(b.len()),
        Err(e) => Err(format!("{what} is not standard base64: {e}")),
    }
}

fn device_ok(d: &str) -> bool {
    valid_id(d, limits::DEVICE_ID_BYTES_MAX)
}

fn devices_frame(id: String, user: &str, devices: Vec<chatd_chat::e2e::DeviceInfo>) -> ServerFrame {
    ServerFrame::Devices {
        id,
        user: user.to_string(),
        devices: devices
            .into_iter()
            .map(|d| DeviceView {
                device: d.device,
                available: d.available,
                last_resort: d.last_resort,
            })
            .collect(),
    }
}

/// The KeyPackage writes share the sender's send bucket (`send_rate_per_sec`).
fn rate_limited(id: String) -> ServerFrame {
    err(Some(id), code::RATE_LIMITED, "rate limit: slow down")
}

fn unexpected(id: String, other: impl std::fmt::Debug) -> ServerFrame {
    err(
        Some(id),
        code::INTERNAL,
        format!("unexpected reply {other:?}"),
    )
}

/// Handles an E2E frame (the others never reach here: answered `internal`).
pub(super) async fn handle(node: &Node, user: &str, frame: ClientFrame) -> ServerFrame {
    match frame {
        ClientFrame::CreateE2e { id, name, direct } => {
            if name.len() > 128 {
                return err(Some(id), code::INVALID_FIELD, "name longer than 128 bytes");
            }
            let chat = format!("e:{:016x}", rand::random::<u64>());
            let cmd = ChatCommand::CreateE2e {
                chat: chat.clone(),
                creator: user.to_string(),
                name,
                direct,
                ts: now_ms(),
            };
            match propose_chat(node, chat_group(node, &chat), &cmd).await {
                Ok(ChatReply::Done { seq }) => {
                    index_chat(node, &chat, &[user.to_string()]).await;
                    ServerFrame::Done { id, chat, seq }
                }
                Ok(ChatReply::Rejected { code, message }) => err(Some(id), &code, message),
                Ok(other) => unexpected(id, other),
                Err(e) => propose_error(Some(id), e),
            }
        }
        ClientFrame::E2eSend {
            id,
            chat,
            client_msg_id,
            kind,
            epoch,
            data,
            welcome,
            add,
            remove,
            files,
        } => {
            e2e_send(
                node,
                user,
                id,
                E2eMessage {
                    chat,
                    sender: user.to_string(),
                    client_msg_id,
                    kind: MlsKind::Application,
                    epoch,
                    data,
                    welcome,
                    add,
                    remove,
                    files: Vec::new(),
                    members_max: limits::GROUP_MEMBERS_MAX,
                    ts: 0,
                    dedup_window_ms: node.gateway.config.dedup_window_ms,
                },
                &kind,
                files,
            )
            .await
        }
        ClientFrame::KeyPackagesUpload {
            id,
            device,
            packages,
            last_resort,
        } => {
            if !device_ok(&device) {
                return err(
                    Some(id),
                    code::INVALID_FIELD,
                    "device must be 1-32 of A-Z a-z 0-9 _ . : -",
                );
            }
            if packages.len() > limits::KEY_PACKAGES_PER_UPLOAD_MAX {
                return err(
                    Some(id),
                    code::TOO_LARGE,
                    format!(
                        "{} KeyPackages; one upload carries {} at most",
                        packages.len(),
                        limits::KEY_PACKAGES_PER_UPLOAD_MAX
                    ),
                );
            }
            if packages.is_empty() && last_resort.is_none() {
                return err(Some(id), code::INVALID_FIELD, "no KeyPackage to store");
            }
            if !node.gateway.take_send_token(user) {
                return rate_limited(id);
            }
            let now = now_ms();
            let check = |p: KeyPackageUpload| -> Result<KeyPackage, (&'static str, String)> {
                decoded_len(&p.data, limits::KEY_PACKAGE_BYTES_MAX, "KeyPackage")
                    .map_err(|m| (code::INVALID_FIELD, m))?;
                if p.expires <= now || p.expires > now + limits::KEY_PACKAGE_LIFETIME_MS_MAX {
                    return Err((
                        code::INVALID_FIELD,
                        "expires must be in the future, within 90 days".into(),
                    ));
                }
                Ok(KeyPackage {
                    data: p.data,
                    expires_ms: p.expires,
                })
            };
            let packages: Result<Vec<KeyPackage>, _> = packages.into_iter().map(check).collect();
            let last_resort = last_resort.map(check).transpose();
            let (packages, last_resort) = match (packages, last_resort) {
                (Ok(p), Ok(l)) => (p, l),
                (Err((c, m)), _) | (_, Err((c, m))) => return err(Some(id), c, m),
            };
            let cmd = ChatCommand::KeyPackagesPut {
                user: user.to_string(),
                device,
                packages,
                last_resort,
                bounds: KEY_PACKAGE_BOUNDS,
                ts: now,
            };
            match propose_chat(node, user_group(node, user), &cmd).await {
                Ok(ChatReply::Devices(d)) => devices_frame(id, user, d),
                Ok(ChatReply::Rejected { code, message }) => err(Some(id), &code, message),
                Ok(other) => unexpected(id, other),
                Err(e) => propose_error(Some(id), e),
            }
        }
        ClientFrame::KeyPackagesClaim { id, user: owner } => {
            if let Err((c, m)) = check_users(node, std::slice::from_ref(&owner)).await {
                return err(Some(id), &c, m);
            }
            // Each claim is a write (and takes a KeyPackage): bounded like sends.
            if !node.gateway.take_send_token(user) {
                return rate_limited(id);
            }
            let cmd = ChatCommand::KeyPackagesClaim {
                user: owner.clone(),
                bounds: KEY_PACKAGE_BOUNDS,
                ts: now_ms(),
            };
            match propose_chat(node, user_group(node, &owner), &cmd).await {
                Ok(ChatReply::KeyPackages(p)) => ServerFrame::KeyPackages {
                    id,
                    user: owner,
                    packages: p
                        .into_iter()
                        .map(|(device, data)| ClaimedKeyPackage { device, data })
                        .collect(),
                },
                Ok(ChatReply::Rejected { code, message }) => err(Some(id), &code, message),
                Ok(other) => unexpected(id, other),
                Err(e) => propose_error(Some(id), e),
            }
        }
        ClientFrame::Devices { id, user: owner } => {
            if let Err((c, m)) = check_users(node, std::slice::from_ref(&owner)).await {
                return err(Some(id), &c, m);
            }
            let q = ChatQuery::Devices {
                user: owner.clone(),
                bounds: KEY_PACKAGE_BOUNDS,
                now_ms: now_ms(),
            };
            match node.query(user_group(node, &owner), q).await {
                Ok(ChatQueryReply::Devices(d)) => devices_frame(id, &owner, d),
                Ok(ChatQueryReply::Rejected { code, message }) => err(Some(id), &code, message),
                Ok(other) => unexpected(id, other),
                Err(e) => err(Some(id), code::UNAVAILABLE, e.to_string()),
            }
        }
        ClientFrame::RetireDevice { id, device } => {
            if !device_ok(&device) {
                return err(Some(id), code::INVALID_FIELD, "bad device id");
            }
            if !node.gateway.take_send_token(user) {
                return rate_limited(id);
            }
            let cmd = ChatCommand::RetireDevice {
                user: user.to_string(),
                device,
                bounds: KEY_PACKAGE_BOUNDS,
            };
            match propose_chat(node, user_group(node, user), &cmd).await {
                Ok(ChatReply::Devices(d)) => devices_frame(id, user, d),
                Ok(ChatReply::Rejected { code, message }) => err(Some(id), &code, message),
                Ok(other) => unexpected(id, other),
                Err(e) => propose_error(Some(id), e),
            }
        }
        other => err(
            other.request_id().map(str::to_owned),
            code::INTERNAL,
            "not an E2E frame",
        ),
    }
}

/// Checks and proposes an `e2e_send`; indexes the chat for the users a commit adds.
async fn e2e_send(
    node: &Node,
    user: &str,
    id: String,
    mut m: E2eMessage,
    kind: &str,
    files: Vec<chatd_proto::FileRef>,
) -> ServerFrame {
    if !valid_id(&m.chat, chatd_proto::CHAT_ID_BYTES_MAX) {
        return err(Some(id), code::INVALID_FIELD, "bad chat");
    }
    if !valid_id(&m.client_msg_id, chatd_proto::CLIENT_MSG_ID_BYTES_MAX) {
        return err(
            Some(id),
            code::INVALID_FIELD,
            "client_msg_id must be 1-64 of A-Z a-z 0-9 _ . : -",
        );
    }
    let Some(kind) = MlsKind::parse(kind) else {
        return err(
            Some(id),
            code::INVALID_FIELD,
            "kind must be application, commit or proposal",
        );
    };
    m.kind = kind;
    if let Err(e) = decoded_len(&m.data, limits::DATA_BYTES_MAX, "data") {
        return err(Some(id), code::INVALID_FIELD, e);
    }
    if let Some(w) = &m.welcome {
        if let Err(e) = decoded_len(w, limits::DATA_BYTES_MAX, "welcome") {
            return err(Some(id), code::INVALID_FIELD, e);
        }
    }
    if m.add.len() + m.remove.len() > limits::GROUP_MEMBERS_MAX {
        return err(Some(id), code::GROUP_FULL, "too many users in one commit");
    }
    if let Err((c, msg)) = check_users(node, &m.add).await {
        return err(Some(id), &c, msg);
    }
    if m.remove
        .iter()
        .any(|u| !valid_id(u, chatd_proto::USER_ID_BYTES_MAX))
    {
        return err(Some(id), code::INVALID_FIELD, "bad user id in remove");
    }
    if !node.gateway.take_send_token(user) {
        return err(Some(id), code::RATE_LIMITED, "send rate limit: slow down");
    }
    if !files.is_empty() {
        m.files = match crate::files::attachments(node, user, &m.chat, files).await {
            Ok(f) => f,
            Err((c, msg)) => return err(Some(id), &c, msg),
        };
    }
    node.gateway
        .metrics
        .messages_in
        .fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    m.ts = now_ms();
    let chat = m.chat.clone();
    let added = m.add.clone();
    let cmd = ChatCommand::E2eSend(m);
    match propose_chat(node, chat_group(node, &chat), &cmd).await {
        Ok(ChatReply::Acked { seq, ts, duplicate }) => {
            // Idempotent: a retried commit indexes again.
            if !added.is_empty() {
                index_chat(node, &chat, &added).await;
            }
            acked(node, started, id, chat, seq, ts, duplicate)
        }
        Ok(ChatReply::Rejected { code, message }) => err(Some(id), &code, message),
        Ok(other) => unexpected(id, other),
        Err(e) => propose_error(Some(id), e),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn base64_fields_are_checked_before_and_after_decoding() {
        assert_eq!(decoded_len("aGk=", 10, "data"), Ok(2));
        assert!(decoded_len("", 10, "data").unwrap_err().contains("empty"));
        assert!(decoded_len("a", 10, "data").unwrap_err().contains("base64"));
        assert!(decoded_len("aGk", 10, "data")
            .unwrap_err()
            .contains("base64"));
        // 13 bytes encode to 20 characters: over a 10-byte bound before decoding.
        let thirteen = base64::engine::general_purpose::STANDARD.encode([7u8; 13]);
        assert!(decoded_len(&thirteen, 10, "data")
            .unwrap_err()
            .contains("larger"));
        // 11 bytes: 16 characters, within the pre-check, refused after decoding.
        let eleven = base64::engine::general_purpose::STANDARD.encode([7u8; 11]);
        assert!(decoded_len(&eleven, 10, "data")
            .unwrap_err()
            .contains("larger"));
        let ten = base64::engine::general_purpose::STANDARD.encode([7u8; 10]);
        assert_eq!(decoded_len(&ten, 10, "data"), Ok(10));
    }
}
