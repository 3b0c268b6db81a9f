//! The node registrar: what kubelets joining the cluster would do for simulated
//! machines. Each pass it
//! - lists the EC2 instances (from moto) that carry an `outrigger.dev/pool` tag
//!   (the tag Outrigger puts on what it launches, named like the Node label)
//!   and the VMs of the simulated Azure scale sets;
//! - routes each machine to the cluster its `outrigger.dev/cluster` tag names
//!   (see [`route`]); a machine whose cluster is not configured gets no Node;
//! - in each cluster, creates a kwok Node for each of its machines that has run
//!   for the boot delay (labels of its pool, topology, instance type, GPUs,
//!   providerID);
//! - deletes the Nodes (its own only) whose machine is gone;
//! - holds the Nodes under an outage NotReady, and gives them back to kwok after.
//!
//! A pass runs every [`POLL`], and at once after a launch or termination. If a
//! provider cannot be listed, its Nodes are left as they are for that pass; a
//! cluster that cannot be reached (one that is down) is skipped for that pass.

pub mod node;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use outrigger_crds::{CLUSTER_TAG, GpuNodePool, POOL_LABEL, Provider};
use tokio::sync::watch;

use crate::ec2::moto::{InstanceShape, MotoError};
use crate::faults::{Fault, Outage, matches};
use crate::simulator::Shared;
use node::{MANAGED_BY, MANAGED_BY_LABEL, Machine, OutageChange, PoolTraits, Shape};

/// How often a pass runs without being woken: short enough that a test's deadline
/// is mostly the boot delay.
pub const POLL: Duration = Duration::from_millis(500);

/// How the registrar reaches the clusters, and how long machines take to boot.
#[derive(Clone)]
pub struct RegistrarConfig {
    /// The clusters Nodes are registered in (see [`route`]).
    pub clusters: Vec<ClusterTarget>,
    /// Time from a machine running to its Node appearing (default 2 s).
    pub boot_delay: Duration,
}

/// One cluster the registrar puts Nodes into.
#[derive(Clone)]
pub struct ClusterTarget {
    /// The name machines carry in their `outrigger.dev/cluster` tag; `None`: the
    /// default cluster, which takes every machine no named cluster claims.
    pub name: Option<String>,
    pub client: Client,
}

impl ClusterTarget {
    fn label(&self) -> &str {
        self.name.as_deref().unwrap_or("default")
    }
}

/// The index in `clusters` of the cluster a machine with `tag` joins: the one the
/// tag names, else the default one (named `None`), else none.
pub fn route(tag: Option<&str>, clusters: &[ClusterTarget]) -> Option<usize> {
    let names: Vec<Option<&str>> = clusters.iter().map(|c| c.name.as_deref()).collect();
    route_by_name(tag, &names)
}

fn route_by_name(tag: Option<&str>, names: &[Option<&str>]) -> Option<usize> {
    tag.and_then(|t| names.iter().position(|n| *n == Some(t)))
        .or_else(|| names.iter().position(Option::is_none))
}

#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error("failed to list the registrar's Nodes in cluster {cluster}: {source}")]
    ListNodes {
        cluster: String,
        #[source]
        source: kube::Error,
    },
}

/// The API handles of one target cluster.
struct Cluster {
    target: ClusterTarget,
    nodes: Api<Node>,
    pools: Api<GpuNodePool>,
    /// Whether the last pass reached it, so that a cluster going down or coming
    /// back is logged once, not every pass.
    reachable: bool,
}

struct Registrar {
    shared: Arc<Shared>,
    clusters: Vec<Cluster>,
    boot_delay: Duration,
    /// When each EC2 instance was first seen up (moto's launch times are in whole seconds).
    first_seen: HashMap<String, Instant>,
    shapes: HashMap<String, Shape>,
}

