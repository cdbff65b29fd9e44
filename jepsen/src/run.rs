//! One test run: set up a cluster, users and chats; run the clients and the nemesis;
//! heal; read everything back from every node; check; write the report; clean up.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use chat_cli::ws::Connection;
use chatd_proto::{ClientFrame, ServerFrame};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::checker::{self, Results};
use crate::cluster::{self, Cluster, Standing, READY_TIMEOUT};
use crate::history::{History, Kind, Op, F};
use crate::nemesis::{self, FaultKind, Nemesis, Schedule};
use crate::workload::{self, ClientSpec, NodeDirectory, Setup};

/// Most operations a run records; the workload stops there.
pub const OPS_MAX: usize = 2_000_000;
/// Share of the time limit during which faults may start; the rest runs healed.
const FAULT_SHARE: f64 = 0.8;

/// What to run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TestSpec {
    /// 3 or 5 (1–9 allowed).
    pub nodes: usize,
    /// Seconds of workload.
    pub time_limit_s: u64,
    /// Faults to draw from (empty: none).
    pub faults: Vec<FaultKind>,
    /// Seed of the schedule and the clients' choices.
    pub seed: u64,
    /// Concurrent clients (each its own user).
    pub clients: usize,
    /// Group chats (every client is a member of each).
    pub chats: usize,
    /// End-to-end encrypted chats (every client, up to 20, is a member of each).
    pub e2e_chats: usize,
    /// Operations per second over all clients.
    pub rate: f64,
    /// Quiet time between faults (ms, range).
    pub quiet_ms: (u64, u64),
    /// Fault duration (ms, range).
    pub hold_ms: (u64, u64),
    /// The chatd binary.
    pub chatd: PathBuf,
    /// The run's directory.
    pub dir: PathBuf,
    /// API port of every node (each has its own address).
    pub base_port: u16,
    /// Keep the nodes' data directories.
    pub keep_data: bool,
    /// Partitions of the cluster.
    pub partitions: u32,
    /// The nodes run the deliberately broken build (`CHATD_TEST_ACK_BEFORE_SYNC=1` in
    /// this process's environment, which they inherit): recorded in results.json.
    pub ack_before_sync: bool,
}

/// What a run produced.
pub struct Outcome {
    /// The checker's results.
    pub results: Results,
    /// The run's directory.
    pub dir: PathBuf,
}

/// The setup's commit of one E2E chat (epoch 0, adding every member), recorded at the
/// start of the history as an acknowledged send of process `setup`.
#[derive(Clone, Debug)]
pub struct SetupCommit {
    /// The chat.
    pub chat: String,
    /// Its base64 data (the `mls_commit` entry's text).
    pub data: String,
    /// The seq it was acknowledged at.
    pub seq: u64,
}

/// The Raft group (partition) holding `chat`, from the admin API.
async fn partition_of(first: &str, admin: &str, chat: &str) -> anyhow::Result<Option<u64>> {
    let (first, admin, path) = (
        first.to_string(),
        admin.to_string(),
        format!("/v1/admin/chats/{chat}"),
    );
    let v = tokio::task::spawn_blocking(move || crate::http::get_json(&first, &path, &admin))
        .await?
        .context("cannot inspect a chat")?;
    Ok(v["partition"].as_u64())
}

