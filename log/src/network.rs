//! Raft between nodes: openraft's three RPCs over gRPC (`rune.raft.v1.Raft`), each message one
//! of openraft's own requests or results as JSON, the encoding the log's entries have on disk.
//!
//! [`Network`] is the client side openraft drives (one [`Peer`] per member, connecting lazily
//! and again after a failure); [`RaftService`] is the server side, handing each request to the
//! local raft. A single voter never calls a peer: its member address is `local`.
//!
//! Beside raft's own RPCs, `Propose` hands a write made on a follower to the leader
//! ([`Forwarder`]), as etcd's followers pass proposals on: whichever member a client talks to,
//! the write goes through the leader's batcher and the answer is the applied outcome.
//!
//! A peer that cannot be reached is [`Unreachable`] (openraft backs off before retrying it);
//! an AppendEntries refused as too large is `PayloadTooLarge` (openraft sends fewer entries);
//! any other transport failure is a network error; an error raft itself answered comes back as
//! the remote's error, as openraft expects.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft};
use rune_proto::raft::raft_client::RaftClient;
use rune_proto::raft::raft_server::{Raft as RaftRpc, RaftServer};
use rune_proto::raft::Message;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::batch::Batcher;
use crate::join::Joins;
use crate::node::{ProposeError, Proposed};
use crate::pki::NodeTls;
use crate::space::{NoSpace, Space};
use crate::types::TypeConfig;
use rune_statemachine::{Envelope, Outcome};

/// The largest raft message either end accepts: an AppendEntries of many large batches, or a
/// snapshot chunk ([`SNAPSHOT_CHUNK`]) with its metadata. gRPC's default (4 MiB) would refuse
/// a log entry holding a few large secrets.
pub const MAX_MESSAGE: usize = 64 << 20;

/// Bytes of a snapshot sent per InstallSnapshot call.
pub const SNAPSHOT_CHUNK: u64 = 4 << 20;

/// How long a connection attempt to a peer may take before it counts as unreachable: well
/// under the election timeout, so a dead peer does not hold up a vote.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Creates a [`Peer`] for each member openraft replicates to or asks for votes: over mutual
/// TLS with the cluster's certificates when it has them ([`crate::pki`]), in plain text only
/// where there is no one else to talk to or a test asks for it.
#[derive(Debug, Default, Clone)]
pub struct Network {
    tls: Option<Arc<NodeTls>>,
    contacts: Arc<Contacts>,
}

impl Network {
    /// Peers reached with `tls` (none: plain text).
    pub fn new(tls: Option<Arc<NodeTls>>) -> Self {
        Self {
            tls,
            contacts: Arc::default(),
        }
    }

    /// When each peer last answered this node.
    pub fn contacts(&self) -> Arc<Contacts> {
        self.contacts.clone()
    }
}

/// When each peer last answered a raft RPC of this node (a leader hears every member each
/// heartbeat): how the leader tells a node that is gone from one that is idle.
#[derive(Debug, Default)]
pub struct Contacts(std::sync::Mutex<std::collections::HashMap<u64, std::time::Instant>>);

impl Contacts {
    fn heard(&self, peer: u64) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(peer, std::time::Instant::now());
    }

    /// When `peer` last answered, if it ever did.
    pub fn last(&self, peer: u64) -> Option<std::time::Instant> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&peer).copied()
    }
}

/// One member, as the leader (or a candidate) reaches it.
pub struct Peer {
    target: u64,
    addr: String,
    tls: Option<Arc<NodeTls>>,
    client: Option<RaftClient<Channel>>,
    contacts: Arc<Contacts>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Self::Network {
        Peer {
            target,
            addr: node.addr.clone(),
            tls: self.tls.clone(),
            client: None,
            contacts: self.contacts.clone(),
        }
    }
}

type RpcResult<T, E = openraft::error::Infallible> = Result<T, RPCError<u64, BasicNode, RaftError<u64, E>>>;