/// Runs passes until `shutdown` turns true.
pub(crate) async fn run(
    shared: Arc<Shared>,
    config: RegistrarConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let clusters = config
        .clusters
        .into_iter()
        .map(|target| Cluster {
            nodes: Api::all(target.client.clone()),
            pools: Api::all(target.client.clone()),
            target,
            reachable: true,
        })
        .collect();
    let mut registrar = Registrar {
        clusters,
        boot_delay: config.boot_delay,
        first_seen: HashMap::new(),
        shapes: HashMap::new(),
        shared,
    };
    let names: Vec<&str> = registrar
        .clusters
        .iter()
        .map(|c| c.target.label())
        .collect();
    tracing::info!(boot_delay = ?registrar.boot_delay, clusters = ?names, "registrar: started");
    loop {
        registrar.pass().await;
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = registrar.shared.registrar_wake.notified() => {}
            _ = shutdown.changed() => break,
        }
        if *shutdown.borrow() {
            break;
        }
    }
    tracing::info!("registrar: stopped");
}

impl Registrar {
    async fn pass(&mut self) {
        let now = Instant::now();
        let mut machines: Vec<Machine> = Vec::new();
        let mut listed = vec![Provider::Azure];
        match self.aws_machines(now).await {
            Ok(found) => {
                listed.push(Provider::Aws);
                machines.extend(found);
            }
            Err(e) => tracing::warn!("registrar: failed to list EC2 instances: {e}"),
        }
        machines.extend(self.azure_machines());

        // Faults: machines that never join, and single Nodes held NotReady.
        let (faults, mut outages) = {
            let book = self.shared.book();
            let faults: Vec<Fault> = book.faults().iter().map(|f| f.fault.clone()).collect();
            (faults, book.outages().to_vec())
        };
        for fault in &faults {
            if let Fault::NodeNotReady { provider, node } = fault {
                outages.push(Outage {
                    provider: *provider,
                    region: None,
                    api: false,
                    node: Some(node.clone()),
                });
            }
        }
        let machines_before = machines.len();
        machines.retain(|m| !faults.iter().any(|f| never_registers(f, m)));
        if machines.len() < machines_before {
            tracing::debug!(
                skipped = machines_before - machines.len(),
                "registrar: NeverRegisters: machines left without a Node"
            );
        }

        let targets: Vec<ClusterTarget> = self.clusters.iter().map(|c| c.target.clone()).collect();
        let mut routed: Vec<BTreeMap<String, Machine>> = vec![BTreeMap::new(); self.clusters.len()];
        for machine in machines {
            if let Some(i) = route(machine.cluster.as_deref(), &targets) {
                routed[i].insert(machine.node_name.clone(), machine);
            }
        }

        for (i, machines) in routed.into_iter().enumerate() {
            let cluster = &mut self.clusters[i];
            match cluster
                .pass(&machines, &listed, &outages, now, self.boot_delay)
                .await
            {
                Ok(()) => {
                    if !cluster.reachable {
                        tracing::info!(
                            cluster = cluster.target.label(),
                            "registrar: cluster reachable again"
                        );
                    }
                    cluster.reachable = true;
                }
                // A cluster that is down (hack/peers fault down) is skipped, not an error.
                Err(e) if cluster.reachable => {
                    tracing::warn!("registrar: {e}; skipping that cluster until it answers");
                    cluster.reachable = false;
                }
                Err(_) => {}
            }
        }
    }
}