/// Creates the users (one per client), the groups and the E2E chats; returns the setup,
/// the Raft groups holding the chats and the E2E chats' setup commits.
async fn prepare(
    nodes: NodeDirectory,
    admin: String,
    spec: &TestSpec,
) -> anyhow::Result<(Setup, Vec<u64>, Vec<SetupCommit>)> {
    let Some((_, first)) = nodes.list().into_iter().next() else {
        bail!("no node to set up the test through");
    };
    let mut users = Vec::new();
    for k in 1..=spec.clients {
        let user = format!("u{k}");
        let (first, admin, body) = (
            first.clone(),
            admin.clone(),
            serde_json::json!({ "user": user }),
        );
        let v = tokio::task::spawn_blocking(move || {
            crate::http::post_json(&first, "/v1/admin/users", &admin, &body)
        })
        .await?
        .with_context(|| format!("cannot create user {user}"))?;
        let token = v["token"]
            .as_str()
            .context("no token in the answer")?
            .to_string();
        users.push((user, token));
    }
    let mut conn = Connection::connect(&first, Some(&users[0].1), Duration::from_secs(10))
        .await
        .context("cannot connect as u1")?;
    let members: Vec<String> = users.iter().skip(1).map(|u| u.0.clone()).collect();
    let mut chats = Vec::new();
    let mut partitions = Vec::new();
    for i in 1..=spec.chats {
        let answer = conn
            .request(|id| ClientFrame::CreateGroup {
                id,
                name: format!("jepsen-{i}"),
                members: members.clone(),
            })
            .await
            .context("cannot create a group")?;
        let Some(ServerFrame::Done { chat, .. }) = answer.frame else {
            bail!("unexpected answer to create_group: {}", answer.raw);
        };
        if let Some(p) = partition_of(&first, &admin, &chat).await? {
            if !partitions.contains(&p) {
                partitions.push(p);
            }
        }
        chats.push(chat);
    }
    // E2E chats: u1 creates each (epoch 0) and commits epoch 0 adding the others, with a
    // welcome; the server never decrypts, so opaque bytes stand for the MLS messages.
    let e2e_members = users.len().min(chatd_proto::e2e::GROUP_MEMBERS_MAX);
    let added: Vec<String> = users
        .iter()
        .take(e2e_members)
        .skip(1)
        .map(|u| u.0.clone())
        .collect();
    let mut rng = StdRng::seed_from_u64(spec.seed ^ 0xe2e);
    let mut commits = Vec::new();
    for i in 1..=spec.e2e_chats {
        let answer = conn
            .request(|id| ClientFrame::CreateE2e {
                id,
                name: String::new(),
                direct: false,
            })
            .await
            .context("cannot create an E2E chat")?;
        let Some(ServerFrame::Done { chat, .. }) = answer.frame else {
            bail!("unexpected answer to create_e2e: {}", answer.raw);
        };
        let data = workload::ciphertext(&mut rng, &format!("setup-commit-{i}"));
        let welcome = workload::ciphertext(&mut rng, &format!("setup-welcome-{i}"));
        let answer = conn
            .request(|id| ClientFrame::E2eSend {
                id,
                chat: chat.clone(),
                client_msg_id: format!("setup-e2e-{i}"),
                kind: workload::MLS_COMMIT.into(),
                epoch: 0,
                data: data.clone(),
                welcome: Some(welcome),
                add: added.clone(),
                remove: Vec::new(),
                files: Vec::new(),
            })
            .await
            .with_context(|| format!("cannot commit the members into {chat}"))?;
        let Some(ServerFrame::Ack { seq, .. }) = answer.frame else {
            bail!("unexpected answer to e2e_send: {}", answer.raw);
        };
        if let Some(p) = partition_of(&first, &admin, &chat).await? {
            if !partitions.contains(&p) {
                partitions.push(p);
            }
        }
        commits.push(SetupCommit {
            chat: chat.clone(),
            data,
            seq,
        });
        chats.push(chat);
    }
    conn.close().await;
    Ok((
        Setup {
            nodes,
            users,
            chats,
            e2e_members,
            // The setup's commit named epoch 0: the chats are at epoch 1.
            e2e_epoch: 1,
        },
        partitions,
        commits,
    ))
}

/// Records the E2E chats' setup commits as acknowledged sends of process `setup` (so the
/// checker holds them to the same rules as the clients' commits).
fn record_setup_commits(history: &History, commits: &[SetupCommit]) {
    for c in commits {
        let mut inv = Op::new("setup", Kind::Invoke, F::Send);
        inv.chat = Some(c.chat.clone());
        inv.msg = Some(c.data.clone());
        inv.mls = Some(workload::MLS_COMMIT.into());
        inv.epoch = Some(0);
        history.record(inv);
        let mut ok = Op::new("setup", Kind::Ok, F::Send);
        ok.chat = Some(c.chat.clone());
        ok.seq = Some(c.seq);
        ok.mls = Some(workload::MLS_COMMIT.into());
        ok.epoch = Some(0);
        history.record(ok);
    }
}

/// Runs the test described by `spec`; `stop` ends it early (Ctrl-C). The cluster is
/// torn down (processes killed by pid, iptables chain removed) on every way out.
pub async fn test(spec: &TestSpec, stop: Arc<AtomicBool>) -> anyhow::Result<Outcome> {
    std::fs::create_dir_all(&spec.dir)
        .with_context(|| format!("cannot create {}", spec.dir.display()))?;
    let needs_iptables = spec.faults.iter().any(|f| f.needs_iptables());
    if needs_iptables {
        if !cluster::iptables_usable() {
            bail!(
                "the faults {:?} need iptables (as root); it is not usable here",
                spec.faults
            );
        }
        cluster::remove_stale_chains();
    }
    let needs_disks = spec.faults.iter().any(|f| f.needs_disks());
    if needs_disks {
        if !crate::lazyfs::usable() {
            bail!(
                "the faults {:?} need FUSE (/dev/fuse, as root) for the lazy disks; it is not usable here",
                spec.faults
            );
        }
        let stale = crate::lazyfs::remove_stale_mounts();
        if stale > 0 {
            nemesis::tracing_line(&format!("detached {stale} lazy disks left by dead runs"));
        }
    }
    let faketime = if spec.faults.iter().any(|f| f.needs_clock()) {
        Some(cluster::faketime_lib().context(
            "the clock fault needs libfaketime (Debian package `faketime`); it is not installed",
        )?)
    } else {
        None
    };
    let mut cluster = Cluster::init(
        &spec.chatd,
        &spec.dir,
        spec.nodes,
        spec.base_port,
        spec.partitions,
    )?;
    if needs_disks {
        cluster.enable_disks()?;
    }
    if let Some(lib) = &faketime {
        cluster.enable_clocks(lib)?;
    }
    let cluster = Arc::new(Mutex::new(cluster));
    let outcome = run_on(spec, &cluster, stop).await;
    {
        let mut c = cluster.lock();
        c.teardown();
        if !spec.keep_data {
            for n in &c.nodes {
                if let Some(dir) = n.config.parent() {
                    let _ = std::fs::remove_dir_all(dir.join("data"));
                    let _ = std::fs::remove_dir_all(dir.join("disk"));
                }
            }
        }
    }
    outcome
}

