//! Watches: reflectors whose objects are trimmed (`trim`) before they are stored,
//! and the changes they tell. A change is told only when what Outrigger reads of
//! the object (its report, `inventory::NodeReport` and friends) changed; a node's
//! change names its pools, and `route` turns those into the ModelDeployments they
//! concern.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::channel::mpsc;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Resource;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use outrigger_crds::{GpuNodePool, ModelDeployment};
use tokio::sync::watch;

use super::inventory;
use super::written::WrittenChildren;
use crate::controller::model_deployment;

/// A ModelDeployment as its controller names it.
pub type MdRef = ObjectRef<DeserializeGuard<ModelDeployment>>;

/// Whom a reflector tells about changes, once its store holds them (a trigger from
/// a watch of its own could arrive before the store has the change, and a reconcile
/// would then act on the old object with nothing to trigger it again). Every
/// reflector the inventory reads also bumps the stores' generation.
pub enum Notify<K> {
    Nobody,
    /// Poke everyone listening on the channel when an object's fingerprint (what
    /// placement sees of it) changes, or an object goes.
    Fingerprint(watch::Sender<u64>, fn(&K) -> u64),
    /// When a node's fingerprint changes or it goes: name the pools it belonged
    /// to and belongs to now (to `route`), and poke `usage`. After a (re)list,
    /// poke `usage` and `everyone`: what changed while the watch was down is not
    /// known object by object.
    Pools {
        usage: watch::Sender<u64>,
        everyone: watch::Sender<u64>,
        fingerprint: fn(&K) -> u64,
        pools_changed: mpsc::UnboundedSender<String>,
        pools: Store<GpuNodePool>,
    },
    /// Hand every changed or deleted object's owning ModelDeployment to its
    /// controller, and tell the written children what the watch saw.
    Owner(mpsc::UnboundedSender<MdRef>, WrittenChildren),
}

/// A reflector whose store the controllers read, kept current by its own task.
/// `keep` drops what no controller reads before an object is stored (`trim`).
pub fn mirror<K>(
    api: Api<K>,
    config: watcher::Config,
    keep: fn(&mut K),
    notify: Notify<K>,
    generation: Option<Arc<AtomicU64>>,
) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    mirror_task(api, config, keep, notify, generation, None).0
}

