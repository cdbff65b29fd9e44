//! The node's HTTP API: health, readiness, and the admin view of the cluster. (The chat
//! WebSocket API joins it in the chat service.)

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chatd_raftlog::{GroupId, NodeId};
use serde::{Deserialize, Serialize};

use axum::extract::ws::WebSocketUpgrade;
use axum::http::HeaderMap;
use axum::middleware::{self, Next};
use chatd_chat::{ChatCommand, ChatReply};

use crate::node::{Node, ProposeError};

/// Largest record accepted by the admin append endpoint.
pub const RECORD_BYTES_MAX: usize = 1 << 20;
/// Most records returned by one read.
pub const READ_RECORDS_MAX: usize = 1000;

/// The router for `node`.
pub fn router(node: Arc<Node>) -> Router {
    let admin = Router::new()
        .route("/v1/admin/cluster", get(cluster_status))
        .route("/v1/admin/nodes", get(list_nodes))
        .route("/v1/admin/nodes/{id}/remove", post(remove_node))
        .route("/v1/admin/rebalance", get(rebalance_status))
        .route("/v1/admin/rebalance/pause", post(pause_rebalance))
        .route("/v1/admin/rebalance/resume", post(resume_rebalance))
        .route("/v1/admin/users", post(create_user).get(list_users))
        .route("/v1/admin/users/{user}/disable", post(disable_user))
        .route("/v1/admin/users/{user}/rotate-token", post(rotate_token))
        .route("/v1/admin/chats/{chat}", get(inspect_chat))
        .route(
            "/v1/admin/partitions/{group}/transfer",
            post(transfer_leader),
        )
        .route("/v1/admin/partitions/{group}/move", post(move_replica))
        .route(
            "/v1/admin/partitions/{group}/records",
            post(append_record).get(read_records),
        )
        .route("/v1/admin/partitions/{group}/digest", get(digest))
        .route("/v1/admin/partitions/{group}/local", get(local_group))
        .route("/v1/admin/leaders", get(local_leaders))
        .route(
            "/v1/admin/files/{id}/local",
            get(crate::files::http::local_file),
        )
        .layer(middleware::from_fn_with_state(node.clone(), require_admin));
    Router::new()
        .route("/", get(crate::web::asset))
        .route("/app.css", get(crate::web::asset))
        .route("/js/{file}", get(crate::web::asset))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/v1/nodes", get(crate::web::nodes))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/ws", get(websocket))
        .route("/v1/files", post(crate::files::http::upload))
        .route("/v1/quota", get(crate::files::http::quota))
        .route(
            "/v1/files/{id}",
            get(crate::files::http::download)
                .head(crate::files::http::status)
                .patch(crate::files::http::resume),
        )
        .route(
            "/v1/files/{id}/thumbnail",
            get(crate::files::http::thumbnail),
        )
        .merge(admin)
        .layer(middleware::from_fn(crate::web::cors))
        .layer(DefaultBodyLimit::max(RECORD_BYTES_MAX))
        .with_state(node)
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_string())
}

/// Admin endpoints need the admin token. A node configured without one never serves them:
/// it answers 403 `admin_disabled` rather than running them open.
async fn require_admin(
    State(node): State<Arc<Node>>,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    let Some(expected) = &node.config.admin_token_sha256 else {
        return error(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "this node has no admin token configured (admin_token_sha256 in its config): \
             its admin endpoints are off",
        );
    };
    let given = bearer(request.headers()).map(|t| crate::auth::sha256_hex(&t));
    let ok = given.is_some_and(|g| crate::auth::constant_time_eq(&g, expected));
    if !ok {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "admin endpoints need Authorization: Bearer <admin token>",
        );
    }
    next.run(request).await
}

/// Bytes a WebSocket session reads from its socket at a time. tungstenite's default
/// (128 KiB, zero-filled for every read) made an idle session cost ~143 KB; a frame larger
/// than this is read in several steps into a buffer that grows for it.
pub const WS_READ_BUFFER_BYTES: usize = 4096;
/// Bytes of outgoing frames a session gathers before writing them to the socket (each
/// push is flushed anyway); tungstenite's default is 128 KiB.
pub const WS_WRITE_BUFFER_BYTES: usize = 4096;

use crate::sessions::Admission;