async fn run_on(
    spec: &TestSpec,
    cluster: &Arc<Mutex<Cluster>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Outcome> {
    let needs_iptables = spec.faults.iter().any(|f| f.needs_iptables());
    {
        let c = cluster.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut c = c.lock();
            if needs_iptables {
                c.enable_partitions()?;
            }
            c.start_all()?;
            Ok(())
        })
        .await??;
    }
    nemesis::tracing_line(&format!("{} nodes ready", spec.nodes));
    let (nodes, admin) = {
        let c = cluster.lock();
        let nodes: Vec<(usize, String)> = c.nodes.iter().map(|n| (n.id, n.api())).collect();
        (NodeDirectory::new(nodes), c.admin_token.clone())
    };
    let (setup, partitions, setup_commits) = prepare(nodes.clone(), admin, spec).await?;
    let setup = Arc::new(setup);
    nemesis::tracing_line(&format!(
        "{} clients, chats {:?} on partitions {partitions:?}",
        spec.clients, setup.chats
    ));

    let start = std::time::Instant::now();
    let history = Arc::new(History::create(
        &spec.dir.join("history.jsonl"),
        start,
        OPS_MAX,
    )?);
    record_setup_commits(&history, &setup_commits);
    let until = tokio::time::Instant::now() + Duration::from_secs(spec.time_limit_s);
    let fault_until = start + Duration::from_secs_f64(spec.time_limit_s as f64 * FAULT_SHARE);

    let nemesis_thread = if spec.faults.is_empty() {
        None
    } else {
        let n = Nemesis::new(
            cluster.clone(),
            history.clone(),
            stop.clone(),
            partitions.clone(),
            nodes.clone(),
        );
        let schedule = Schedule {
            kinds: spec.faults.clone(),
            seed: spec.seed,
            quiet_ms: spec.quiet_ms,
            hold_ms: spec.hold_ms,
            until: fault_until,
        };
        Some(std::thread::spawn(move || n.run(&schedule)))
    };

    let rate_each = spec.rate / spec.clients as f64;
    let mut clients = Vec::new();
    for k in 1..=spec.clients {
        let client = ClientSpec {
            k,
            rate: rate_each,
            seed: spec.seed.wrapping_mul(1_000_003).wrapping_add(k as u64),
            until,
        };
        clients.push(tokio::spawn(workload::run_client(
            client,
            setup.clone(),
            history.clone(),
            stop.clone(),
        )));
    }
    for c in clients {
        let _ = c.await;
    }
    if let Some(t) = nemesis_thread {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    if stop.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    nemesis::tracing_line("workload done; faults healed; waiting for every node");
    {
        let c = cluster.clone();
        let directory = nodes.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut c = c.lock();
            c.heal()?;
            // Every member (nodes that left or are leaving are not read from).
            for id in c.ids(Standing::Member) {
                c.start(id)?;
                c.wait_ready(id, READY_TIMEOUT)?;
            }
            let members = c.ids(Standing::Member);
            for (id, _) in directory.list() {
                if !members.contains(&id) {
                    directory.remove(id);
                }
            }
            for n in c.nodes.iter().filter(|n| members.contains(&n.id)) {
                directory.insert(n.id, n.api());
            }
            Ok(())
        })
        .await??;
    }
    workload::final_reads(&setup, &history).await;
    workload::final_downloads(&setup, &history).await;
    let ops = history
        .finish()
        .map_err(|e| anyhow::anyhow!("cannot write the history: {e}"))?;
    let results = checker::check(&ops);
    let title = format!(
        "{} nodes, faults {:?}, seed {}",
        spec.nodes, spec.faults, spec.seed
    );
    let params = serde_json::to_value(spec)?;
    crate::report::write(&spec.dir, &ops, &results, &params, &title)
        .with_context(|| format!("cannot write the report into {}", spec.dir.display()))?;
    Ok(Outcome {
        results,
        dir: spec.dir.clone(),
    })
}

/// The directory of a new run under `out`: `<unix seconds>-seed<seed>`.
pub fn run_dir(out: &Path, seed: u64) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    out.join(format!("{secs}-seed{seed}"))
}
