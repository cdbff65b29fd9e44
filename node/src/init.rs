//! `chatd cluster init`: the cluster CA, node certificates and node configs.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use chatd_transport::pki::ClusterCa;

use crate::config::{
    ClusterSection, Config, LifecycleSection, LogSection, Peer, RaftSection, StorageSection,
    TlsPaths,
};

/// What `cluster init` produces.
#[derive(Clone, Debug)]
pub struct InitSpec {
    /// Number of nodes.
    pub nodes: u32,
    /// Output directory.
    pub out: PathBuf,
    /// One host per node, or one host for all (ports then differ per node).
    pub hosts: Vec<IpAddr>,
    /// First port; node i uses base + 10·(i−1) for the API and +1 for QUIC.
    pub base_port: u16,
    /// Number of partitions.
    pub partitions: u32,
    /// Raft settings written into every config.
    pub raft: RaftSection,
    /// Gateway settings written into every config.
    pub gateway: crate::gateway::GatewayConfig,
    /// Notification settings written into every config.
    pub notify: crate::config::NotifySection,
    /// Where node data lives: `None` writes `data_dir = "data"` (beside the config file);
    /// `Some(root)` writes the absolute `root/node-<id>`, the layout of an installed node
    /// (`/var/lib/chatd/node-<id>`, the systemd unit's `StateDirectory`).
    pub data_dir_root: Option<PathBuf>,
}

/// The files written for one node.
#[derive(Clone, Debug)]
pub struct NodeFiles {
    /// Node id.
    pub id: u64,
    /// Its config file.
    pub config: PathBuf,
    /// Its peer entry.
    pub peer: Peer,
}

/// Writes `out/ca.pem`, `out/ca.key` and `out/node-<id>/{chatd.toml,node.pem,node.key,ca.pem}`.
/// Refuses to overwrite an existing CA.
pub fn init_cluster(spec: &InitSpec) -> anyhow::Result<Vec<NodeFiles>> {
    if spec.nodes == 0 || spec.nodes > 64 {
        bail!("--nodes must be between 1 and 64, got {}", spec.nodes);
    }
    if spec.hosts.is_empty() {
        bail!("at least one host is needed");
    }
    if spec.hosts.len() > 1 && spec.hosts.len() != spec.nodes as usize {
        bail!(
            "give one host for all nodes or one per node ({} hosts for {} nodes)",
            spec.hosts.len(),
            spec.nodes
        );
    }
    if let Some(root) = &spec.data_dir_root {
        if !root.is_absolute() {
            bail!(
                "--data-dir-root must be an absolute path, got {}",
                root.display()
            );
        }
    }
    let ca_path = spec.out.join("ca.pem");
    if ca_path.exists() {
        bail!(
            "{} already exists: refusing to replace the cluster CA of an existing cluster",
            ca_path.display()
        );
    }
    std::fs::create_dir_all(&spec.out)
        .with_context(|| format!("cannot create {}", spec.out.display()))?;
    let cluster_id = new_cluster_id();
    let admin_token = crate::auth::new_token();
    write_file(&spec.out.join("admin.token"), &admin_token, true)?;
    let ca = ClusterCa::generate(&cluster_id).context("cannot generate the cluster CA")?;
    write_file(&ca_path, ca.cert_pem(), false)?;
    write_file(&spec.out.join("ca.key"), ca.key_pem(), true)?;

    let peers: Vec<Peer> = (1..=spec.nodes as u64)
        .map(|id| {
            let (host, offset) = if spec.hosts.len() == 1 {
                (spec.hosts[0], (id - 1) as u16 * 10)
            } else {
                (spec.hosts[(id - 1) as usize], 0)
            };
            let api = spec.base_port.saturating_add(offset);
            Peer {
                id,
                api_addr: SocketAddr::new(host, api),
                cluster_addr: SocketAddr::new(host, api.saturating_add(1)),
            }
        })
        .collect();

    let mut out = Vec::new();
    for peer in &peers {
        let dir = spec.out.join(format!("node-{}", peer.id));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let cert = ca
            .issue_node(peer.id, &[peer.cluster_addr.ip()])
            .context("cannot issue a node certificate")?;
        write_file(&dir.join("ca.pem"), ca.cert_pem(), false)?;
        write_file(&dir.join("node.pem"), &cert.cert_pem, false)?;
        write_file(&dir.join("node.key"), &cert.key_pem, true)?;
        let config = Config {
            cluster_id: cluster_id.clone(),
            node_id: peer.id,
            data_dir: match &spec.data_dir_root {
                Some(root) => root.join(format!("node-{}", peer.id)),
                None => "data".into(),
            },
            tls: TlsPaths {
                ca_cert: "ca.pem".into(),
                cert: "node.pem".into(),
                key: "node.key".into(),
            },
            peers: peers.clone(),
            cluster: ClusterSection {
                partitions: spec.partitions,
                replication: None,
                join: false,
            },
            raft: spec.raft.clone(),
            storage: StorageSection::default(),
            log: LogSection::default(),
            gateway: spec.gateway.clone(),
            admin_token_sha256: Some(crate::auth::sha256_hex(&admin_token)),
            notify: spec.notify.clone(),
            lifecycle: LifecycleSection::default(),
            files: Default::default(),
        };
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("generated config is invalid: {e}"))?;
        let path = dir.join("chatd.toml");
        let text = config.to_toml(&path).context("cannot encode the config")?;
        write_file(&path, &text, false)?;
        out.push(NodeFiles {
            id: peer.id,
            config: path,
            peer: peer.clone(),
        });
    }
    Ok(out)
}