async fn websocket(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    // A draining node takes no new sessions; the client connects to another node.
    if node.draining() {
        return draining_error();
    }
    let token = bearer(&headers);
    // The codec refuses frames over twice the protocol bound outright; frames between the
    // bound and that get a typed error and a close from the session.
    let ws = ws
        .max_message_size(chatd_proto::FRAME_BYTES_MAX * 2)
        .max_frame_size(chatd_proto::FRAME_BYTES_MAX * 2)
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .write_buffer_size(WS_WRITE_BUFFER_BYTES);
    // The slot is held for the session's life (dropped with it, or with the upgrade if
    // the handshake fails).
    let max = node.gateway.slots.max();
    match node.gateway.slots.admit() {
        Admission::Session(slot) => ws.on_upgrade(move |socket| async move {
            crate::gateway::serve(node, socket, token).await;
            drop(slot);
        }),
        Admission::Notice(slot) => ws.on_upgrade(move |socket| async move {
            crate::gateway::refuse_full(socket, max).await;
            drop(slot);
        }),
        Admission::Refuse => error(
            StatusCode::SERVICE_UNAVAILABLE,
            chatd_proto::code::SERVER_FULL,
            format!("this node holds its maximum of {max} sessions: connect to another node"),
        ),
    }
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    // O(1) in the number of groups: a summary, read from each group's published metrics
    // (no call into any group's Raft core, so a scrape wakes nothing).
    let lag = node.registry.apply_backlog();
    let mut out = node.gateway.metrics.render(&lag);
    crate::metrics::metric(
        &mut out,
        "chatd_sessions_open",
        "WebSocket sessions open (authenticated or not).",
        "gauge",
        node.gateway.slots.open(),
    );
    crate::metrics::metric(
        &mut out,
        "chatd_sessions_max",
        "The bound on open sessions (gateway.sessions_max).",
        "gauge",
        node.gateway.slots.max(),
    );
    crate::metrics::render_raft(&node.registry, &mut out);
    let in_progress = node.meta.membership().map_or(0, |m| m.moves().count());
    node.rebalancer.render_metrics(in_progress as u64, &mut out);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}

#[derive(Deserialize)]
struct NewUser {
    user: String,
}

#[derive(Serialize)]
struct CreatedUser {
    user: String,
    token: String,
}

async fn create_user(State(node): State<Arc<Node>>, Json(req): Json<NewUser>) -> Response {
    let valid = !req.user.is_empty()
        && req.user.len() <= chatd_proto::USER_ID_BYTES_MAX
        && req.user.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        });
    if !valid {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "user ids are 1-32 of a-z 0-9 _ . -",
        );
    }
    let token = crate::auth::new_token();
    let cmd = chatd_membership::MetaCommand::CreateUser {
        user: req.user.clone(),
        token_sha256: crate::auth::sha256_hex(&token),
    };
    match propose_user_command(&node, &cmd).await {
        Err(response) => response,
        Ok(chatd_membership::UserReply::Created) => {
            // Read-your-writes on the issuing node: answer once this replica applied it.
            if !node.user_enabled_caught_up(&req.user).await {
                tracing::warn!(user = %req.user, "created user not yet applied on this node");
            }
            (
                StatusCode::CREATED,
                Json(CreatedUser {
                    user: req.user,
                    token,
                }),
            )
                .into_response()
        }
        Ok(chatd_membership::UserReply::Exists) => error(
            StatusCode::CONFLICT,
            "exists",
            format!("user {} exists", req.user),
        ),
        Ok(other) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{other:?}"),
        ),
    }
}

/// Proposes a user command to group 0 and decodes its answer; errors as HTTP responses.
async fn propose_user_command(
    node: &Node,
    cmd: &chatd_membership::MetaCommand,
) -> Result<chatd_membership::UserReply, Response> {
    let bytes = chatd_codec::encode(cmd)
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "encode", e.to_string()))?;
    let p = node
        .propose(chatd_membership::META_GROUP, bytes)
        .await
        .map_err(|e| {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            )
        })?;
    chatd_codec::decode(&p.response)
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "decode", e.to_string()))
}

#[derive(Serialize)]
struct UserOut {
    user: String,
    disabled: bool,
}

