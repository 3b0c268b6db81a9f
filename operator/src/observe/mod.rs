//! The observation layer, one per cluster: watches that keep only what is read
//! (`trim`, `watch`), what each object reports, and the inventory built from the
//! stores once per change (`inventory`): per pool its nodes with readiness and free
//! GPUs, health and backoff; per ModelDeployment its children and their ready
//! replicas. With peers (`peers`), the same facts as each cluster publishes them,
//! bounded and on the local clock before use (`published`), and the pools of every
//! cluster as one ModelDeployment sees them (`global`).
//! Child Deployments this operator wrote count before the watch shows them
//! (`written`).

pub mod global;
pub mod inventory;
pub mod peers;
pub mod published;
pub mod trim;
pub mod watch;
pub mod written;