/// What `cluster add-node` produces.
#[derive(Clone, Debug)]
pub struct AddNodeSpec {
    /// The directory `cluster init` wrote: `ca.pem`, `ca.key`, and a node config to copy
    /// the cluster's settings and seed peers from.
    pub ca_dir: PathBuf,
    /// The new node's id (never used before in this cluster).
    pub id: u64,
    /// The new node's host address.
    pub host: IpAddr,
    /// Its client API port; QUIC listens on the next port.
    pub api_port: u16,
    /// Where to write `chatd.toml`, `node.pem`, `node.key`, `ca.pem`.
    pub out: PathBuf,
    /// A member's config to take the cluster's settings and seed peers from (default: the
    /// first `node-*/chatd.toml` under `ca_dir`).
    pub seed_config: Option<PathBuf>,
    /// As in [`InitSpec::data_dir_root`].
    pub data_dir_root: Option<PathBuf>,
}

/// Writes a joining node's certificate (signed by the cluster CA) and config: the cluster's
/// settings and seed peers from a member's config, `join = true`. The node is admitted when
/// it starts; group 0 refuses a taken or tombstoned id then. Refuses to overwrite files.
pub fn add_node(spec: &AddNodeSpec) -> anyhow::Result<NodeFiles> {
    if spec.id == 0 {
        bail!("--id must be at least 1");
    }
    let read = |name: &str| {
        let p = spec.ca_dir.join(name);
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))
    };
    let ca = ClusterCa::from_pem(&read("ca.pem")?, &read("ca.key")?)
        .context("the cluster CA in --ca-dir is not usable")?;
    let seed_path = match &spec.seed_config {
        Some(p) => p.clone(),
        None => first_node_config(&spec.ca_dir)?,
    };
    let seed = Config::load(&seed_path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", seed_path.display()))?;
    if seed.peers.iter().any(|p| p.id == spec.id) {
        bail!(
            "node id {} is already in the peer list of {}: pick an id never used in this cluster",
            spec.id,
            seed_path.display()
        );
    }
    let me = Peer {
        id: spec.id,
        api_addr: SocketAddr::new(spec.host, spec.api_port),
        cluster_addr: SocketAddr::new(spec.host, spec.api_port.saturating_add(1)),
    };
    if let Some(clash) = seed
        .peers
        .iter()
        .find(|p| p.api_addr == me.api_addr || p.cluster_addr == me.cluster_addr)
    {
        bail!(
            "{} or {} is node {}'s address: pick another --host or --api-port",
            me.api_addr,
            me.cluster_addr,
            clash.id
        );
    }
    if spec.out.join("chatd.toml").exists() {
        bail!(
            "{} already exists: refusing to overwrite a node's config",
            spec.out.join("chatd.toml").display()
        );
    }
    std::fs::create_dir_all(&spec.out)
        .with_context(|| format!("cannot create {}", spec.out.display()))?;
    let cert = ca
        .issue_node(spec.id, &[spec.host])
        .context("cannot issue a node certificate")?;
    write_file(&spec.out.join("ca.pem"), ca.cert_pem(), false)?;
    write_file(&spec.out.join("node.pem"), &cert.cert_pem, false)?;
    write_file(&spec.out.join("node.key"), &cert.key_pem, true)?;
    let mut peers = seed.peers.clone();
    peers.push(me.clone());
    let mut cluster = seed.cluster.clone();
    cluster.join = true;
    let config = Config {
        node_id: spec.id,
        data_dir: match &spec.data_dir_root {
            Some(root) => root.join(format!("node-{}", spec.id)),
            None => "data".into(),
        },
        tls: TlsPaths {
            ca_cert: "ca.pem".into(),
            cert: "node.pem".into(),
            key: "node.key".into(),
        },
        peers,
        cluster,
        ..seed
    };
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("generated config is invalid: {e}"))?;
    let path = spec.out.join("chatd.toml");
    let text = config.to_toml(&path).context("cannot encode the config")?;
    write_file(&path, &text, false)?;
    Ok(NodeFiles {
        id: spec.id,
        config: path,
        peer: me,
    })
}