/// One node as group 0's membership holds it.
#[derive(Serialize)]
struct NodeOut {
    id: NodeId,
    /// joining, active, draining or removed.
    state: &'static str,
    api_addr: String,
    cluster_addr: String,
    /// Partitions it replicates (moves to it included).
    replicas: usize,
    /// Partitions it is the preferred leader of.
    preferred_leader_of: usize,
}

/// The rebalancer as group 0 and this node see it.
async fn rebalance_status(State(node): State<Arc<Node>>) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(m) = node.meta.membership() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_bootstrapped",
            "group 0 has not reached this node yet; try again or ask another node",
        );
    };
    let moves: Vec<MoveView> = m
        .moves()
        .map(|(group, mv, epoch)| MoveView {
            group,
            add: mv.add,
            remove: mv.remove,
            epoch,
        })
        .collect();
    let planned: Vec<String> = chatd_membership::plan(&m, 8)
        .into_iter()
        .map(|s| match s {
            chatd_membership::Step::Move {
                group, add, remove, ..
            } => format!("move partition {group}: node {remove} -> node {add}"),
            chatd_membership::Step::PreferLeader { group, leader, .. } => {
                format!("prefer node {leader} as leader of partition {group}")
            }
        })
        .collect();
    let r = &node.rebalancer;
    Json(serde_json::json!({
        "answered_by": node.id,
        "paused": m.rebalance_paused,
        "moves": moves,
        "planned": planned,
        "this_node": {
            "leads_group_0": node.local_leader(chatd_membership::META_GROUP) == Some(node.id),
            "moves_started": r.moves_started.load(Relaxed),
            "moves_done": r.moves_done.load(Relaxed),
            "moves_rolled_back": r.moves_rolled_back.load(Relaxed),
            "move_seconds_total": r.move_ms_total.load(Relaxed) as f64 / 1000.0,
        },
    }))
    .into_response()
}

/// Pauses or resumes the rebalancer (in group 0: every future leader obeys it).
async fn set_rebalance(node: &Node, paused: bool) -> Response {
    match node
        .propose_member(chatd_membership::MemberCommand::SetRebalancePaused { paused })
        .await
    {
        Ok(chatd_membership::MemberReply::Done { .. }) => {
            Json(serde_json::json!({ "paused": paused })).into_response()
        }
        Ok(other) => error(StatusCode::CONFLICT, "refused", other.to_string()),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    }
}

async fn pause_rebalance(State(node): State<Arc<Node>>) -> Response {
    set_rebalance(&node, true).await
}

async fn resume_rebalance(State(node): State<Arc<Node>>) -> Response {
    set_rebalance(&node, false).await
}

/// The cluster's nodes from group 0 (removed ones too: their ids stay taken).
async fn list_nodes(State(node): State<Arc<Node>>) -> Response {
    let Some(m) = node.meta.membership() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_bootstrapped",
            "group 0 has not reached this node yet; try again or ask another node",
        );
    };
    let nodes: Vec<NodeOut> = m
        .nodes
        .values()
        .map(|n| NodeOut {
            id: n.info.id,
            state: n.state.name(),
            api_addr: n.info.api_addr.clone(),
            cluster_addr: n.info.cluster_addr.clone(),
            replicas: m.hosted_by(n.info.id).len(),
            preferred_leader_of: m
                .parts
                .iter()
                .filter(|p| p.replicas.first() == Some(&n.info.id))
                .count(),
        })
        .collect();
    Json(nodes).into_response()
}

#[derive(Deserialize, Default)]
struct RemoveReq {
    /// The node is gone for good (its replicas are re-created from the other copies).
    #[serde(default)]
    dead: bool,
}

