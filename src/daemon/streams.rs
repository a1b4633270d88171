//! The running streams, and how a reload adds, changes and removes them without touching the
//! others.
//!
//! A reload compares each `[[stream]]` with the one running under that name
//! ([`StreamConfig`] equality):
//! - unchanged: keeps its task, its connection and its queue;
//! - added: its queue is attached in the store (loaded from disk when a removed stream of that
//!   name left one there) and a task starts;
//! - changed: the new stream is built first (a setting that cannot work refuses the reload
//!   and the old stream runs on); then the old task finishes what is in flight (bounded) and
//!   the new one starts on the same queue: nothing queued is lost, unacknowledged records are
//!   sent again (at-least-once, same correlation ids);
//! - removed: its task stops; its queue stays, detached, with its backlog, until
//!   `lorastream queue --drop` (daemon stopped) or the stream comes back.
//!
//! The uplink routes, the scheduler's stream links and the status page's stream list follow
//! in the same step.

use super::commands::Commands;
use super::DaemonError;
use crate::config::StreamConfig;
use crate::downlink::{DownlinkHandle, StreamLink};
use crate::metrics::Metrics;
use crate::model::Eui64;
use crate::store::{Store, StoreError};
use crate::streams::format::{Facts, Formatter};
use crate::streams::{Stream, StreamContext};
use crate::uplink::{Routes, SharedRoutes};
use crate::web::StreamInfo;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Downlink events waiting for one stream at most.
const EVENTS: usize = 256;

/// What a reload did to the streams (names).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StreamChanges {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: usize,
}

impl StreamChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// What every stream is built with, besides its own settings.
pub(crate) struct Shared {
    pub store: Store,
    pub metrics: Metrics,
    /// The daemon's stop token: each stream runs under a child of it.
    pub cancel: CancellationToken,
    pub gateway_eui: Option<Eui64>,
    pub instance_id: Arc<str>,
    pub commands: Commands,
    pub downlinks: DownlinkHandle,
    pub facts: Arc<Facts>,
    pub routes: SharedRoutes,
    pub infos: Arc<RwLock<Vec<StreamInfo>>>,
}

struct Running {
    cfg: StreamConfig,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// A stream built and ready to run.
struct Built {
    stream: Stream,
    link: StreamLink,
    cancel: CancellationToken,
}

/// The running streams.
pub(crate) struct StreamSet {
    shared: Shared,
    running: BTreeMap<String, Running>,
}

impl StreamSet {
    /// Start the streams of `cfg` (their queues are open). Returns the scheduler's links.
    pub fn start(
        shared: Shared,
        streams: &[StreamConfig],
    ) -> Result<(StreamSet, HashMap<String, StreamLink>), DaemonError> {
        let mut set = StreamSet {
            shared,
            running: BTreeMap::new(),
        };
        let mut links = HashMap::new();
        for s in streams {
            let Some(b) = set.build(s)? else { continue };
            links.insert(s.name.clone(), b.link);
            set.spawn(s, b.stream, b.cancel);
        }
        set.publish(streams);
        Ok((set, links))
    }

    fn build(&self, s: &StreamConfig) -> Result<Option<Built>, DaemonError> {
        let Some(queue) = self.shared.store.queue(&s.name) else {
            return Ok(None);
        };
        let (ev_tx, ev_rx) = tokio::sync::mpsc::channel(EVENTS);
        let cancel = self.shared.cancel.child_token();
        let ctx = StreamContext {
            name: s.name.clone(),
            queue,
            metrics: self.shared.metrics.clone(),
            cancel: cancel.clone(),
            gateway_eui: self.shared.gateway_eui,
            instance_id: self.shared.instance_id.clone(),
            commands: s.commands().then(|| self.shared.commands.clone()),
            downlinks: s.downlinks.then(|| self.shared.downlinks.clone()),
            format: Arc::new(Formatter::new(s, self.shared.facts.clone())),
        };
        let stream = Stream::build(s, ctx, ev_rx)?;
        Ok(Some(Built {
            stream,
            link: StreamLink {
                scope: s.scope.clone(),
                events: ev_tx,
            },
            cancel,
        }))
    }

    fn spawn(&mut self, s: &StreamConfig, stream: Stream, cancel: CancellationToken) {
        let task = tokio::spawn(stream.run());
        self.running.insert(
            s.name.clone(),
            Running {
                cfg: s.clone(),
                cancel,
                task,
            },
        );
    }

    /// Routes and the status page's list for these streams.
    fn publish(&self, streams: &[StreamConfig]) {
        let scopes: Vec<_> = streams
            .iter()
            .filter(|s| s.takes_records())
            .map(|s| (s.name.clone(), s.scope.clone()))
            .collect();
        self.shared
            .routes
            .set(Routes::new(&self.shared.store, &scopes));
        *self.shared.infos.write().unwrap_or_else(|p| p.into_inner()) =
            crate::web::stream_infos_of(streams);
    }