impl Peer {
    /// The client, made on first use; tonic reconnects a lazy channel by itself after a
    /// failure.
    fn client(&mut self) -> Result<RaftClient<Channel>, Unreachable> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let c = dial(&self.addr, self.tls.as_deref(), self.target).map_err(|e| Unreachable::new(&e))?;
        self.client = Some(c.clone());
        Ok(c)
    }

    /// Sends `req` (with `data` beside it) by `call` and decodes raft's result.
    async fn send<Q, P, E, F, Fut>(
        &mut self,
        req: &Q,
        data: Vec<u8>,
        entries: u64,
        option: &RPCOption,
        call: F,
    ) -> RpcResult<P, E>
    where
        Q: Serialize,
        P: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        F: FnOnce(RaftClient<Channel>, Request<Message>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<Message>, Status>>,
    {
        let json = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        // Too large for the peer to accept: openraft sends fewer entries when told so.
        let too_large = || RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint((entries / 2).max(1)));
        if entries > 1 && json.len() + data.len() > MAX_MESSAGE {
            return Err(too_large());
        }
        let client = self.client().map_err(RPCError::Unreachable)?;
        let mut request = Request::new(Message { json, data });
        request.set_timeout(option.hard_ttl());
        let reply = match call(client, request).await {
            Ok(r) => r.into_inner(),
            // Refused or no route: back off before trying this peer again.
            Err(s) if s.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&StatusError(s))))
            }
            Err(s)
                if entries > 1
                    && matches!(s.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted) =>
            {
                return Err(too_large())
            }
            Err(s) => return Err(RPCError::Network(NetworkError::new(&StatusError(s)))),
        };
        self.contacts.heard(self.target);
        let result: Result<P, RaftError<u64, E>> =
            serde_json::from_slice(&reply.json).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// A lazy client of member `target`'s raft port at `addr`: over mutual TLS with `tls`.