/// Starts retiring a node: group 0 marks it draining (refused if fewer than R active nodes
/// would be left), the rebalancer moves its replicas off and out of group 0's voters, and
/// then tombstones it; a live node drains its sessions and exits then.
async fn remove_node(
    State(node): State<Arc<Node>>,
    Path(id): Path<NodeId>,
    body: Option<Json<RemoveReq>>,
) -> Response {
    let dead = body.map(|Json(b)| b.dead).unwrap_or(false);
    match node.meta.membership().and_then(|m| m.state_of(id)) {
        None => {
            return error(
                StatusCode::NOT_FOUND,
                "unknown_node",
                format!("node {id} is not a member of this cluster"),
            )
        }
        Some(chatd_membership::NodeState::Removed) => {
            return error(
                StatusCode::CONFLICT,
                "already_removed",
                format!("node {id} was removed already"),
            )
        }
        Some(_) => {}
    }
    let cmd = chatd_membership::MemberCommand::SetNodeState {
        id,
        state: chatd_membership::NodeState::Draining,
    };
    match node.propose_member(cmd).await {
        Ok(chatd_membership::MemberReply::Done { .. }) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "id": id, "state": "draining", "dead": dead })),
        )
            .into_response(),
        Ok(chatd_membership::MemberReply::UnknownNode(_)) => error(
            StatusCode::NOT_FOUND,
            "unknown_node",
            format!("node {id} is not a member of this cluster"),
        ),
        Ok(refused) => error(StatusCode::CONFLICT, "refused", refused.to_string()),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    }
}

async fn list_users(State(node): State<Arc<Node>>) -> Response {
    let users: Vec<UserOut> = node
        .meta
        .list_users()
        .into_iter()
        .map(|u| UserOut {
            user: u.user,
            disabled: u.disabled,
        })
        .collect();
    Json(users).into_response()
}

async fn disable_user(State(node): State<Arc<Node>>, Path(user): Path<String>) -> Response {
    let cmd = chatd_membership::MetaCommand::DisableUser { user: user.clone() };
    match propose_user_command(&node, &cmd).await {
        Err(response) => response,
        Ok(chatd_membership::UserReply::Disabled) => Json(UserOut {
            user,
            disabled: true,
        })
        .into_response(),
        Ok(_) => error(
            StatusCode::NOT_FOUND,
            "unknown_user",
            format!("no user {user}"),
        ),
    }
}

/// Replaces a user's token; the new one is shown once. Sessions opened with the old token
/// are closed (4004) by every node as it applies the change.
async fn rotate_token(State(node): State<Arc<Node>>, Path(user): Path<String>) -> Response {
    let token = crate::auth::new_token();
    let token_sha256 = crate::auth::sha256_hex(&token);
    let cmd = chatd_membership::MetaCommand::RotateToken {
        user: user.clone(),
        token_sha256: token_sha256.clone(),
    };
    match propose_user_command(&node, &cmd).await {
        Err(response) => response,
        Ok(chatd_membership::UserReply::Rotated) => {
            // Read-your-writes on the issuing node, as for a new user.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while !node.meta.token_valid(&user, &token_sha256)
                && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Json(CreatedUser { user, token }).into_response()
        }
        Ok(chatd_membership::UserReply::IsDisabled) => error(
            StatusCode::CONFLICT,
            "user_disabled",
            format!("user {user} is disabled: its token is not rotated"),
        ),
        Ok(_) => error(
            StatusCode::NOT_FOUND,
            "unknown_user",
            format!("no user {user}"),
        ),
    }
}

#[derive(Serialize)]
struct MemberOut {
    user: String,
    from_seq: u64,
    to_seq: Option<u64>,
    member: bool,
    delivered: u64,
    read: u64,
}

#[derive(Serialize)]
struct ChatOut {
    chat: String,
    partition: GroupId,
    kind: String,
    name: String,
    creator: String,
    created_ts: u64,
    last_seq: u64,
    members: Vec<MemberOut>,
}

/// The admin view of one chat: members with their spans and cursors.
async fn inspect_chat(State(node): State<Arc<Node>>, Path(chat): Path<String>) -> Response {
    let group = crate::gateway::chat_group(&node, &chat);
    let q = crate::queries::ChatQuery::Inspect { chat: chat.clone() };
    match node.query(group, q).await {
        Ok(crate::queries::ChatQueryReply::Inspection(Some(i))) => {
            let cursor = |u: &str| {
                i.cursors
                    .iter()
                    .find(|(c, _, _)| c == u)
                    .map(|(_, d, r)| (*d, *r))
                    .unwrap_or((0, 0))
            };
            let members = i
                .members
                .iter()
                .map(|(u, from, to)| {
                    let (delivered, read) = cursor(u);
                    MemberOut {
                        user: u.clone(),
                        from_seq: *from,
                        to_seq: *to,
                        member: to.is_none(),
                        delivered,
                        read,
                    }
                })
                .collect();
            Json(ChatOut {
                chat: i.chat,
                partition: group,
                kind: i.kind,
                name: i.name,
                creator: i.creator,
                created_ts: i.created_ts,
                last_seq: i.last_seq,
                members,
            })
            .into_response()
        }
        Ok(crate::queries::ChatQueryReply::Inspection(None)) => error(
            StatusCode::NOT_FOUND,
            "unknown_chat",
            format!("no chat {chat}"),
        ),
        Ok(other) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{other:?}"),
        ),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    }
}

