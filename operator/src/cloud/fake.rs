//! A recording fake cloud for unit tests: it holds instances in memory, records
//! every call with the (tokio) time it arrived, and fails the calls it is told to.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use outrigger_crds::{CapacityType, Provider};

use super::{CloudError, CloudProvider, Instance, InstanceState, Launch, Target, TargetScaling};

/// One call the fake received.
#[derive(Debug, Clone)]
pub struct Call {
    pub operation: &'static str,
    pub at: tokio::time::Instant,
    /// What it asked for: the launch or the ids to terminate.
    pub launch: Option<Launch>,
    pub ids: Vec<String>,
}

#[derive(Default)]
struct State {
    instances: Vec<Instance>,
    calls: Vec<Call>,
    failures: VecDeque<(&'static str, CloudError)>,
    launched: u32,
}

/// Clones share one state.
#[derive(Clone)]
pub struct FakeCloud {
    provider: Provider,
    state: Arc<Mutex<State>>,
}

/// A pool target for tests.
pub fn target() -> Target {
    Target {
        pool: "pool-a".into(),
        region: "us-east-1".into(),
        zone: Some("us-east-1a".into()),
        instance_type: "p5.48xlarge".into(),
        capacity_type: CapacityType::OnDemand,
        scaling: TargetScaling::Aws {
            launch_template: "gpu".into(),
            version: None,
            subnet_ids: Vec::new(),
        },
    }
}

impl FakeCloud {
    pub fn new(provider: Provider) -> FakeCloud {
        FakeCloud {
            provider,
            state: Arc::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next call of `operation` fails with `error` (queued in order).
    pub fn fail_next(&self, operation: &'static str, error: CloudError) {
        self.state().failures.push_back((operation, error));
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    pub fn instances_now(&self) -> Vec<Instance> {
        self.state().instances.clone()
    }

    fn record(&self, call: Call) -> Result<(), CloudError> {
        let mut state = self.state();
        let operation = call.operation;
        state.calls.push(call);
        match state.failures.iter().position(|(op, _)| *op == operation) {
            Some(i) => Err(state.failures.remove(i).expect("found").1),
            None => Ok(()),
        }
    }

    fn call(operation: &'static str) -> Call {
        Call {
            operation,
            at: tokio::time::Instant::now(),
            launch: None,
            ids: Vec::new(),
        }
    }
}

#[async_trait::async_trait]
impl CloudProvider for FakeCloud {
    fn provider(&self) -> Provider {
        self.provider
    }

    async fn instances(&self, _target: &Target) -> Result<Vec<Instance>, CloudError> {
        self.record(Self::call("list"))?;
        Ok(self.instances_now())
    }

    async fn launch(&self, _target: &Target, launch: &Launch) -> Result<u32, CloudError> {
        self.record(Call {
            launch: Some(launch.clone()),
            ..Self::call("launch")
        })?;
        let mut state = self.state();
        for _ in 0..launch.add {
            state.launched += 1;
            let id = format!("i-{:04}", state.launched);
            state.instances.push(Instance {
                provider_id: format!("aws:///us-east-1a/{id}"),
                id,
                state: InstanceState::Pending,
                launched: None,
            });
        }
        Ok(launch.add)
    }

    async fn terminate(&self, _target: &Target, ids: &[String]) -> Result<(), CloudError> {
        self.record(Call {
            ids: ids.to_vec(),
            ..Self::call("terminate")
        })?;
        let mut state = self.state();
        for instance in state.instances.iter_mut() {
            if ids.contains(&instance.id) {
                instance.state = InstanceState::Terminated;
            }
        }
        Ok(())
    }
}