/// [`mirror`], and the handle that stops its task (a peer's mirrors stop with
/// the link).
pub fn mirror_task<K>(
    api: Api<K>,
    config: watcher::Config,
    keep: fn(&mut K),
    notify: Notify<K>,
    generation: Option<Arc<AtomicU64>>,
    mut restart: Option<watch::Receiver<u64>>,
) -> (Store<K>, tokio::task::AbortHandle)
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, mut writer) = reflector::store();
    let task = tokio::spawn(async move {
        let mut seen: HashMap<String, (u64, Vec<String>)> = HashMap::new();
        // During a (re)list: what it has shown so far. The store swaps the listed
        // objects in only at its end (InitDone), so nothing is told before then;
        // at the end the listing replaces `seen` (objects deleted while the watch
        // was down drop out) and everyone listening is poked.
        let mut listing: Option<HashMap<String, (u64, Vec<String>)>> = None;
        let new_watch = || {
            watcher(api.clone(), config.clone())
                .modify(keep)
                .default_backoff()
        };
        let mut stream = Box::pin(new_watch());
        loop {
            // `Err(true)`: start a new watch, listing first, as the old one may hang
            // on a connection that a network fault left open but dead.
            let next = match restart.as_mut() {
                Some(restart) => tokio::select! {
                    event = stream.next() => Ok(event),
                    changed = restart.changed() => Err(changed.is_ok()),
                },
                None => Ok(stream.next().await),
            };
            let event = match next {
                Ok(event) => event,
                Err(true) => {
                    stream = Box::pin(new_watch());
                    continue;
                }
                Err(false) => {
                    restart = None;
                    continue;
                }
            };
            let Some(event) = event else { break };
            if let Ok(event) = &event {
                writer.apply_watcher_event(event);
                // Before the generation moves, so no inventory is built from a store
                // that shows the write beside an entry that still counts it. (During
                // a relist, InitApply, the inventory's own check covers it.)
                if let Notify::Owner(_, written) = &notify {
                    match event {
                        watcher::Event::Apply(obj) => written.seen(obj.meta(), false),
                        watcher::Event::Delete(obj) => written.seen(obj.meta(), true),
                        _ => {}
                    }
                }
            }
            if event.is_ok()
                && let Some(generation) = &generation
            {
                generation.fetch_add(1, Ordering::Release);
            }
            let (obj, deleted) = match event {
                Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) => (obj, false),
                Ok(watcher::Event::Delete(obj)) => (obj, true),
                Ok(watcher::Event::Init) => {
                    listing = Some(HashMap::new());
                    continue;
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(listed) = listing.take() {
                        seen = listed;
                    }
                    match &notify {
                        Notify::Fingerprint(sender, _) => sender.send_modify(|n| *n += 1),
                        Notify::Pools {
                            usage, everyone, ..
                        } => {
                            usage.send_modify(|n| *n += 1);
                            everyone.send_modify(|n| *n += 1);
                        }
                        Notify::Nobody | Notify::Owner(..) => {}
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "watch failed; retrying with backoff");
                    continue;
                }
            };
            match &notify {
                Notify::Nobody => {}
                Notify::Fingerprint(sender, fingerprint) => {
                    let key = format!("{:?}/{:?}", obj.meta().namespace, obj.meta().name);
                    if let Some(listed) = listing.as_mut() {
                        listed.insert(key, (fingerprint(&obj), Vec::new()));
                        continue;
                    }
                    let changed = if deleted {
                        seen.remove(&key);
                        true
                    } else {
                        let print = fingerprint(&obj);
                        seen.insert(key, (print, Vec::new())).map(|s| s.0) != Some(print)
                    };
                    if changed {
                        sender.send_modify(|n| *n += 1);
                    }
                }
                Notify::Pools {
                    usage,
                    fingerprint,
                    pools_changed,
                    pools,
                    ..
                } => {
                    let key = obj.meta().name.clone().unwrap_or_default();
                    // The pools it belongs to now, by the pools' current selectors.
                    let now = (fingerprint(&obj), pools_of(obj.meta(), pools));
                    if let Some(listed) = listing.as_mut() {
                        listed.insert(key, now);
                        continue;
                    }
                    let mut told = if deleted {
                        seen.remove(&key);
                        now.1
                    } else {
                        match seen.insert(key, now.clone()) {
                            Some(before) if before.0 == now.0 => continue,
                            Some((_, before)) => before.into_iter().chain(now.1).collect(),
                            None => now.1,
                        }
                    };
                    told.sort_unstable();
                    told.dedup();
                    for pool in told {
                        let _ = pools_changed.unbounded_send(pool);
                    }
                    usage.send_modify(|n| *n += 1);
                }
                Notify::Owner(sender, _) => {
                    let meta = obj.meta();
                    if let Some((ns, name)) =
                        inventory::owner_of(meta.labels.as_ref(), meta.namespace.as_ref())
                    {
                        // The receiver lives as long as the controllers.
                        let _ = sender.unbounded_send(MdRef::new(&name).within(&ns));
                    }
                }
            }
        }
    });
    (reader, task.abort_handle())
}

/// The pools whose node selector an object's labels match.
fn pools_of(meta: &kube::core::ObjectMeta, pools: &Store<GpuNodePool>) -> Vec<String> {
    let labels_ = meta.labels.clone().unwrap_or_default();
    pools
        .state()
        .iter()
        .filter(|p| p.selects(&labels_))
        .filter_map(|p| p.metadata.name.clone())
        .collect()
}

