//! The chat's log: catching up in seq order, sending MLS messages, commits retried on a
//! new epoch and split to fit a frame, members added and removed.

use base64::Engine as _;
use chatd_e2e::{Device, E2eError, Event, Kind};
use chatd_proto::{ClientFrame, ServerFrame};

use super::*;

pub(super) async fn devices(
    conn: &mut Connection,
    user: &str,
) -> Result<Vec<chatd_proto::DeviceView>, CliError> {
    let answer = conn
        .request(|id| ClientFrame::Devices {
            id,
            user: user.to_string(),
        })
        .await
        .map_err(|e| context(e, &format!("cannot list {user}'s devices")))?;
    match answer.frame {
        Some(ServerFrame::Devices { devices, .. }) => Ok(devices),
        _ => Err(CliError::Failed(format!(
            "unexpected answer {}",
            answer.raw
        ))),
    }
}

/// Tops the device's published KeyPackages up to [`KEY_PACKAGES_PUBLISHED`], with a
/// last-resort one if it has none; answers how many it published.
pub(super) async fn refresh(s: &mut Session) -> Result<usize, CliError> {
    let user = s.dev.user().to_string();
    let mine = devices(&mut s.conn, &user)
        .await?
        .into_iter()
        .find(|d| d.device == s.dev.device_id());
    let (available, last_resort) = mine.map_or((0, false), |d| (d.available, d.last_resort));
    let want = KEY_PACKAGES_PUBLISHED.saturating_sub(available as usize);
    if want == 0 && last_resort {
        return Ok(0);
    }
    let made = s
        .dev
        .key_packages(
            want,
            chatd_e2e::KEY_PACKAGE_LIFETIME_SECS_DEFAULT,
            !last_resort,
        )
        .map_err(e2e_error)?;
    let upload = |k: &chatd_e2e::KeyPackageOut| chatd_proto::KeyPackageUpload {
        data: b64(&k.data),
        expires: k.expires_ms,
    };
    let packages: Vec<_> = made.iter().filter(|k| !k.last_resort).map(upload).collect();
    let last = made.iter().find(|k| k.last_resort).map(upload);
    let n = packages.len() + usize::from(last.is_some());
    s.conn
        .request(|id| ClientFrame::KeyPackagesUpload {
            id,
            device: s.dev.device_id().to_string(),
            packages,
            last_resort: last,
        })
        .await
        .map_err(|e| context(e, "cannot publish KeyPackages"))?;
    Ok(n)
}

/// Reads `chat`'s log after what the device processed and feeds it in order; saves.
/// Answers the events.
pub(super) async fn catch_up(s: &mut Session, chat: &str) -> Result<Vec<Event>, CliError> {
    let after = s.dev.processed_seq(chat);
    let (entries, _) =
        crate::messaging::read_history(&mut s.conn, chat, None, Some(after), None).await?;
    let mut events = Vec::new();
    for m in entries {
        let Some(kind) = m.kind.strip_prefix("mls_").and_then(Kind::parse) else {
            continue;
        };
        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(&m.text) else {
            // Not what a client sent (the server checks base64): skip it.
            continue;
        };
        events.push(
            s.dev
                .process(chat, m.seq, &m.sender, kind, &bytes, m.ts)
                .map_err(e2e_error)?,
        );
    }
    s.dev.save().map_err(e2e_error)?;
    Ok(events)
}

pub(super) enum SendError {
    /// Another commit won the epoch.
    Stale,
    Other(CliError),
}