#[derive(Deserialize)]
struct TransferReq {
    to: NodeId,
}

#[derive(Deserialize)]
struct MoveReq {
    from: NodeId,
    to: NodeId,
}

/// Records a move of `group`'s replica from one node to another; group 0's leader drives
/// it like its own moves. Answers at once (202); `GET /v1/admin/rebalance` follows it.
async fn move_replica(
    State(node): State<Arc<Node>>,
    Path(group): Path<GroupId>,
    Json(req): Json<MoveReq>,
) -> Response {
    let Some(m) = node.meta.membership() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_bootstrapped",
            "group 0 has not reached this node yet",
        );
    };
    let Some(part) = m.part(group) else {
        return error(
            StatusCode::NOT_FOUND,
            "unknown_partition",
            format!("no partition {group}"),
        );
    };
    let cmd = chatd_membership::MemberCommand::BeginMove {
        group,
        epoch: part.epoch,
        add: req.to,
        remove: req.from,
    };
    match node.propose_member(cmd).await {
        Ok(chatd_membership::MemberReply::Done { epoch }) => (
            StatusCode::ACCEPTED,
            Json(
                serde_json::json!({"group": group, "from": req.from, "to": req.to, "epoch": epoch}),
            ),
        )
            .into_response(),
        Ok(refused) => error(StatusCode::CONFLICT, "refused", refused.to_string()),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    }
}

/// Moves a partition's leadership to another of its replicas.
async fn transfer_leader(
    State(node): State<Arc<Node>>,
    Path(group): Path<GroupId>,
    Json(req): Json<TransferReq>,
) -> Response {
    match node.transfer_leadership(group, req.to).await {
        Ok(leader) => Json(serde_json::json!({"group": group, "leader": leader})).into_response(),
        Err(e) => error(StatusCode::CONFLICT, "transfer_failed", e),
    }
}

/// A JSON error body: a stable code and a sentence.
#[derive(Serialize)]
struct ApiError {
    code: &'static str,
    message: String,
}

fn error(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    (
        status,
        Json(ApiError {
            code,
            message: message.into(),
        }),
    )
        .into_response()
}

/// What `/readyz` answers. systemd's `READY=1` waits for the same thing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Metadata bootstrapped and every hosted partition has a leader.
    Ready,
    /// Still starting (or a hosted partition lost its leader).
    NotReady,
    /// A graceful drain has started; the node is going away.
    Draining,
}

/// The node's readiness, as `/readyz` reports it.
pub fn readiness(node: &Node) -> Readiness {
    if node.draining() {
        Readiness::Draining
    } else if node.ready() {
        Readiness::Ready
    } else {
        Readiness::NotReady
    }
}

/// The answer of a draining node to `/readyz` and to new WebSocket sessions.
fn draining_error() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "draining",
        "the node is shutting down: connect to another node",
    )
}

async fn readyz(State(node): State<Arc<Node>>) -> Response {
    match readiness(&node) {
        Readiness::Draining => draining_error(),
        Readiness::Ready => (StatusCode::OK, "ready\n").into_response(),
        Readiness::NotReady => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "metadata not bootstrapped or a hosted partition has no leader",
        ),
    }
}

#[derive(Serialize)]
struct Appended {
    group: GroupId,
    index: u64,
    seq: u64,
    leader: NodeId,
}

