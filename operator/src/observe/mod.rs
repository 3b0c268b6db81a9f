//! The observation layer, one per cluster: watches that keep only what is read
//! (`trim`, `watch`), what each object reports, and the inventory built from the
//! stores once per change (`inventory`): per pool its nodes with readiness and free
//! GPUs, health and backoff; per ModelDeployment its children and their ready
//! replicas.

pub mod inventory;
pub mod trim;
pub mod watch;