/// Sends one `e2e_send`, retrying a lost connection or `unavailable`/`outcome_unknown`
/// with the same `client_msg_id` and bytes; answers the ack's seq.
#[allow(clippy::too_many_arguments)]
pub(super) async fn e2e_send(
    s: &mut Session,
    chat: &str,
    kind: &str,
    epoch: u64,
    data: &[u8],
    welcome: Option<&[u8]>,
    add: &[String],
    remove: &[String],
    files: Vec<chatd_proto::FileRef>,
) -> Result<u64, SendError> {
    let client_msg_id = ws::new_client_msg_id();
    let (data, welcome) = (b64(data), welcome.map(b64));
    let mut last = None;
    for attempt in 1..=SEND_ATTEMPTS_MAX {
        if attempt > 1 {
            tokio::time::sleep(std::time::Duration::from_millis(250 << (attempt - 2))).await;
        }
        let answer = s
            .conn
            .request_raw(|id| ClientFrame::E2eSend {
                id,
                chat: chat.to_string(),
                client_msg_id: client_msg_id.clone(),
                kind: kind.to_string(),
                epoch,
                data: data.clone(),
                welcome: welcome.clone(),
                add: add.to_vec(),
                remove: remove.to_vec(),
                files: files.clone(),
            })
            .await;
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        if let Some((code, message)) = answer.error() {
            use chatd_proto::code;
            if code == code::STALE_EPOCH {
                return Err(SendError::Stale);
            }
            let e = context(
                ws::refused(code, message),
                &format!("cannot send to {chat}"),
            );
            if matches!(
                code,
                code::RATE_LIMITED | code::UNAVAILABLE | code::OUTCOME_UNKNOWN
            ) {
                last = Some(e);
                continue;
            }
            return Err(SendError::Other(e));
        }
        return match answer.frame {
            Some(ServerFrame::Ack { seq, .. }) => Ok(seq),
            _ => Err(SendError::Other(CliError::Failed(format!(
                "unexpected answer {}",
                answer.raw
            )))),
        };
    }
    Err(SendError::Other(last.unwrap_or_else(|| {
        CliError::Failed(format!("cannot send to {chat}"))
    })))
}

/// Builds a commit with `make` on the device's current epoch and sends it with the
/// server-side member changes; on `stale_epoch` catches up and builds it again.
pub(super) async fn commit(
    s: &mut Session,
    chat: &str,
    make: impl Fn(&mut Device) -> Result<chatd_e2e::Commit, E2eError>,
    add: &[String],
    remove: &[String],
) -> Result<u64, CommitError> {
    for _ in 0..COMMIT_ATTEMPTS_MAX {
        catch_up(s, chat).await?;
        if !s.dev.has_group(chat) {
            return Err(CliError::Failed(format!("this device is not in {chat}'s group")).into());
        }
        // A commit of an earlier run that never reached the log (or it would have been
        // merged by the catch-up) is dropped.
        if s.dev.pending_commit(chat).is_some() {
            s.dev.discard_pending(chat);
        }
        let c = make(&mut s.dev).map_err(e2e_error)?;
        if !fits_in_a_frame(&c) {
            s.dev.discard_pending(chat);
            s.dev.save().map_err(e2e_error)?;
            return Err(CommitError::TooLarge);
        }
        if let Some(ms) = std::env::var(TEST_COMMIT_DELAY_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            // Tests widen the window in which another member's commit wins the epoch.
            tokio::time::sleep(std::time::Duration::from_millis(ms.min(60_000))).await;
        }
        match e2e_send(
            s,
            chat,
            "commit",
            c.epoch,
            &c.data,
            c.welcome.as_deref(),
            add,
            remove,
            Vec::new(),
        )
        .await
        {
            Ok(seq) => {
                catch_up(s, chat).await?;
                if s.dev.epoch(chat) != Some(c.epoch + 1) {
                    return Err(CliError::Failed(format!(
                        "the commit at seq {seq} was stored but this device did not apply it"
                    ))
                    .into());
                }
                return Ok(seq);
            }
            Err(SendError::Stale) => {
                eprintln!(
                    "chat-cli: another member's commit won epoch {} of {chat}; committing again on the next",
                    c.epoch
                );
                s.dev.discard_pending(chat);
                s.dev.save().map_err(e2e_error)?;
            }
            Err(SendError::Other(e)) => return Err(e.into()),
        }
    }
    Err(CliError::Failed(format!(
        "{COMMIT_ATTEMPTS_MAX} commits to {chat} lost their epoch to others; try again"
    ))
    .into())
}