async fn append_record(
    State(node): State<Arc<Node>>,
    Path(group): Path<GroupId>,
    body: axum::body::Bytes,
) -> Response {
    if group == 0 {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_group",
            "group 0 takes no records",
        );
    }
    let cmd = match chatd_codec::encode(&ChatCommand::Append(body.to_vec())) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "encode", e.to_string()),
    };
    match node.propose(group, cmd).await {
        Ok(p) => match chatd_codec::decode::<ChatReply>(&p.response) {
            Ok(ChatReply::Appended { seq }) => Json(Appended {
                group,
                index: p.index,
                seq,
                leader: p.leader,
            })
            .into_response(),
            Ok(other) => error(StatusCode::BAD_REQUEST, "rejected", format!("{other:?}")),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "decode", e.to_string()),
        },
        Err(e @ ProposeError::UnknownGroup(_)) => {
            error(StatusCode::NOT_FOUND, "unknown_partition", e.to_string())
        }
        Err(e @ ProposeError::Overloaded { .. }) => {
            error(StatusCode::TOO_MANY_REQUESTS, "overloaded", e.to_string())
        }
        Err(e @ (ProposeError::NoLeader { .. } | ProposeError::CutOff { .. })) => {
            error(StatusCode::SERVICE_UNAVAILABLE, "no_leader", e.to_string())
        }
        Err(e @ ProposeError::Unknown { .. }) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "outcome_unknown",
            e.to_string(),
        ),
    }
}

#[derive(Deserialize)]
struct ReadQuery {
    #[serde(default = "one")]
    from: u64,
    #[serde(default = "hundred")]
    limit: usize,
}
fn one() -> u64 {
    1
}
fn hundred() -> usize {
    100
}

#[derive(Serialize)]
struct RecordOut {
    seq: u64,
    index: u64,
    payload: String,
}

#[derive(Serialize)]
struct RecordsOut {
    node: NodeId,
    group: GroupId,
    count: u64,
    records: Vec<RecordOut>,
}

/// Groups one `GET /v1/admin/leaders` page lists at most.
pub const LEADERS_PAGE_GROUPS_MAX: usize = 4096;

#[derive(Deserialize)]
struct LeadersQuery {
    /// List groups after this one.
    #[serde(default)]
    after: Option<GroupId>,
    /// At most this many (capped at [`LEADERS_PAGE_GROUPS_MAX`]).
    #[serde(default = "leaders_page_default")]
    limit: usize,
}

fn leaders_page_default() -> usize {
    LEADERS_PAGE_GROUPS_MAX
}

#[derive(Serialize)]
struct LeadersOut {
    node: NodeId,
    /// `[group, leader or null, term, quiesced]`, by group.
    groups: Vec<(GroupId, Option<NodeId>, u64, bool)>,
    /// Pass as `after` for the next page (`null`: this was the last).
    next_after: Option<GroupId>,
}

/// This node's view of who leads each group it hosts, paged, from the groups' published
/// state (no call into any group's Raft core: cheap with thousands of groups).
async fn local_leaders(State(node): State<Arc<Node>>, Query(q): Query<LeadersQuery>) -> Response {
    let limit = q.limit.clamp(1, LEADERS_PAGE_GROUPS_MAX);
    let ids: Vec<GroupId> = node
        .registry
        .groups()
        .into_iter()
        .filter(|g| q.after.is_none_or(|a| *g > a))
        .collect();
    let page = &ids[..ids.len().min(limit)];
    let groups = page
        .iter()
        .map(|g| {
            (
                *g,
                node.registry.leader(*g),
                node.registry.term(*g),
                node.registry.is_quiesced(*g).unwrap_or(false),
            )
        })
        .collect();
    Json(LeadersOut {
        node: node.id,
        groups,
        next_after: (ids.len() > limit).then(|| page[page.len() - 1]),
    })
    .into_response()
}

/// This node's committed records of a partition (a local read, for checking replicas).
async fn read_records(
    State(node): State<Arc<Node>>,
    Path(group): Path<GroupId>,
    Query(q): Query<ReadQuery>,
) -> Response {
    if !node.registry.hosts(group) {
        return error(
            StatusCode::NOT_FOUND,
            "not_hosted",
            format!("node {} does not host partition {group}", node.id),
        );
    }
    let limit = q.limit.min(READ_RECORDS_MAX);
    // At most READ_RECORDS_MAX records, on a blocking-pool thread.
    let store = node.store.clone();
    let result = tokio::task::spawn_blocking(move || {
        chatd_chat::log_count(&store, group).and_then(|count| {
            Ok((
                count,
                chatd_chat::log_records(&store, group, q.from, limit)?,
            ))
        })
    })
    .await;
    let result = match result {
        Ok(r) => r,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    };
    match result {
        Ok((count, records)) => Json(RecordsOut {
            node: node.id,
            group,
            count,
            records: records
                .into_iter()
                .map(|r| RecordOut {
                    seq: r.seq,
                    index: r.index,
                    payload: String::from_utf8_lossy(&r.payload).into_owned(),
                })
                .collect(),
        })
        .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
    }
}