fn dial(
    addr: &str,
    tls: Option<&NodeTls>,
    target: u64,
) -> Result<RaftClient<Channel>, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.client(target))?;
    }
    let endpoint = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    Ok(RaftClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

/// The answer to a forwarded proposal.
#[derive(serde::Serialize, serde::Deserialize)]
enum Forwarded {
    /// Committed and applied at `index`, with what apply decided.
    Applied {
        /// The entry's index.
        index: u64,
        /// What applying it decided.
        outcome: Outcome,
    },
    /// The leader's data dir is below its reserve.
    NoSpace(NoSpace),
    /// The member asked no longer leads: nothing was proposed.
    NotLeader,
    /// Not taken: no longer the leader, shutting down, or storage failed.
    Unavailable(String),
}

/// The answer to a read-index request.
#[derive(serde::Serialize, serde::Deserialize)]
enum ReadIndex {
    /// Apply up to here, then read.
    Index(u64),
    /// The member asked no longer leads.
    NotLeader,
    /// The leader could not confirm it leads (no quorum answered, shutting down).
    Unavailable(String),
}

/// The answer to a forwarded removal of a member.
#[derive(serde::Serialize, serde::Deserialize)]
enum Removed {
    /// The member is out.
    Done,
    /// The member asked no longer leads: nothing was changed.
    NotLeader,
    /// The leader refused (the last voter, not a member) or could not commit the change.
    Refused(String),
}

/// How long a forwarded proposal may take, from the follower's side: as long as a write may.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// Hands this follower's proposals to the leader, over one connection kept per leader.
pub(crate) struct Forwarder {
    tls: Option<Arc<NodeTls>>,
    client: std::sync::Mutex<Option<(u64, String, RaftClient<Channel>)>>,
}

impl Forwarder {
    pub(crate) fn new(tls: Option<Arc<NodeTls>>) -> Self {
        Self {
            tls,
            client: std::sync::Mutex::new(None),
        }
    }

    fn client(&self, leader: u64, addr: &str) -> Result<RaftClient<Channel>, ProposeError> {
        let mut cached = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((id, a, c)) = cached.as_ref() {
            if *id == leader && a == addr {
                return Ok(c.clone());
            }
        }
        let c = dial(addr, self.tls.as_deref(), leader).map_err(|e| {
            ProposeError::Unavailable(format!("cannot reach the leader (node {leader} at {addr}): {e}"))
        })?;
        *cached = Some((leader, addr.to_string(), c.clone()));
        Ok(c)
    }

    /// Proposes `envelope` through the leader `leader` at `addr` and waits for its outcome.
    pub(crate) async fn propose(
        &self,
        leader: u64,
        addr: &str,
        envelope: &Envelope,
    ) -> Result<Proposed, Forward> {
        let failed = Forward::Failed;
        let mut client = self.client(leader, addr).map_err(failed)?;
        let json =
            serde_json::to_vec(envelope).map_err(|e| failed(ProposeError::Unavailable(e.to_string())))?;
        let reply = match client.propose(forwarded(json)).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                let why = format!(
                    "the leader (node {leader} at {addr}) did not answer: {}",
                    s.message()
                );
                // Refused at connect: nothing was sent, so asking the next leader is safe.
                // Anything later may have reached the leader: the caller hears it.
                return Err(if never_connected(&s) {
                    Forward::Retry(why)
                } else {
                    failed(ProposeError::Unavailable(why))
                });
            }
        };
        match serde_json::from_slice(&reply.json) {
            Ok(Forwarded::Applied { index, outcome }) => Ok(Proposed { index, outcome }),
            Ok(Forwarded::NoSpace(n)) => Err(failed(ProposeError::NoSpace(n))),
            Ok(Forwarded::NotLeader) => Err(Forward::Retry(format!("node {leader} no longer leads"))),
            Ok(Forwarded::Unavailable(why)) => Err(failed(ProposeError::Unavailable(format!(
                "the leader (node {leader}): {why}"
            )))),
            Err(e) => Err(failed(ProposeError::Unavailable(format!(
                "the leader's answer: {e}"
            )))),
        }
    }

    /// Asks the leader `leader` at `addr` to take member `id` out: `Err(Retry)` when it did
    /// not (it no longer leads, or was not reached), `Ok(Err(why))` when it refused.
    pub(crate) async fn remove(
        &self,
        leader: u64,
        addr: &str,
        id: u64,
    ) -> Result<Result<(), String>, Forward> {
        let mut client = self.client(leader, addr).map_err(Forward::Failed)?;
        let why = |m: &str| format!("the leader (node {leader} at {addr}): {m}");
        let json = serde_json::to_vec(&id).map_err(|e| Forward::Retry(e.to_string()))?;
        let reply = match client.remove_member(forwarded(json)).await {
            Ok(r) => r.into_inner(),
            // Removing a member twice is refused, not repeated: asking again is safe.
            Err(s) => return Err(Forward::Retry(why(s.message()))),
        };
        match serde_json::from_slice(&reply.json) {
            Ok(Removed::Done) => Ok(Ok(())),
            Ok(Removed::NotLeader) => Err(Forward::Retry(why("no longer leads"))),
            Ok(Removed::Refused(m)) => Ok(Err(m)),
            Err(e) => Err(Forward::Retry(why(&e.to_string()))),
        }
    }

    /// Asks member `id` at `addr` for its own view.
    pub(crate) async fn status(&self, id: u64, addr: &str) -> Result<crate::node::MemberView, String> {
        let mut client = dial(addr, self.tls.as_deref(), id).map_err(|e| e.to_string())?;
        let reply = client
            .status(forwarded(b"null".to_vec()))
            .await
            .map_err(|s| s.message().to_string())?;
        serde_json::from_slice(&reply.into_inner().json).map_err(|e| e.to_string())
    }

    /// Asks the leader `leader` at `addr` for its read index (confirmed with a quorum).
    pub(crate) async fn read_index(&self, leader: u64, addr: &str) -> Result<u64, Forward> {
        let mut client = self.client(leader, addr).map_err(Forward::Failed)?;
        let why = |m: String| format!("the leader (node {leader} at {addr}): {m}");
        // A read changes nothing: whatever failed, the next leader may be asked.
        let reply = match client.read_index(forwarded(b"null".to_vec())).await {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(Forward::Retry(why(s.message().to_string()))),
        };
        match serde_json::from_slice(&reply.json) {
            Ok(ReadIndex::Index(i)) => Ok(i),
            Ok(ReadIndex::NotLeader) => Err(Forward::Retry(why("no longer leads".into()))),
            Ok(ReadIndex::Unavailable(m)) => Err(Forward::Retry(why(m))),
            Err(e) => Err(Forward::Failed(ProposeError::Unavailable(why(e.to_string())))),
        }
    }
}

