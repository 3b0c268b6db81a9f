//! End-to-end tests and cloud simulators for Outrigger.
//!
//! The simulators stand in for the clouds behind the real SDK clients:
//! - [`ec2`]: a proxy in front of moto that adds capacity, EC2 errors and latency;
//! - [`azure`]: an Azure Resource Manager (compute) endpoint for VM scale sets;
//! - [`registrar`]: turns running instances and VMs into kwok Nodes, and holds
//!   them NotReady during a simulated outage;
//! - [`control`]: the control API that injects [`faults`] and creates fixtures;
//! - [`links`]: the peer links between the clusters of `hack/peers`, which a
//!   partition cuts.
//!
//! [`Simulator`] starts them together; the `outrigger-sim` binary runs it for
//! `hack/cluster`, and [`harness`] holds what the tests share.
#![forbid(unsafe_code)]

pub mod azure;
pub mod azure_client;
pub mod clouds;
pub mod control;
pub mod ec2;
pub mod faults;
pub mod harness;
pub mod interrupt;
pub mod links;
pub mod pair;
pub mod peers;
pub mod registrar;
pub mod service_account;
pub mod sim_fleet;
mod simulator;
pub mod tls;

pub use simulator::{Simulator, SimulatorConfig, StartError};
pub mod e2e;