/// This node's own view of one of its groups (no calls to other nodes).
async fn local_group(State(node): State<Arc<Node>>, Path(group): Path<GroupId>) -> Response {
    match node.registry.status(group).await {
        Some(s) => Json(s).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_hosted",
            "partition not hosted here",
        ),
    }
}

#[derive(Serialize)]
struct DigestOut {
    node: NodeId,
    group: GroupId,
    count: u64,
    digest: String,
}

/// A digest of every committed record of a partition on this node.
async fn digest(State(node): State<Arc<Node>>, Path(group): Path<GroupId>) -> Response {
    if !node.registry.hosts(group) {
        return error(
            StatusCode::NOT_FOUND,
            "not_hosted",
            "partition not hosted here",
        );
    }
    // A scan of the whole partition: on a blocking-pool thread, never on the runtime.
    let store = node.store.clone();
    let scanned = tokio::task::spawn_blocking(move || digest_scan(&store, group)).await;
    let (count, h) = match scanned {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    };
    Json(DigestOut {
        node: node.id,
        group,
        count,
        digest: format!("{h:016x}"),
    })
    .into_response()
}

/// The record count and digest of `group`'s opaque log, read in pages of
/// `READ_RECORDS_MAX` records. Blocks on RocksDB: run it on a blocking thread.
fn digest_scan(
    store: &chatd_storage::Storage,
    group: GroupId,
) -> Result<(u64, u64), chatd_storage::StorageError> {
    let mut h = chatd_membership::stable_hash(b"");
    let mut count = 0u64;
    let mut from = 1;
    loop {
        let batch = chatd_chat::log_records(store, group, from, READ_RECORDS_MAX)?;
        let Some(last) = batch.last().map(|r| r.seq) else {
            break;
        };
        for r in &batch {
            let mut bytes = r.seq.to_be_bytes().to_vec();
            bytes.extend_from_slice(&r.payload);
            h = chatd_membership::stable_hash(&[h.to_be_bytes().as_slice(), &bytes].concat());
            count += 1;
        }
        from = last + 1;
    }
    Ok((count, h))
}

/// One replica's view of a partition.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicaView {
    pub node: NodeId,
    pub role: String,
    pub term: u64,
    pub last_index: u64,
    pub committed_index: u64,
    pub applied_index: u64,
    pub purged_index: Option<u64>,
    pub snapshot_index: Option<u64>,
}

/// A partition in the cluster view.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartitionView {
    pub group: GroupId,
    pub replicas: Vec<NodeId>,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_index: u64,
    pub committed_index: u64,
    pub applied_index: u64,
    /// Replicas that did not answer or are behind the leader's commit.
    pub healthy: bool,
    pub replica_views: Vec<ReplicaView>,
}

/// A node in the cluster view.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeView {
    pub id: NodeId,
    pub api_addr: String,
    pub cluster_addr: String,
    pub reachable: bool,
    pub error: Option<String>,
    /// joining, active, draining (removed nodes are not listed; see /v1/admin/nodes).
    pub state: String,
}

/// A replica move in progress, as group 0 records it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MoveView {
    pub group: GroupId,
    pub add: NodeId,
    pub remove: NodeId,
    pub epoch: u64,
}

/// The admin view of the cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterView {
    pub cluster_id: String,
    pub answered_by: NodeId,
    pub metadata_bootstrapped: bool,
    pub nodes: Vec<NodeView>,
    pub partitions: Vec<PartitionView>,
    /// Replica moves in progress.
    pub moves: Vec<MoveView>,
    /// Whether the rebalancer is paused.
    pub rebalance_paused: bool,
    /// Pass as `after` for the next page of groups (`null`: this was the last).
    pub next_after: Option<GroupId>,
}

/// Groups one `GET /v1/admin/cluster` page lists at most (and by default): every group of
/// the largest cluster allowed, so one page holds them all today.
pub const CLUSTER_PAGE_GROUPS_MAX: usize = crate::node::STATUS_PAGE_GROUPS_MAX;