/// A request a follower makes of the leader, given as long as a write may take.
fn forwarded(json: Vec<u8>) -> Request<Message> {
    let mut request = Request::new(Message {
        json,
        data: Vec::new(),
    });
    request.set_timeout(FORWARD_TIMEOUT);
    request
}

/// Why a forwarded proposal was not applied.
pub(crate) enum Forward {
    /// The leader did not take it (it no longer leads, or could not be reached at all): it may
    /// be proposed again to the next leader.
    Retry(String),
    /// It may or may not have been written: the caller hears this.
    Failed(ProposeError),
}

/// Whether `status` is a connection that was never made (refused, no route): a request that
/// was never sent.
fn never_connected(status: &Status) -> bool {
    use std::error::Error as _;
    use std::io::ErrorKind::{ConnectionRefused, HostUnreachable, NetworkUnreachable};
    let mut source = status.source();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ConnectionRefused | HostUnreachable | NetworkUnreachable
            );
        }
        source = e.source();
    }
    false
}

/// A gRPC status as an error openraft can hold.
#[derive(Debug, thiserror::Error)]
#[error("{} ({:?})", .0.message(), .0.code())]
struct StatusError(Status);

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>> {
        let entries = rpc.entries.len() as u64;
        self.send(&rpc, Vec::new(), entries, &option, |mut c, r| async move {
            c.append_entries(r).await
        })
        .await
    }

    async fn vote(&mut self, rpc: VoteRequest<u64>, option: RPCOption) -> RpcResult<VoteResponse<u64>> {
        self.send(
            &rpc,
            Vec::new(),
            0,
            &option,
            |mut c, r| async move { c.vote(r).await },
        )
        .await
    }

    async fn install_snapshot(
        &mut self,
        mut rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        let data = std::mem::take(&mut rpc.data);
        self.send(&rpc, data, 0, &option, |mut c, r| async move {
            c.install_snapshot(r).await
        })
        .await
    }
}

/// The raft port's gRPC service: hands each peer's request to this node's raft, and the
/// proposals followers forward to its batcher.
pub struct RaftService {
    raft: Raft<TypeConfig>,
    batcher: Arc<Batcher>,
    space: Arc<Space>,
    /// Whether (and how) new nodes may join here.
    joins: Option<Arc<Joins>>,
}

/// The largest `Join` request: anyone the CA's trust lets finish the handshake may send one,
/// so it is read only this far (a real one is well under a kilobyte).
const JOIN_LIMIT: usize = 64 << 10;
/// The path of the one RPC a client without a member's certificate may call.
const JOIN_PATH: &str = "/rune.raft.v1.Raft/Join";

/// Who may call, decided before a request's body is read: over TLS every RPC but `Join` needs
/// a certificate naming a current member (so a stranger's 64 MiB `AppendEntries` is refused
/// unread), and a `Join` is read up to [`JOIN_LIMIT`] bytes. A tower layer on the raft port.
#[derive(Clone)]
pub(crate) struct Gate {
    raft: Raft<TypeConfig>,
    tls: bool,
    /// The state, for the highest id any membership applied here held.
    state: Arc<crate::db::StateDb>,
}

impl Gate {
    /// The gate of `raft`'s port; without TLS (tests on loopback) everyone is let in.
    pub(crate) fn new(raft: Raft<TypeConfig>, tls: bool, state: Arc<crate::db::StateDb>) -> Gate {
        Gate { raft, tls, state }
    }