/// Why a commit was not stored.
pub(super) enum CommitError {
    /// The commit and its welcome do not fit in one frame: add fewer devices at once.
    TooLarge,
    Cli(CliError),
}

impl From<CliError> for CommitError {
    fn from(e: CliError) -> Self {
        CommitError::Cli(e)
    }
}

impl From<CommitError> for CliError {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::TooLarge => CliError::Failed(
                "the commit and its welcome do not fit in one frame (64 KiB)".into(),
            ),
            CommitError::Cli(e) => e,
        }
    }
}

/// Whether a commit's `e2e_send` is within the protocol's bounds (base64 of each part, the
/// whole frame with room for its other fields).
pub(super) fn fits_in_a_frame(c: &chatd_e2e::Commit) -> bool {
    use chatd_proto::e2e::DATA_BYTES_MAX;
    let welcome = c.welcome.as_ref().map_or(0, Vec::len);
    let b64_len = |n: usize| n.div_ceil(3) * 4;
    c.data.len() <= DATA_BYTES_MAX
        && welcome <= DATA_BYTES_MAX
        && b64_len(c.data.len()) + b64_len(welcome) + COMMIT_FRAME_OVERHEAD_BYTES
            <= chatd_proto::FRAME_BYTES_MAX
}

/// The current members of `chat` on the server.
pub(super) async fn server_members(s: &mut Session, chat: &str) -> Result<Vec<String>, CliError> {
    let answer = s
        .conn
        .request(|id| ClientFrame::Cursors {
            id,
            chat: chat.to_string(),
        })
        .await
        .map_err(|e| context(e, &format!("cannot read {chat}'s members")))?;
    match answer.frame {
        Some(ServerFrame::Cursors { cursors, .. }) => {
            Ok(cursors.into_iter().map(|c| c.user).collect())
        }
        _ => Err(CliError::Failed(format!(
            "unexpected answer {}",
            answer.raw
        ))),
    }
}

/// Commits the removal of group members who are no longer members on the server (they
/// left): nothing is sent to a chat whose group still holds someone who left.
pub(super) async fn remove_departed(s: &mut Session, chat: &str) -> Result<(), CliError> {
    // The caller (`send`) has just caught up: the group is as the log says.
    let current = server_members(s, chat).await?;
    let mut gone: Vec<String> = s
        .dev
        .members(chat)
        .into_iter()
        .map(|m| m.user)
        .filter(|u| !current.contains(u))
        .collect();
    gone.sort();
    gone.dedup();
    if gone.is_empty() {
        return Ok(());
    }
    let users = gone.clone();
    commit(s, chat, move |d| d.remove(chat, &users), &[], &[]).await?;
    Ok(())
}