#[derive(Deserialize)]
struct ClusterQuery {
    /// List the groups after this id (group 0 is first).
    after: Option<GroupId>,
    #[serde(default = "cluster_page_default")]
    limit: usize,
}

fn cluster_page_default() -> usize {
    CLUSTER_PAGE_GROUPS_MAX
}

/// The cluster: its nodes, and a page of its groups (`after`, `limit`) with each
/// replica's view, from a status call to every node for that page alone.
async fn cluster_status(
    State(node): State<Arc<Node>>,
    Query(q): Query<ClusterQuery>,
) -> Json<ClusterView> {
    let limit = q.limit.clamp(1, CLUSTER_PAGE_GROUPS_MAX);
    let membership = node.meta.membership();
    let ids: Vec<NodeId> = node.peers().keys().copied().collect();
    let mut groups: Vec<(GroupId, Vec<NodeId>)> = vec![(0, ids.clone())];
    groups.extend(
        (1..=node.partitions() as GroupId).filter_map(|g| node.replicas_of(g).map(|r| (g, r))),
    );
    groups.retain(|(g, _)| q.after.is_none_or(|a| *g > a));
    let next_after = (groups.len() > limit).then(|| groups[limit - 1].0);
    groups.truncate(limit);
    let last = groups.last().map(|(g, _)| *g);
    // A node hosts a subset of these groups: its first `limit` after `after` hold them all.
    let statuses = futures::future::join_all(
        ids.iter()
            .map(|id| node.peer_status_page(*id, q.after, limit)),
    )
    .await;
    let mut nodes = Vec::new();
    let mut per_group: BTreeMap<GroupId, Vec<ReplicaView>> = BTreeMap::new();
    let mut leaders: BTreeMap<GroupId, (u64, NodeId)> = BTreeMap::new();
    for (id, status) in ids.iter().zip(statuses) {
        let Some(peer) = node.peer(*id) else { continue };
        let state = membership
            .as_ref()
            .and_then(|m| m.state_of(*id))
            .map_or("unknown", chatd_membership::NodeState::name)
            .to_string();
        nodes.push(NodeView {
            state,
            id: *id,
            api_addr: peer.api_addr.to_string(),
            cluster_addr: peer.cluster_addr.to_string(),
            reachable: status.is_ok(),
            error: status.as_ref().err().cloned(),
        });
        let Ok(status) = status else { continue };
        for g in status
            .groups
            .into_iter()
            .filter(|g| last.is_some_and(|l| g.group <= l))
        {
            if g.is_leader() {
                let e = leaders.entry(g.group).or_insert((g.term, *id));
                if g.term >= e.0 {
                    *e = (g.term, *id);
                }
            }
            per_group.entry(g.group).or_default().push(ReplicaView {
                node: *id,
                role: g.role,
                term: g.term,
                last_index: g.last_index,
                committed_index: g.committed_index,
                applied_index: g.applied_index,
                purged_index: g.purged_index,
                snapshot_index: g.snapshot_index,
            });
        }
    }
    let partitions = groups
        .into_iter()
        .map(|(group, replicas)| {
            let views = per_group.remove(&group).unwrap_or_default();
            let leader = leaders.get(&group).map(|(_, n)| *n);
            let lv = views.iter().find(|v| Some(v.node) == leader);
            let (term, last, committed, applied) = lv
                .map(|v| (v.term, v.last_index, v.committed_index, v.applied_index))
                .unwrap_or((0, 0, 0, 0));
            let healthy = leader.is_some()
                && views.len() == replicas.len()
                && views.iter().all(|v| v.applied_index + 1000 >= committed);
            PartitionView {
                group,
                replicas,
                leader,
                term,
                last_index: last,
                committed_index: committed,
                applied_index: applied,
                healthy,
                replica_views: views,
            }
        })
        .collect();
    Json(ClusterView {
        cluster_id: node.config.cluster_id.clone(),
        answered_by: node.id,
        metadata_bootstrapped: node.meta.current().is_some(),
        nodes,
        partitions,
        moves: membership
            .as_ref()
            .map(|m| {
                m.moves()
                    .map(|(group, mv, epoch)| MoveView {
                        group,
                        add: mv.add,
                        remove: mv.remove,
                        epoch,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        rebalance_paused: membership.as_ref().is_some_and(|m| m.rebalance_paused),
        next_after,
    })
}
