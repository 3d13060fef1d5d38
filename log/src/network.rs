//! Raft between nodes: openraft's three RPCs over gRPC (`rune.raft.v1.Raft`), each message one
//! of openraft's own requests or results as JSON, the encoding the log's entries have on disk.
//!
//! [`Network`] is the client side openraft drives (one [`Peer`] per member, connecting lazily
//! and again after a failure); [`RaftService`] is the server side, handing each request to the
//! local raft. A single voter never calls a peer: its member address is `local`.
//!
//! A peer that cannot be reached is [`Unreachable`] (openraft backs off before retrying it);
//! any other transport failure is a network error (retried at once); an error raft itself
//! answered comes back as the remote's error, as openraft expects.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
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

use crate::pki::NodeTls;
use crate::types::TypeConfig;

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
}

impl Network {
    /// Peers reached with `tls` (none: plain text).
    pub fn new(tls: Option<NodeTls>) -> Self {
        Self {
            tls: tls.map(Arc::new),
        }
    }
}

/// One member, as the leader (or a candidate) reaches it.
pub struct Peer {
    target: u64,
    addr: String,
    tls: Option<Arc<NodeTls>>,
    client: Option<RaftClient<Channel>>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Self::Network {
        Peer {
            target,
            addr: node.addr.clone(),
            tls: self.tls.clone(),
            client: None,
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
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint =
            Endpoint::from_shared(format!("{scheme}://{}", self.addr)).map_err(|e| Unreachable::new(&e))?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.client(self.target))
                .map_err(|e| Unreachable::new(&e))?;
        }
        let endpoint = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let c = RaftClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        self.client = Some(c.clone());
        Ok(c)
    }

    /// Sends `req` (with `data` beside it) by `call` and decodes raft's result.
    async fn send<Q, P, E, F, Fut>(
        &mut self,
        req: &Q,
        data: Vec<u8>,
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
        let client = self.client().map_err(RPCError::Unreachable)?;
        let mut request = Request::new(Message { json, data });
        request.set_timeout(option.hard_ttl());
        let reply = match call(client, request).await {
            Ok(r) => r.into_inner(),
            // Refused or no route: back off before trying this peer again.
            Err(s) if s.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&StatusError(s))))
            }
            Err(s) => return Err(RPCError::Network(NetworkError::new(&StatusError(s)))),
        };
        let result: Result<P, RaftError<u64, E>> =
            serde_json::from_slice(&reply.json).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
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
        self.send(&rpc, Vec::new(), &option, |mut c, r| async move {
            c.append_entries(r).await
        })
        .await
    }

    async fn vote(&mut self, rpc: VoteRequest<u64>, option: RPCOption) -> RpcResult<VoteResponse<u64>> {
        self.send(
            &rpc,
            Vec::new(),
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
        self.send(&rpc, data, &option, |mut c, r| async move {
            c.install_snapshot(r).await
        })
        .await
    }
}

/// The raft port's gRPC service: hands each peer's request to this node's raft.
pub struct RaftService {
    raft: Raft<TypeConfig>,
}

impl RaftService {
    /// The service for `raft`, with message limits matching the peers' ([`MAX_MESSAGE`]).
    pub fn server(raft: Raft<TypeConfig>) -> RaftServer<Self> {
        RaftServer::new(Self { raft })
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }
}

/// A raft port being served ([`crate::Log::serve_raft`]): over mutual TLS with the member's
/// certificates (a client must present one the cluster's CA signed), in plain text without.
/// Stopping it closes the listener and every connection, as a crash would for the peers.
pub struct RaftPort {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RaftPort {
    /// Serves `service` on `listener`.
    pub(crate) fn start(
        service: RaftServer<RaftService>,
        listener: tokio::net::TcpListener,
        tls: Option<&NodeTls>,
    ) -> Result<Self, tonic::transport::Error> {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            server = server.tls_config(tls.server())?;
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let router = server.add_service(service);
        let task = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Self {
            addr,
            stop: Some(stop),
            task,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
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
}
