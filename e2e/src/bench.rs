//! What MLS costs a client, measured in this process with real state files (no network,
//! no server: the server's part of an E2E message is a plain send). `chat-cli e2e bench`
//! prints it; BENCHMARKS.md keeps the figures.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::{Device, E2eError, Event, Kind, StoreKey};

/// Most devices one run creates.
pub const BENCH_DEVICES_MAX: usize = 200;
/// Most messages one run encrypts.
pub const BENCH_MESSAGES_MAX: usize = 100_000;
/// The chat id of the run.
const CHAT: &str = "e:bench";

/// What one run measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BenchReport {
    pub devices: usize,
    pub messages: usize,
    pub message_bytes: usize,
    /// One commit adding every other device, with its welcome.
    pub add_commit_ms: f64,
    pub add_commit_bytes: usize,
    pub welcome_bytes: usize,
    /// A KeyPackage as uploaded.
    pub key_package_bytes: usize,
    /// Joining from the welcome, per device (mean).
    pub join_ms: f64,
    /// An empty commit (key update) in the full group, and processing it elsewhere.
    pub update_commit_ms: f64,
    pub update_commit_bytes: usize,
    pub update_process_ms: f64,
    /// Encrypting one message, the state file saved each time (mean, p99).
    pub encrypt_ms: f64,
    pub encrypt_p99_ms: f64,
    pub ciphertext_bytes: usize,
    /// Decrypting one message at another device (mean; saved once per 100).
    pub decrypt_ms: f64,
    /// The sender's state file at the end, and one save of it.
    pub state_file_bytes: u64,
    pub save_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs the measurement with `devices` devices (≥ 2) and `messages` messages of
/// `message_bytes` bytes, state files under `dir`.
pub fn run(
    dir: &Path,
    devices: usize,
    messages: usize,
    message_bytes: usize,
) -> Result<BenchReport, E2eError> {
    if !(2..=BENCH_DEVICES_MAX).contains(&devices) || messages > BENCH_MESSAGES_MAX {
        return Err(E2eError::InvalidInput(format!(
            "2-{BENCH_DEVICES_MAX} devices and at most {BENCH_MESSAGES_MAX} messages"
        )));
    }
    let key = StoreKey::random();
    let mut devs = Vec::with_capacity(devices);
    for i in 0..devices {
        devs.push(Device::create(
            &dir.join(format!("d{i}.mls")),
            &key,
            &format!("u{i}"),
            "d",
        )?);
    }
    let mut r = BenchReport {
        devices,
        messages,
        message_bytes,
        ..BenchReport::default()
    };
    let mut kps = Vec::new();
    for d in devs.iter_mut().skip(1) {
        let kp = d.key_packages(1, crate::KEY_PACKAGE_LIFETIME_SECS_DEFAULT, false)?;
        r.key_package_bytes = kp[0].data.len();
        kps.push(kp[0].data.clone());
    }
    let (first, rest) = devs.split_at_mut(1);
    let creator = &mut first[0];
    creator.create_group(CHAT)?;
    let t = Instant::now();
    let commit = creator.add(CHAT, &kps)?;
    r.add_commit_ms = ms(t.elapsed());
    r.add_commit_bytes = commit.data.len();
    let welcome = commit.welcome.clone().unwrap_or_default();
    r.welcome_bytes = welcome.len();
    creator.process(CHAT, 1, "u0", Kind::Commit, &commit.data, 0)?;
    let t = Instant::now();
    for d in rest.iter_mut() {
        let user = d.user().to_string();
        match d.process(CHAT, 2, "u0", Kind::Welcome, &welcome, 0)? {
            Event::Joined { .. } => {}
            other => {
                return Err(E2eError::InvalidInput(format!(
                    "{user} did not join: {other:?}"
                )))
            }
        }
    }
    r.join_ms = ms(t.elapsed()) / rest.len() as f64;
    let mut seq = 2;
    // A key update by the creator, processed by one other member.
    let t = Instant::now();
    let update = creator.update(CHAT)?;
    r.update_commit_ms = ms(t.elapsed());
    r.update_commit_bytes = update.data.len();
    seq += 1;
    creator.process(CHAT, seq, "u0", Kind::Commit, &update.data, 0)?;
    let reader = &mut rest[0];
    let t = Instant::now();
    reader.process(CHAT, seq, "u0", Kind::Commit, &update.data, 0)?;
    r.update_process_ms = ms(t.elapsed());
    // Messages: encrypted (each one saves the sender's state), decrypted by one reader.
    let text = vec![b'x'; message_bytes];
    let mut lat = Vec::with_capacity(messages);
    let mut sent = Vec::with_capacity(messages);
    for _ in 0..messages {
        let t = Instant::now();
        let o = creator.encrypt(CHAT, &text)?;
        lat.push(ms(t.elapsed()));
        r.ciphertext_bytes = o.data.len();
        sent.push(o.data);
    }
    lat.sort_by(f64::total_cmp);
    if !lat.is_empty() {
        r.encrypt_ms = lat.iter().sum::<f64>() / lat.len() as f64;
        r.encrypt_p99_ms = lat[(lat.len() * 99 / 100).min(lat.len() - 1)];
    }
    let t = Instant::now();
    for (i, data) in sent.iter().enumerate() {
        seq += 1;
        match reader.process(CHAT, seq, "u0", Kind::Application, data, 0)? {
            Event::Message { .. } => {}
            other => {
                return Err(E2eError::InvalidInput(format!(
                    "message {i} did not decrypt: {other:?}"
                )))
            }
        }
        if i % 100 == 99 {
            reader.save()?;
        }
    }
    if messages > 0 {
        r.decrypt_ms = ms(t.elapsed()) / messages as f64;
    }
    // The sender sees its own messages back: they go into its history.
    let mut own = 3;
    for data in &sent {
        own += 1;
        creator.process(CHAT, own, "u0", Kind::Application, data, 0)?;
    }
    let t = Instant::now();
    creator.save()?;
    r.save_ms = ms(t.elapsed());
    r.state_file_bytes = std::fs::metadata(creator.path())?.len();
    Ok(r)
}
