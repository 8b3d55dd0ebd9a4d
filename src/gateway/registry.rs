//! The agent registry (gateway.md §2): who has connected, as what, and when
//! it was last heard from.
//!
//! Hello registers or refreshes an agent (tenant, partition, version, host,
//! capabilities, first/last seen); every PushStatus and StreamStatus moves
//! `last_seen`. An agent not heard from for [`OFFLINE_AFTER_SECS`] is
//! offline. Identity fields come from the certificate, never from the
//! request. With a database the registry is persisted (first contact
//! survives restarts); a failed write is logged and the RPC goes on.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use serde::Serialize;

use super::store::Store;

/// No heartbeat for this long ⇒ offline (gateway.md §2: 5 minutes).
pub const OFFLINE_AFTER_SECS: i64 = 300;

/// The capability an agent advertises when it can run integrations.
pub const SYNC_CAPABILITY: &str = "sync";

/// One registered agent. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentRecord {
    pub tenant: String,
    pub agent_id: String,
    pub partition: String,
    pub version: String,
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub capabilities: Vec<String>,
    pub first_seen: i64,
    pub last_seen: i64,
}

impl AgentRecord {
    /// An agent is sync-capable iff it advertises `sync`.
    pub fn sync_capable(&self) -> bool {
        self.capabilities.iter().any(|c| c == SYNC_CAPABILITY)
    }

    /// Heard from within [`OFFLINE_AFTER_SECS`] of `now`.
    pub fn online(&self, now: i64) -> bool {
        now - self.last_seen < OFFLINE_AFTER_SECS
    }
}

/// The registry: in memory, written through to the database when there is one.
pub struct Registry {
    agents: Mutex<BTreeMap<(String, String), AgentRecord>>,
    store: Option<Store>,
}

impl Registry {
    /// The registry as the database remembers it (empty without one).
    pub async fn load(store: Option<Store>) -> Result<Self, super::store::StoreError> {
        let known = match &store {
            Some(store) => store.agents().await?,
            None => Vec::new(),
        };
        let agents = known
            .into_iter()
            .map(|a| ((a.tenant.clone(), a.agent_id.clone()), a))
            .collect();
        Ok(Self {
            agents: Mutex::new(agents),
            store,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), AgentRecord>> {
        self.agents.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A Hello: registers the agent, or refreshes it keeping `first_seen`.
    pub async fn hello(&self, mut agent: AgentRecord) {
        {
            let mut agents = self.lock();
            let key = (agent.tenant.clone(), agent.agent_id.clone());
            if let Some(known) = agents.get(&key) {
                agent.first_seen = known.first_seen.min(agent.first_seen);
            }
            agents.insert(key, agent.clone());
        }
        if let Some(store) = &self.store {
            if let Err(e) = store.upsert_agent(agent.clone()).await {
                tracing::warn!(agent_id = %agent.agent_id, "agent registry not saved: {e}");
            }
        }
    }

    /// The agent was heard from at `at` (PushStatus, StreamStatus). An agent
    /// that never said Hello is not registered by this.
    pub async fn seen(&self, tenant: &str, agent_id: &str, at: i64) {
        let known = {
            let mut agents = self.lock();
            match agents.get_mut(&(tenant.to_owned(), agent_id.to_owned())) {
                Some(agent) => {
                    agent.last_seen = agent.last_seen.max(at);
                    true
                }
                None => false,
            }
        };
        if let (true, Some(store)) = (known, &self.store) {
            if let Err(e) = store.touch_agent(tenant, agent_id, at).await {
                tracing::warn!(agent_id, "agent registry not saved: {e}");
            }
        }
    }

    /// Every registered agent, ordered by (tenant, agent_id).
    pub fn list(&self) -> Vec<AgentRecord> {
        self.lock().values().cloned().collect()
    }

    pub fn get(&self, tenant: &str, agent_id: &str) -> Option<AgentRecord> {
        self.lock()
            .get(&(tenant.to_owned(), agent_id.to_owned()))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::store::testing;

    fn agent(id: &str, capabilities: &[&str], at: i64) -> AgentRecord {
        AgentRecord {
            tenant: "default".into(),
            agent_id: id.into(),
            partition: "p1".into(),
            version: "1.0".into(),
            hostname: "edge".into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
            first_seen: at,
            last_seen: at,
        }
    }

    #[test]
    fn sync_capable_iff_it_advertises_sync_and_offline_after_five_minutes() {
        let a = agent("a", &["sync", "icmp"], 1_000);
        assert!(a.sync_capable());
        assert!(!agent("b", &["icmp", "synced"], 1_000).sync_capable());
        assert!(a.online(1_000 + OFFLINE_AFTER_SECS - 1));
        assert!(!a.online(1_000 + OFFLINE_AFTER_SECS));
    }

    #[tokio::test]
    async fn hello_keeps_first_seen_and_heartbeats_move_last_seen_forward_only() {
        let dir = tempfile::tempdir().unwrap();
        for location in testing::fresh_locations(dir.path(), "registry").await {
            registry_remembers(&location).await;
        }
    }

    async fn registry_remembers(location: &crate::gateway::DatabaseLocation) {
        let store = testing::open(location).await;
        let registry = Registry::load(Some(store.clone())).await.unwrap();
        registry.hello(agent("a", &["sync"], 100)).await;
        let mut again = agent("a", &["sync"], 200);
        again.version = "1.1".into();
        registry.hello(again).await;
        registry.seen("default", "a", 250).await;
        registry.seen("default", "a", 240).await; // late, out of order
        registry.seen("default", "ghost", 260).await; // never said Hello

        let a = registry.get("default", "a").unwrap();
        assert_eq!(
            (a.first_seen, a.last_seen, a.version.as_str()),
            (100, 250, "1.1")
        );
        assert_eq!(registry.list().len(), 1);
        // The database holds the same, and a new registry starts from it.
        assert_eq!(store.agents().await.unwrap(), vec![a.clone()]);
        drop(registry);
        let reopened = Registry::load(Some(testing::open(location).await))
            .await
            .unwrap();
        assert_eq!(reopened.get("default", "a"), Some(a));
    }
}