    /// Take `new` (a reload's `[[stream]]` list). A stream that cannot be built refuses the
    /// whole change, and the running streams stay as they were.
    pub async fn apply(
        &mut self,
        new: &[StreamConfig],
        deadline: std::time::Duration,
    ) -> Result<StreamChanges, DaemonError> {
        let mut changes = StreamChanges::default();
        let store = self.shared.store.clone();
        // 1. Queues of added streams, then every new or changed stream built (nothing runs yet).
        let mut attached_now = Vec::new();
        let mut built = Vec::new();
        for s in new {
            let old = self.running.get(&s.name);
            if old.is_some_and(|r| r.cfg == *s) {
                changes.unchanged += 1;
                continue;
            }
            if old.is_none() {
                if store.queue(&s.name).is_none() {
                    attached_now.push(s.name.clone());
                }
                // A queue a removed stream left on disk is read back whole: not on a worker.
                let (st, name, when_full) = (store.clone(), s.name.clone(), s.when_full);
                let attached =
                    tokio::task::spawn_blocking(move || st.attach_queue(&name, when_full))
                        .await
                        .unwrap_or(Err(StoreError::Unavailable));
                if let Err(source) = attached {
                    self.undo(&attached_now);
                    return Err(DaemonError::Store {
                        path: s.name.clone(),
                        source,
                        hint: String::new(),
                    });
                }
            }
            match self.build(s) {
                Ok(Some(b)) => built.push((s.clone(), b)),
                Ok(None) => {}
                Err(e) => {
                    self.undo(&attached_now);
                    return Err(e);
                }
            }
        }
        // 2. Removed and changed streams stop (what is in flight is finished or sent again
        //    later); removed ones leave their queue detached.
        let removed: Vec<String> = self
            .running
            .keys()
            .filter(|n| !new.iter().any(|s| &s.name == *n))
            .cloned()
            .collect();
        let replaced: Vec<String> = built
            .iter()
            .filter(|(s, _)| self.running.contains_key(&s.name))
            .map(|(s, _)| s.name.clone())
            .collect();
        // New routes first: records stop going to removed streams and start going to added
        // ones (their queues are attached) before any task stops or starts.
        self.publish(new);
        for name in removed.iter().chain(&replaced) {
            if let Some(r) = self.running.remove(name) {
                stop(r, deadline).await;
            }
        }
        for name in &removed {
            store.detach_queue(name);
            let _ = self
                .shared
                .downlinks
                .set_stream_link(name.clone(), None)
                .await;
            tracing::info!(stream = %name, "stream removed; its queue is kept on disk (add the stream back to deliver it, or stop the daemon and run `lorastream queue --drop {name}`)");
        }
        // 3. New and changed streams start.
        for (s, b) in built {
            // A changed `when_full` (the queue exists: this only updates it).
            if let Err(e) = store.attach_queue(&s.name, s.when_full) {
                tracing::warn!(stream = %s.name, error = %e, "when_full not updated");
            }
            let _ = self
                .shared
                .downlinks
                .set_stream_link(s.name.clone(), Some(b.link))
                .await;
            if replaced.contains(&s.name) {
                tracing::info!(stream = %s.name, "stream changed; restarted with its queue");
                changes.changed.push(s.name.clone());
            } else {
                tracing::info!(stream = %s.name, queued = store.queue(&s.name).map_or(0, |q| q.len()), "stream added");
                changes.added.push(s.name.clone());
            }
            self.spawn(&s, b.stream, b.cancel);
        }
        changes.removed = removed;
        Ok(changes)
    }

    /// A refused change: queues attached for it are detached again (they hold nothing new).
    fn undo(&self, attached: &[String]) {
        for name in attached {
            self.shared.store.detach_queue(name);
        }
    }

    /// Stop every stream (the daemon's stop: its token is already cancelled).
    pub async fn stop_all(self, deadline: tokio::time::Instant) {
        let StreamSet { shared, running } = self;
        // Drop the downlink handle and commands before waiting: the scheduler ends when its
        // last handle is gone.
        drop(shared);
        for (_, r) in running {
            r.cancel.cancel();
            finish(r.task, deadline).await;
        }
    }
}

async fn stop(r: Running, within: std::time::Duration) {
    r.cancel.cancel();
    finish(r.task, tokio::time::Instant::now() + within).await;
}

/// Wait for a task until `deadline`, then abort it (nothing holds its queue afterwards).
pub(super) async fn finish(mut t: JoinHandle<()>, deadline: tokio::time::Instant) {
    if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
        t.abort();
        let _ = t.await;
    }
}