impl Cluster {
    /// One pass over one cluster with the machines routed to it.
    async fn pass(
        &self,
        machines: &BTreeMap<String, Machine>,
        listed: &[Provider],
        outages: &[Outage],
        now: Instant,
        boot_delay: Duration,
    ) -> Result<(), PassError> {
        let existing = self
            .nodes
            .list(&ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}")))
            .await
            .map_err(|source| PassError::ListNodes {
                cluster: self.target.label().to_string(),
                source,
            })?;

        for n in &existing.items {
            let name = n.name_any();
            let provider = n
                .labels()
                .get(node::PROVIDER_LABEL)
                .and_then(|p| Provider::ALL.into_iter().find(|x| x.as_str() == p));
            let gone =
                provider.is_some_and(|p| listed.contains(&p)) && !machines.contains_key(&name);
            if gone {
                self.delete(&name).await;
            } else if let Some(change) = node::outage_change(n, outages) {
                self.apply_outage_change(&name, change).await;
            }
        }

        let have: Vec<String> = existing.items.iter().map(ResourceExt::name_any).collect();
        let due: Vec<&Machine> = machines
            .values()
            .filter(|m| !have.contains(&m.node_name))
            .filter(|m| {
                m.up_since
                    .is_some_and(|t| now.duration_since(t) >= boot_delay)
            })
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let pools = self.pool_objects().await;
        for machine in due {
            let traits = traits_for(machine, &pools);
            let outage = outages
                .iter()
                .find(|o| o.covers_node(machine.provider, &machine.region, &machine.node_name));
            let node = node::node_for(machine, &traits, outage);
            match self.nodes.create(&PostParams::default(), &node).await {
                Ok(_) => {
                    tracing::info!(node = %machine.node_name, provider = %machine.provider, pool = ?machine.pool, cluster = self.target.label(), "registrar: node registered")
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => {
                    tracing::warn!(node = %machine.node_name, cluster = self.target.label(), "registrar: failed to create the node: {e}")
                }
            }
        }
        Ok(())
    }

    async fn delete(&self, name: &str) {
        match self.nodes.delete(name, &Default::default()).await {
            Ok(_) => tracing::info!(node = %name, "registrar: node removed (its machine is gone)"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => tracing::warn!(node = %name, "registrar: failed to delete the node: {e}"),
        }
    }

    async fn apply_outage_change(&self, name: &str, change: OutageChange) {
        let params = PatchParams::default();
        let result = match &change {
            OutageChange::Down { metadata, status } => {
                // Annotation first: once kwok no longer manages the Node it stops
                // writing Ready=True over the condition set next.
                match self
                    .nodes
                    .patch(name, &params, &Patch::Merge(metadata))
                    .await
                {
                    Ok(_) => self
                        .nodes
                        .patch_status(name, &params, &Patch::Strategic(status))
                        .await
                        .map(|_| ()),
                    Err(e) => Err(e),
                }
            }
            OutageChange::Up { metadata } => self
                .nodes
                .patch(name, &params, &Patch::Merge(metadata))
                .await
                .map(|_| ()),
        };
        match (result, change) {
            (Ok(()), OutageChange::Down { .. }) => {
                tracing::info!(node = %name, "registrar: outage: node held NotReady")
            }
            (Ok(()), OutageChange::Up { .. }) => {
                tracing::info!(node = %name, "registrar: outage over: node handed back to kwok")
            }
            (Err(e), _) => {
                tracing::warn!(node = %name, "registrar: failed to apply the outage state: {e}")
            }
        }
    }

    /// Every GpuNodePool, or none when they cannot be listed (no CRD installed).
    async fn pool_objects(&self) -> Vec<GpuNodePool> {
        match self.pools.list(&ListParams::default()).await {
            Ok(list) => list.items,
            Err(kube::Error::Api(e)) if e.code == 404 => Vec::new(),
            Err(e) => {
                tracing::warn!(
                    cluster = self.target.label(),
                    "registrar: failed to list GpuNodePools, using instance tags: {e}"
                );
                Vec::new()
            }
        }
    }
}

impl Registrar {
    async fn aws_machines(&mut self, now: Instant) -> Result<Vec<Machine>, MotoError> {
        let mut found = Vec::new();
        let mut up_ids = Vec::new();
        for region in self.shared.aws_regions() {
            for instance in self.shared.moto.instances(&region, &[]).await? {
                let Some(pool) = instance.tags.get(POOL_LABEL).cloned() else {
                    continue;
                };
                if !instance.is_up() {
                    continue;
                }
                let since = *self.first_seen.entry(instance.id.clone()).or_insert(now);
                up_ids.push(instance.id.clone());
                let shape = self.aws_shape(&region, &instance.instance_type).await?;
                found.push(Machine {
                    provider: Provider::Aws,
                    node_name: instance.id.clone(),
                    provider_id: format!("aws:///{}/{}", instance.zone, instance.id),
                    region: region.clone(),
                    zone_label: instance.zone.clone(),
                    instance_type: instance.instance_type.clone(),
                    pool: Some(pool),
                    cluster: instance.tags.get(CLUSTER_TAG).cloned(),
                    scale_set: None,
                    agent_pool: None,
                    shape,
                    up_since: Some(since),
                });
            }
        }
        self.first_seen.retain(|id, _| up_ids.contains(id));
        Ok(found)
    }

    async fn aws_shape(&mut self, region: &str, instance_type: &str) -> Result<Shape, MotoError> {
        if let Some(shape) = self.shapes.get(instance_type) {
            return Ok(*shape);
        }
        let shape = match self
            .shared
            .moto
            .instance_shape(region, instance_type)
            .await?
        {
            Some(InstanceShape {
                vcpus,
                memory_mib,
                gpus,
            }) => Shape {
                cpus: vcpus,
                memory_mib,
                gpus,
            },
            None => Shape::UNKNOWN,
        };
        self.shapes.insert(instance_type.to_string(), shape);
        Ok(shape)
    }

    fn azure_machines(&self) -> Vec<Machine> {
        let mut cloud = self.shared.azure();
        {
            let book = self.shared.book();
            cloud.advance(Instant::now(), |id| book.is_active(id));
        }
        let mut found = Vec::new();
        for set in cloud.scale_sets() {
            let shape = set.shape().map_or(Shape::UNKNOWN, |s| Shape {
                cpus: s.vcpus,
                memory_mib: u64::from(s.memory_gib) * 1024,
                gpus: s.gpus,
            });
            let shape = Shape {
                gpus: set.gpus_per_vm(),
                ..shape
            };
            let region = set.location.to_ascii_lowercase();
            for vm in set.vms.values() {
                found.push(Machine {
                    provider: Provider::Azure,
                    node_name: set.computer_name(vm.instance_id),
                    provider_id: format!("azure://{}/virtualMachines/{}", set.id(), vm.instance_id),
                    zone_label: vm
                        .zone
                        .as_ref()
                        .map_or_else(|| "0".to_string(), |z| format!("{region}-{z}")),
                    region: region.clone(),
                    instance_type: set.sku.clone(),
                    pool: set.tags.get(POOL_LABEL).cloned(),
                    cluster: set.tags.get(CLUSTER_TAG).cloned(),
                    scale_set: Some((
                        set.subscription.clone(),
                        set.resource_group.clone(),
                        set.name.clone(),
                    )),
                    agent_pool: set.aks.clone(),
                    shape,
                    up_since: vm.up_since,
                });
            }
        }
        found
    }
}

/// The pool a machine's Node joins: the GpuNodePool named by its tag, else the one
/// whose `scaling.azure` names its scale set, else just the tag.
fn traits_for(machine: &Machine, pools: &[GpuNodePool]) -> PoolTraits {
    let named = machine
        .pool
        .as_deref()
        .and_then(|name| pools.iter().find(|p| p.name_any() == name));
    let scaling = || pools.iter().find(|p| PoolTraits::scales(p, machine));
    match named.or_else(scaling) {
        Some(pool) => PoolTraits::of(pool),
        None => PoolTraits::from_tag(machine.pool.as_deref()),
    }
}

/// Whether a `NeverRegisters` fault keeps `machine` from becoming a Node.
fn never_registers(fault: &Fault, machine: &Machine) -> bool {
    let Fault::NeverRegisters {
        provider,
        instance_type,
        zone,
    } = fault
    else {
        return false;
    };
    // The zone as the fault names it: the AWS zone, or Azure's "1".."3" (the Node's
    // zone label is `<region>-<zone>`).
    let machine_zone = match machine.provider {
        Provider::Aws => machine.zone_label.as_str(),
        Provider::Azure => machine.zone_label.rsplit('-').next().unwrap_or_default(),
    };
    *provider == machine.provider
        && matches(instance_type, &machine.instance_type)
        && matches(zone, machine_zone)
}

#[cfg(test)]
mod tests {
    use super::route_by_name;

    #[test]
    fn a_machine_joins_the_cluster_its_tag_names() {
        let names = [Some("aws"), Some("azure")];
        assert_eq!(route_by_name(Some("azure"), &names), Some(1));
        assert_eq!(route_by_name(Some("aws"), &names), Some(0));
    }

    #[test]
    fn a_machine_of_a_cluster_not_configured_gets_no_node() {
        let names = [Some("aws"), Some("azure")];
        assert_eq!(route_by_name(Some("gcp"), &names), None);
        assert_eq!(route_by_name(None, &names), None);
    }

    #[test]
    fn the_default_cluster_takes_what_no_named_cluster_claims() {
        assert_eq!(route_by_name(Some("outrigger"), &[None]), Some(0));
        assert_eq!(route_by_name(None, &[None]), Some(0));
        assert_eq!(route_by_name(Some("aws"), &[None, Some("aws")]), Some(1));
    }
}