    /// The highest raft id this node has seen in a membership (0 when unknown).
    fn highest_member(&self) -> u64 {
        let read = || -> Option<u64> {
            let txn = self.state.read().ok()?;
            let t = txn.open_table(crate::state_machine::SM_META).ok()?;
            let v = t.get(crate::state_machine::HIGHEST_MEMBER).ok()??;
            serde_json::from_slice(v.value()).ok()
        };
        read().unwrap_or(0)
    }

    /// The client presented a certificate (the handshake has checked it against the cluster's
    /// CA) naming a member of the membership this node holds, or a node admitted after what
    /// this node has seen (ids are given in rising order, never twice: a member that was away
    /// while others joined must still hear from them). What is refused is an id this node
    /// knew that the membership no longer holds: a removed node's. A node with no membership
    /// yet (one joining) takes its leader's word.
    fn member(&self, certs: Option<&[tonic::transport::CertificateDer<'static>]>) -> Result<(), Status> {
        if !self.tls {
            return Ok(());
        }
        let Some(cert) = certs.and_then(|c| c.first()) else {
            return Err(Status::unauthenticated(
                "the raft port serves members only: present a certificate of the cluster's CA",
            ));
        };
        let Some(id) = crate::pki::member_id(cert) else {
            return Err(Status::permission_denied(
                "the certificate names no member (node-<id>.raft.rune)",
            ));
        };
        let m = self.raft.metrics();
        let membership = m.borrow().membership_config.clone();
        let membership = membership.membership();
        if membership.nodes().next().is_none() || membership.get_node(&id).is_some() {
            return Ok(());
        }
        let known = membership
            .nodes()
            .map(|(n, _)| *n)
            .max()
            .unwrap_or(0)
            .max(self.highest_member());
        if id <= known {
            return Err(Status::permission_denied(format!(
                "node {id} is not a member of this cluster (it was removed)"
            )));
        }
        Ok(())
    }
}

impl<S> tower::Layer<S> for Gate {
    type Service = Gated<S>;

    fn layer(&self, inner: S) -> Gated<S> {
        Gated {
            inner,
            gate: self.clone(),
        }
    }
}

/// The raft port's service behind its [`Gate`].
#[derive(Clone)]
pub(crate) struct Gated<S> {
    inner: S,
    gate: Gate,
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for Gated<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path() == JOIN_PATH {
            let req = req.map(|b| tonic::body::Body::new(http_body_util::Limited::new(b, JOIN_LIMIT)));
            return Box::pin(self.inner.call(req));
        }
        let certs = req
            .extensions()
            .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
            .and_then(|i| i.peer_certs());
        match self.gate.member(certs.as_deref().map(Vec::as_slice)) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

impl RaftService {
    /// The service for `raft`, with message limits matching the peers' ([`MAX_MESSAGE`]).
    pub(crate) fn server(
        raft: Raft<TypeConfig>,
        batcher: Arc<Batcher>,
        space: Arc<Space>,
        joins: Option<Arc<Joins>>,
    ) -> RaftServer<Self> {
        RaftServer::new(Self {
            raft,
            batcher,
            space,
            joins,
        })
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
    }

    /// Whether this member leads, as far as it knows.
    fn leads(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.current_leader == Some(m.id)
    }