/// The first `node-*/chatd.toml` under `dir` (by node number).
fn first_node_config(dir: &Path) -> anyhow::Result<PathBuf> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n: u64 = name.strip_prefix("node-")?.parse().ok()?;
            let cfg = e.path().join("chatd.toml");
            cfg.exists().then_some((n, cfg))
        })
        .collect();
    found.sort();
    found.into_iter().next().map(|(_, p)| p).ok_or_else(|| {
        anyhow::anyhow!(
            "no node-*/chatd.toml under {}: pass --seed-config with a member's config",
            dir.display()
        )
    })
}

fn write_file(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {}", path.display()))?;
    }
    Ok(())
}

fn new_cluster_id() -> String {
    let r: u64 = rand::random();
    format!("chatd-{r:016x}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec(out: &Path, data_dir_root: Option<PathBuf>) -> InitSpec {
        InitSpec {
            nodes: 3,
            out: out.to_path_buf(),
            hosts: vec![
                IpAddr::from([10, 0, 0, 1]),
                IpAddr::from([10, 0, 0, 2]),
                IpAddr::from([10, 0, 0, 3]),
            ],
            base_port: 7000,
            partitions: 16,
            raft: RaftSection::default(),
            gateway: Default::default(),
            notify: Default::default(),
            data_dir_root,
        }
    }

    #[test]
    fn the_default_layout_keeps_data_beside_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let files = init_cluster(&spec(dir.path(), None)).unwrap();
        let c = Config::load(&files[1].config).unwrap();
        assert_eq!(c.data_dir, dir.path().join("node-2").join("data"));
        // One host per node: every node uses the same ports on its own host.
        assert_eq!(c.me().unwrap().api_addr.to_string(), "10.0.0.2:7000");
        assert_eq!(c.me().unwrap().cluster_addr.to_string(), "10.0.0.2:7001");
    }

    #[test]
    fn the_install_layout_puts_data_under_the_root_and_keeps_tls_beside_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let root = PathBuf::from("/var/lib/chatd");
        let files = init_cluster(&spec(dir.path(), Some(root))).unwrap();
        for f in &files {
            let c = Config::load(&f.config).unwrap();
            assert_eq!(
                c.data_dir,
                PathBuf::from(format!("/var/lib/chatd/node-{}", f.id))
            );
            // Relative TLS paths: the node directory can be copied anywhere (/etc/chatd/<name>).
            let text = std::fs::read_to_string(&f.config).unwrap();
            assert!(text.contains("ca_cert = \"ca.pem\""), "{text}");
            assert_eq!(c.tls.key, f.config.parent().unwrap().join("node.key"));
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("node-1/node.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_relative_data_dir_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = init_cluster(&spec(dir.path(), Some(PathBuf::from("var/lib"))))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--data-dir-root must be an absolute path"),
            "{e}"
        );
        assert!(!dir.path().join("ca.pem").exists());
    }
}
