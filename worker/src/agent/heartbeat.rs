//! The heartbeat loop: every `heartbeat_interval_ms` (from the registration) the agent tells
//! the coordinator what it is doing and acts on the answer (an assignment, `stop`). While the
//! coordinator is away it retries with backoff; `NOT_FOUND` (a restarted coordinator that lost
//! track of this worker, or one that never knew it) means registering again with the old id
//! and the current session; a session that ends wakes the loop at once, so the coordinator
//! learns of an idle worker without waiting for the next tick. A session trains on through an
//! outage for `grace`, then stops at its next step boundary, its replica kept.

use std::sync::Arc;

use anyhow::{Result, bail};

use super::backoff::Backoff;
use super::client::{Disposition, describe, disposition};
use super::state::Agent;

/// Runs until the coordinator refuses this worker's credentials.
pub async fn run(agent: Arc<Agent>, grace: std::time::Duration) -> Result<()> {
    let mut backoff = Backoff::default();
    let mut away = false;
    let mut away_since: Option<std::time::Instant> = None;
    let mut reregistered = false;
    let wake = agent.wake();
    loop {
        let generation = agent.generation();
        let (req, sent) = agent.heartbeat_request();
        let delay = match agent.client().heartbeat(req).await {
            Ok(r) => {
                reregistered = false;
                away_since = None;
                if away {
                    tracing::info!("coordinator reachable again");
                    away = false;
                }
                backoff.reset();
                agent.on_heartbeat(r.into_inner().action, &sent);
                agent.heartbeat_interval()
            }
            Err(s) => match disposition(&s) {
                Disposition::Retry => {
                    if !away {
                        tracing::warn!("heartbeat failed ({}); retrying", describe(&s));
                        away = true;
                    }
                    let since = *away_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > grace && agent.stop_for_outage() {
                        tracing::warn!(
                            "the coordinator has been unreachable for {} ms \
                             (--coordinator-grace-ms): the session stops at its next step \
                             boundary and keeps its replica",
                            since.elapsed().as_millis()
                        );
                    }
                    backoff.next_delay()
                }
                Disposition::Reregister => {
                    tracing::info!("the coordinator does not know this worker; registering again");
                    agent.register(Some(generation)).await?;
                    // At once the first time; a coordinator that keeps forgetting us is
                    // retried with backoff.
                    if std::mem::replace(&mut reregistered, true) {
                        backoff.next_delay()
                    } else {
                        continue;
                    }
                }
                Disposition::Stale => {
                    agent.on_stale(&sent);
                    agent.heartbeat_interval()
                }
                Disposition::Reject => {
                    tracing::warn!("heartbeat refused: {}", describe(&s));
                    backoff.next_delay()
                }
                Disposition::Fatal => bail!("heartbeat refused: {}", describe(&s)),
            },
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = wake.notified() => {}
        }
    }
}