    /// A forwarded proposal's answer. Never forwarded again: a member that no longer leads
    /// says so, and the follower asks again once it knows the new leader.
    async fn take_forwarded(&self, envelope: Envelope) -> Forwarded {
        if !self.leads() {
            return Forwarded::NotLeader;
        }
        if let Err(n) = self.space.check(self.space.need(envelope.command.uses_reserve())) {
            return Forwarded::NoSpace(n);
        }
        match self.batcher.propose(envelope).await {
            Ok(p) => Forwarded::Applied {
                index: p.index,
                outcome: p.outcome,
            },
            Err(ProposeError::NoSpace(n)) => Forwarded::NoSpace(n),
            // Lost the lead between the check above and the batcher: nothing was appended.
            Err(ProposeError::NotLeader(_)) => Forwarded::NotLeader,
            Err(e) => Forwarded::Unavailable(e.to_string()),
        }
    }
}

/// A raft port being served ([`crate::Log::serve_raft`]): over mutual TLS with the member's
/// certificates (a client must present one the cluster's CA signed), in plain text without.
/// Stopping it closes the listener and every connection, as a crash would for the peers.
pub struct RaftPort {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RaftPort {
    /// Serves `service` behind `gate` on `listener`.
    pub(crate) fn start(
        service: RaftServer<RaftService>,
        gate: Gate,
        listener: tokio::net::TcpListener,
        tls: Option<&NodeTls>,
    ) -> Result<Self, tonic::transport::Error> {
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            server = server.tls_config(tls.server())?;
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let router = server.layer(gate).add_service(service);
        let task = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Self {
            stop: Some(stop),
            task,
        })
    }

    /// Stops serving and waits until the listener and the connections are closed.
    pub async fn stop(mut self) -> Result<(), tonic::transport::Error> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match (&mut self.task).await {
            Ok(r) => r,
            // The serving task panicked or was cancelled: nothing is served any more.
            Err(_) => Ok(()),
        }
    }
}

impl Drop for RaftPort {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn decode<T: DeserializeOwned>(m: &Message) -> Result<T, Status> {
    serde_json::from_slice(&m.json)
        .map_err(|e| Status::invalid_argument(format!("not a raft message of this kind: {e}")))
}

fn reply<T: Serialize>(result: &T) -> Result<Response<Message>, Status> {
    let json = serde_json::to_vec(result).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(Message {
        json,
        data: Vec::new(),
    }))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(&self, request: Request<Message>) -> Result<Response<Message>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(request.get_ref())?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<Message>) -> Result<Response<Message>, Status> {
        let rpc: VoteRequest<u64> = decode(request.get_ref())?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, request: Request<Message>) -> Result<Response<Message>, Status> {
        let message = request.into_inner();
        let mut rpc: InstallSnapshotRequest<TypeConfig> = decode(&message)?;
        rpc.data = message.data;
        reply(&self.raft.install_snapshot(rpc).await)
    }

    async fn propose(&self, request: Request<Message>) -> Result<Response<Message>, Status> {
        let envelope: Envelope = decode(request.get_ref())?;
        reply(&self.take_forwarded(envelope).await)
    }

    async fn read_index(&self, _request: Request<Message>) -> Result<Response<Message>, Status> {
        let answer = if !self.leads() {
            ReadIndex::NotLeader
        } else {
            match self.raft.get_read_log_id().await {
                Ok((read, _applied)) => ReadIndex::Index(read.map_or(0, |l| l.index)),
                Err(e) => ReadIndex::Unavailable(e.to_string()),
            }
        };
        reply(&answer)
    }

    async fn join(&self, request: Request<Message>) -> Result<Response<Message>, Status> {
        let joins = self
            .joins
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("this member does not admit new nodes"))?;
        let json = joins.answer(&self.raft, &request.get_ref().json).await?;
        Ok(Response::new(Message {
            json,
            data: Vec::new(),
        }))
    }

    async fn remove_member(&self, request: Request<Message>) -> Result<Response<Message>, Status> {
        let id: u64 = decode(request.get_ref())?;
        let answer = if !self.leads() {
            Removed::NotLeader
        } else {
            match crate::node::remove_member(&self.raft, id).await {
                Ok(()) => Removed::Done,
                // The follower names it a membership error again.
                Err(crate::LogError::Membership(why)) => Removed::Refused(why),
                Err(e) => Removed::Refused(e.to_string()),
            }
        };
        reply(&answer)
    }

    async fn status(&self, _request: Request<Message>) -> Result<Response<Message>, Status> {
        let status = crate::node::ClusterStatus::from_metrics(&self.raft.metrics().borrow());
        reply(&crate::node::MemberView::from(&status))
    }
}