pub(super) async fn add(s: &mut Session, chat: &str, users: &[String]) -> Result<u64, CliError> {
    catch_up(s, chat).await?;
    // Devices in the group already (this one among them) are not added again: adding a
    // user adds its devices that are not in yet.
    let present: std::collections::HashSet<String> = s
        .dev
        .members(chat)
        .into_iter()
        .map(|m| format!("{}/{}", m.user, m.device))
        .chain([format!("{}/{}", s.dev.user(), s.dev.device_id())])
        .collect();
    let mut packages = Vec::new();
    for user in users {
        let answer = s
            .conn
            .request(|id| ClientFrame::KeyPackagesClaim {
                id,
                user: user.clone(),
            })
            .await
            .map_err(|e| context(e, &format!("cannot claim {user}'s KeyPackages")))?;
        let Some(ServerFrame::KeyPackages { packages: got, .. }) = answer.frame else {
            return Err(CliError::Failed(format!(
                "unexpected answer {}",
                answer.raw
            )));
        };
        if got.is_empty() {
            return Err(CliError::Failed(format!(
                "{user} has no E2E device with a KeyPackage (they run `chat-cli e2e init`)"
            )));
        }
        for p in got {
            if present.contains(&format!("{user}/{}", p.device)) {
                continue;
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(&p.data)
                .map_err(|e| {
                    CliError::Failed(format!("{user}/{}: bad KeyPackage: {e}", p.device))
                })?;
            packages.push((user.clone(), bytes));
        }
    }
    if packages.is_empty() {
        return Err(CliError::Failed(format!(
            "every device of {} is in {chat} already",
            users.join(", ")
        )));
    }
    // As many devices per commit as fit in a frame with the welcome (which carries the
    // whole ratchet tree): all at once, else halves, and so on.
    let mut batch = packages.len();
    let mut done = 0;
    let mut last_seq = 0;
    while done < packages.len() {
        let part = &packages[done..(done + batch).min(packages.len())];
        let kps: Vec<Vec<u8>> = part.iter().map(|(_, kp)| kp.clone()).collect();
        let mut joining: Vec<String> = part.iter().map(|(u, _)| u.clone()).collect();
        joining.dedup();
        match commit(s, chat, |d| d.add(chat, &kps), &joining, &[]).await {
            Ok(seq) => {
                last_seq = seq;
                done += part.len();
            }
            Err(CommitError::TooLarge) if batch > 1 => batch = batch.div_ceil(2),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(last_seq)
}

pub(super) async fn remove(s: &mut Session, chat: &str, users: &[String]) -> Result<u64, CliError> {
    catch_up(s, chat).await?;
    let current = server_members(s, chat).await?;
    let on_server: Vec<String> = users
        .iter()
        .filter(|u| current.contains(u))
        .cloned()
        .collect();
    let users = users.to_vec();
    Ok(commit(s, chat, move |d| d.remove(chat, &users), &[], &on_server).await?)
}

/// Encrypts and sends `payload`; answers its seq once this device has seen it back.
pub(super) async fn send(
    s: &mut Session,
    chat: &str,
    payload: &Payload,
    files: Vec<chatd_proto::FileRef>,
) -> Result<u64, CliError> {
    catch_up(s, chat).await?;
    if !s.dev.is_member(chat) {
        return Err(CliError::Failed(format!(
            "this device is not in {chat}'s group (yet): a member adds it with `chat-cli e2e add {chat} {}`",
            s.dev.user()
        )));
    }
    remove_departed(s, chat).await?;
    let plain = serde_json::to_vec(payload)
        .map_err(|e| CliError::Failed(format!("cannot encode the message: {e}")))?;
    let out = s.dev.encrypt(chat, &plain).map_err(e2e_error)?;
    let seq = match e2e_send(
        s,
        chat,
        "application",
        out.epoch,
        &out.data,
        None,
        &[],
        &[],
        files,
    )
    .await
    {
        Ok(seq) => seq,
        Err(SendError::Stale) => {
            return Err(CliError::Failed(
                "unexpected stale_epoch for a message".into(),
            ))
        }
        Err(SendError::Other(e)) => return Err(e),
    };
    catch_up(s, chat).await?;
    Ok(seq)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_commit_fits_in_a_frame_or_is_split() {
        let c = |data: usize, welcome: Option<usize>| chatd_e2e::Commit {
            data: vec![0; data],
            welcome: welcome.map(|w| vec![0; w]),
            epoch: 0,
        };
        // Measured (`chat-cli e2e bench --devices 100`): adding 99 devices at once does
        // not fit; one device added to a 100-leaf group does.
        assert!(!fits_in_a_frame(&c(28_715, Some(33_730))));
        assert!(fits_in_a_frame(&c(9_000, Some(34_000))));
        assert!(fits_in_a_frame(&c(40_000, None)));
        assert!(!fits_in_a_frame(&c(46_001, None)));
        // At the frame's bound exactly.
        let room = chatd_proto::FRAME_BYTES_MAX - COMMIT_FRAME_OVERHEAD_BYTES;
        assert!(fits_in_a_frame(&c(room / 8 * 3, Some(room / 8 * 3))));
        assert!(!fits_in_a_frame(&c(room / 8 * 3 + 3, Some(room / 8 * 3))));
    }
}
