//! `outbox-relay kafka-api status`: each running `kafka-api` process
//! writes where it listens and who is connected into `kafka_api_listeners`
//! every few seconds; the command reads them with the Kafka groups served.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// How often a process writes its row; a row older than three of these is
/// a process gone.
pub(super) const REPORT_EVERY: Duration = Duration::from_secs(5);

/// One connected client, as the process knows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Client {
    pub peer: String,
    pub client_id: String,
    /// From ApiVersions v3 (KIP-511), when the client sends them.
    pub software_name: Option<String>,
    pub software_version: Option<String>,
    /// The SASL user, on a listener with users.
    pub user: Option<String>,
    pub connected_at: DateTime<Utc>,
}

/// The process's connections, by a number of their own.
#[derive(Default)]
pub(super) struct Connections {
    next: std::sync::atomic::AtomicU64,
    open: Mutex<HashMap<u64, Client>>,
}

impl Connections {
    pub(super) fn open(&self, peer: std::net::SocketAddr) -> u64 {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let client = Client {
            peer: peer.to_string(),
            client_id: "-".into(),
            software_name: None,
            software_version: None,
            user: None,
            connected_at: Utc::now(),
        };
        self.open.lock().expect("not poisoned").insert(id, client);
        id
    }

    pub(super) fn update(&self, id: u64, change: impl FnOnce(&mut Client)) {
        if let Some(client) = self.open.lock().expect("not poisoned").get_mut(&id) {
            change(client);
        }
    }

    pub(super) fn close(&self, id: u64) {
        self.open.lock().expect("not poisoned").remove(&id);
    }

    fn all(&self) -> Vec<Client> {
        let mut all: Vec<Client> = self
            .open
            .lock()
            .expect("not poisoned")
            .values()
            .cloned()
            .collect();
        all.sort_by_key(|c| c.connected_at);
        all
    }
}

const REPORT: &str = "
    INSERT INTO kafka_api_listeners (id, listen, advertised, tls, sasl, clients)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT (id) DO UPDATE SET seen_at = now(), clients = $6";

const GONE: &str =
    "DELETE FROM kafka_api_listeners WHERE id = $1 OR seen_at < now() - interval '1 hour'";

const LISTENERS: &str = "
    SELECT id, listen, advertised, tls, sasl, started_at, seen_at, clients
      FROM kafka_api_listeners
     WHERE seen_at > now() - make_interval(secs => $1)
     ORDER BY started_at";

const GROUPS: &str = "
    SELECT g.group_id, g.state, g.generation, coalesce(g.protocol_name, ''),
           (SELECT count(*) FROM kafka_group_members k WHERE k.group_id = g.group_id)
      FROM kafka_groups g ORDER BY g.group_id";

/// This process as a row.
pub(super) struct Report {
    pub id: String,
    pub listen: String,
    pub advertised: String,
    pub tls: bool,
    pub sasl: bool,
}

impl Report {
    pub(super) async fn write(
        &self,
        pool: &deadpool_postgres::Pool,
        connections: &Connections,
    ) -> anyhow::Result<()> {
        let clients = serde_json::to_value(connections.all())?;
        pool.get()
            .await?
            .execute(
                REPORT,
                &[
                    &self.id,
                    &self.listen,
                    &self.advertised,
                    &self.tls,
                    &self.sasl,
                    &clients,
                ],
            )
            .await?;
        Ok(())
    }

    /// Removes this process's row (and any left by processes long gone).
    pub(super) async fn remove(&self, pool: &deadpool_postgres::Pool) -> anyhow::Result<()> {
        pool.get().await?.execute(GONE, &[&self.id]).await?;
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Listener {
    pub id: String,
    pub listen: String,
    pub advertised: String,
    pub tls: bool,
    pub sasl: bool,
    pub started_at: DateTime<Utc>,
    pub seen_at: DateTime<Utc>,
    pub clients: Vec<Client>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupServed {
    pub group: String,
    pub state: String,
    pub generation: i32,
    pub assignor: String,
    pub members: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub listeners: Vec<Listener>,
    pub groups: Vec<GroupServed>,
}

/// The running processes (seen in the last three reports) and the groups.
pub async fn status(client: &impl tokio_postgres::GenericClient) -> anyhow::Result<Status> {
    let recent = (REPORT_EVERY * 3).as_secs_f64();
    let listeners = client
        .query(LISTENERS, &[&recent])
        .await?
        .iter()
        .map(|r| {
            Ok(Listener {
                id: r.get(0),
                listen: r.get(1),
                advertised: r.get(2),
                tls: r.get(3),
                sasl: r.get(4),
                started_at: r.get(5),
                seen_at: r.get(6),
                clients: serde_json::from_value(r.get(7))?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let groups = client
        .query(GROUPS, &[])
        .await?
        .iter()
        .map(|r| GroupServed {
            group: r.get(0),
            state: r.get(1),
            generation: r.get(2),
            assignor: r.get(3),
            members: r.get(4),
        })
        .collect();
    Ok(Status { listeners, groups })
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(crate) fn statements() -> Vec<(&'static str, String)> {
    [
        ("kafka_api::status::REPORT", REPORT),
        ("kafka_api::status::GONE", GONE),
        ("kafka_api::status::LISTENERS", LISTENERS),
        ("kafka_api::status::GROUPS", GROUPS),
    ]
    .into_iter()
    .map(|(name, sql)| (name, sql.to_string()))
    .collect()
}
