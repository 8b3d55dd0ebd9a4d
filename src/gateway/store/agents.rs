//! The `agents` table behind the registry (gateway.md §2).

use super::db::{DbError, Row};
use super::{Store, StoreError};
use crate::gateway::registry::AgentRecord;

impl Store {
    /// Registers or refreshes an agent; `first_seen` of a known agent is
    /// kept.
    pub async fn upsert_agent(&self, agent: AgentRecord) -> Result<(), StoreError> {
        let capabilities =
            serde_json::to_string(&agent.capabilities).unwrap_or_else(|_| "[]".to_owned());
        self.call(move |tx| {
            tx.execute(
                "INSERT INTO agents (tenant, agent_id, partition, version, hostname, os, arch,
                                     capabilities, first_seen, last_seen)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (tenant, agent_id) DO UPDATE SET
                    partition = excluded.partition, version = excluded.version,
                    hostname = excluded.hostname, os = excluded.os, arch = excluded.arch,
                    capabilities = excluded.capabilities, last_seen = excluded.last_seen",
                &[
                    &agent.tenant,
                    &agent.agent_id,
                    &agent.partition,
                    &agent.version,
                    &agent.hostname,
                    &agent.os,
                    &agent.arch,
                    &capabilities,
                    &agent.first_seen,
                    &agent.last_seen,
                ],
            )
            .map(|_| ())
        })
        .await
    }

    /// Moves an agent's `last_seen` forward (never back).
    pub async fn touch_agent(
        &self,
        tenant: &str,
        agent_id: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        let (tenant, agent_id) = (tenant.to_owned(), agent_id.to_owned());
        self.call(move |tx| {
            tx.execute(
                "UPDATE agents SET last_seen = CASE WHEN last_seen > $3 THEN last_seen ELSE $3 END
                 WHERE tenant = $1 AND agent_id = $2",
                &[&tenant, &agent_id, &at],
            )
            .map(|_| ())
        })
        .await
    }

    /// Every registered agent, ordered by (tenant, agent_id).
    pub async fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.call(|tx| {
            tx.query(
                &format!("{AGENT_COLUMNS} ORDER BY tenant, agent_id"),
                &[],
                agent_row,
            )
        })
        .await
    }
}

const AGENT_COLUMNS: &str = "SELECT tenant, agent_id, partition, version, hostname, os, arch,
    capabilities, first_seen, last_seen FROM agents";

fn agent_row(r: &Row<'_, '_>) -> Result<AgentRecord, DbError> {
    let capabilities: String = r.get(7)?;
    Ok(AgentRecord {
        tenant: r.get(0)?,
        agent_id: r.get(1)?,
        partition: r.get(2)?,
        version: r.get(3)?,
        hostname: r.get(4)?,
        os: r.get(5)?,
        arch: r.get(6)?,
        // Written by this module as a JSON array; anything else reads as none.
        capabilities: serde_json::from_str(&capabilities).unwrap_or_default(),
        first_seen: r.get(8)?,
        last_seen: r.get(9)?,
    })
}
