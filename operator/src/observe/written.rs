//! Child Deployments this operator wrote that its store may not show yet. The
//! watch brings a child some milliseconds after its apply returns, so a plan made
//! in between would not see the room the last one took, and a second pass of the
//! same deployment would plan from children it no longer has. The inventory counts
//! a written child from the moment its apply (or delete) returns until the watch
//! shows that very change, and for [`WRITTEN_FOR`] at most.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::runtime::reflector::{ObjectRef, Store};

use crate::controller::apply::applied_hash as hash_of;

/// How long a written child waits for the watch before the store is trusted
/// again: a watch event is normally milliseconds behind the write; one missing for
/// this long was lost, and the watch's next relist tells the truth.
pub const WRITTEN_FOR: SignedDuration = SignedDuration::from_secs(30);

/// One write the store may not show yet.
struct Entry {
    /// The applied object as the API server answered it (its uid, spec and the
    /// status it had then), or `None` when it was deleted.
    applied: Option<Arc<Deployment>>,
    at: Timestamp,
}

/// The written children, by namespace and name; shared by the applier's caller
/// (`wrote`), the Deployment watch (`seen`) and the inventory (`overlay`).
#[derive(Clone, Default)]
pub struct WrittenChildren(Arc<Mutex<BTreeMap<(String, String), Entry>>>);

fn key_of(meta: &ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The same object (uid) with the same applied spec: not an older object of the
/// same name that is still going, even one applied with the same spec.
fn same(applied: &ObjectMeta, seen: &ObjectMeta) -> bool {
    applied.uid == seen.uid && hash_of(applied) == hash_of(seen)
}

impl WrittenChildren {
    fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), Entry>> {
        // A panic while the lock is held leaves plain data behind; carry on with it.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a child applied (`Some`, the API server's answer) or deleted (`None`).
    pub fn wrote(&self, namespace: &str, name: &str, applied: Option<Deployment>, now: Timestamp) {
        self.entries().insert(
            (namespace.to_string(), name.to_string()),
            Entry {
                applied: applied.map(Arc::new),
                at: now,
            },
        );
    }

    /// What the Deployment watch saw, once its store holds it: the written change
    /// itself (the same object with the same applied hash, or the delete), or the
    /// written child deleted after it, ends the entry.
    pub fn seen(&self, meta: &ObjectMeta, deleted: bool) {
        let mut entries = self.entries();
        let key = key_of(meta);
        let done = entries.get(&key).is_some_and(|e| match &e.applied {
            None => deleted,
            Some(applied) => same(&applied.metadata, meta),
        });
        if done {
            entries.remove(&key);
        }
    }

    /// The child Deployments as the inventory counts them: `store`'s, with the
    /// writes it does not show yet in their place (a written spec keeps the Ready
    /// replicas of the same object, by uid, as the store has them). Also when the
    /// oldest of those writes stops counting, so an inventory built now is built
    /// again then.
    pub fn overlay(
        &self,
        store: &Store<Deployment>,
        now: Timestamp,
    ) -> (Vec<Arc<Deployment>>, Option<Timestamp>) {
        let mut stored = store.state();
        let mut entries = self.entries();
        entries.retain(|(ns, name), e| {
            let shown = match (&e.applied, store.get(&ObjectRef::new(name).within(ns))) {
                (None, seen) => seen.is_none(),
                (Some(applied), Some(seen)) => same(&applied.metadata, &seen.metadata),
                (Some(_), None) => false,
            };
            !shown && now.duration_since(e.at) < WRITTEN_FOR
        });
        if entries.is_empty() {
            return (stored, None);
        }
        stored.retain(|d| !entries.contains_key(&key_of(&d.metadata)));
        for ((ns, name), e) in entries.iter() {
            let Some(applied) = &e.applied else {
                continue;
            };
            let mut counted = applied.as_ref().clone();
            if let Some(seen) = store.get(&ObjectRef::new(name).within(ns))
                && seen.metadata.uid == applied.metadata.uid
            {
                counted.status = seen.status.clone();
            }
            stored.push(Arc::new(counted));
        }
        let ends = entries.values().map(|e| e.at + WRITTEN_FOR).min();
        (stored, ends)
    }
}