fn hash_of<T: Hash>(value: T) -> u64 {
    let mut h = DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// A node changes what the controllers see when its report does.
pub fn node_fingerprint(node: &Node) -> u64 {
    hash_of(inventory::NodeReport::of(node))
}

/// A pod changes what the controllers see when its report does (where it runs,
/// for whom, its GPUs).
pub fn pod_fingerprint(pod: &Pod) -> u64 {
    hash_of(inventory::PodReport::of(pod))
}

/// A pool changes plans when its spec or the typed facts of its status do; its
/// counts, which change with every pod, do not.
pub fn pool_fingerprint(pool: &GpuNodePool) -> u64 {
    hash_of(inventory::pool_report(pool))
}

/// Turns the names of pools whose nodes changed into the ModelDeployments they
/// concern: those the pool was eligible for when last planned, and those with
/// replicas on it. A pool's own changes (spec, conditions) still trigger every
/// ModelDeployment, and the plan cache skips the ones they do not change.
pub async fn route(
    mut pools: mpsc::UnboundedReceiver<String>,
    to: mpsc::UnboundedSender<MdRef>,
    ctx: Arc<model_deployment::Ctx>,
) {
    while let Some(first) = pools.next().await {
        let mut names = std::collections::BTreeSet::from([first]);
        // Whatever else is queued joins this round.
        while let Ok(more) = pools.try_recv() {
            names.insert(more);
        }
        let inventory = ctx.shared.stores.inventory(ctx.shared.now());
        let mut keys = std::collections::BTreeSet::new();
        {
            let plans = ctx.plans.lock().await;
            for name in &names {
                keys.extend(plans.interested(name));
                keys.extend(inventory.children_in(name).map(|c| c.owner.clone()));
            }
        }
        for (ns, name) in keys {
            if to.unbounded_send(MdRef::new(&name).within(&ns)).is_err() {
                return;
            }
        }
    }
}

/// A stream that yields once per change of `rx`, coalescing bursts, and never
/// twice within `spacing`. A controller's debounce delays a request again with
/// every new trigger for the object (kube-runtime's `Config::debounce`), so pokes
/// closer together than the debounce would hold every reconcile back for as long
/// as the cluster keeps changing; spaced wider than it, each burst's reconcile runs.
pub fn pokes(
    rx: watch::Receiver<u64>,
    spacing: std::time::Duration,
) -> impl Stream<Item = ()> + Send + 'static {
    futures::stream::unfold((rx, None), move |(mut rx, last)| async move {
        rx.changed().await.ok()?;
        if let Some(last) = last {
            tokio::time::sleep_until(last + spacing).await;
        }
        // What changed while waiting is part of this poke.
        rx.mark_unchanged();
        Some(((), (rx, Some(tokio::time::Instant::now()))))
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use tokio::sync::watch;

    use super::pokes;

    /// Changes every 100 ms for 3 s: the first poke comes at once, the rest at most
    /// one per 600 ms, and the last change still gets one.
    #[tokio::test(start_paused = true)]
    async fn pokes_are_spaced_wider_than_the_debounce() {
        let (tx, rx) = watch::channel(0u64);
        let spacing = Duration::from_millis(600);
        let start = tokio::time::Instant::now();
        let seen = tokio::spawn(async move {
            let mut at = Vec::new();
            let mut stream = std::pin::pin!(pokes(rx, spacing));
            while stream.next().await.is_some() {
                at.push(start.elapsed());
            }
            at
        });
        for i in 1..=30u64 {
            tx.send_replace(i);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(tx);
        let at = seen.await.expect("the stream ends with the sender");
        assert_eq!(at.first(), Some(&Duration::ZERO), "{at:?}");
        assert!(at.windows(2).all(|w| w[1] - w[0] >= spacing), "{at:?}");
        assert!(
            at.len() >= 5,
            "one poke per spacing while changes go on: {at:?}"
        );
        assert!(
            *at.last().expect("pokes") >= Duration::from_millis(2900),
            "the last change is poked: {at:?}"
        );
    }
}
