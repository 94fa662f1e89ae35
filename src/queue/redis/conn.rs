//! One connection type for a single Redis server and for Redis Cluster, so the queue's code is
//! the same on both: commands and scripts go through [`Conn`], which the `redis` crate routes by
//! their first key on a cluster (every script's keys share one hash tag, so one slot).

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

/// A multiplexed connection to one server, or to every master of a cluster. Cheap to clone.
#[derive(Clone)]
pub(crate) enum Conn {
    /// One server, reconnected on failure.
    Single(ConnectionManager),
    /// A cluster: the slot map is followed (MOVED, ASK) and refreshed after a failover.
    Cluster(ClusterConnection),
}

impl Conn {
    /// Waits until at least `replicas` replicas of the master that owns `key`'s slot have
    /// every write this connection sent it so far, or `timeout` passes; returns how many did.
    /// The connection to each master is shared, so this also covers other tasks' writes: a
    /// stronger wait, never a weaker one.
    pub(crate) async fn wait_for_replicas(
        &mut self,
        key: &str,
        replicas: u32,
        timeout: Duration,
    ) -> Result<u32, RedisError> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(replicas)
            .arg(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        match self {
            Conn::Single(conn) => wait.query_async(conn).await,
            Conn::Cluster(conn) => {
                // Left to itself the client sends WAIT to every node; it must reach the master
                // that took the write.
                let route = Route::with_key(key, SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                let value = conn.route_command(wait, routing).await?;
                Ok(redis::from_redis_value(value)?)
            }
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}
