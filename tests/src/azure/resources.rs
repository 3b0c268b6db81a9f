//! How ARM shows scale sets and their VMs.

use serde_json::{Value, json};

use super::scale_set::{ScaleSet, Vm, VmState};

/// Resource type of a scale set.
pub const SCALE_SET_TYPE: &str = "Microsoft.Compute/virtualMachineScaleSets";

/// A scale set as ARM shows it.
pub fn scale_set_json(set: &ScaleSet) -> Value {
    let mut body = json!({
        "id": set.id(),
        "name": set.name,
        "type": SCALE_SET_TYPE,
        "location": set.location,
        "tags": set.tags,
        "sku": {"name": set.sku, "tier": "Standard", "capacity": set.capacity},
        "properties": {
            "provisioningState": set.provisioning_state,
            "uniqueId": set.unique_id,
            "overprovision": false,
            "singlePlacementGroup": false,
            "orchestrationMode": "Uniform",
            "upgradePolicy": {"mode": "Manual"},
            "timeCreated": set.created.to_string(),
        },
    });
    if !set.zones.is_empty() {
        body["zones"] = json!(set.zones);
    }
    body
}

/// A scale-set VM as ARM shows it; with `instance_view`, its power state too.
pub fn vm_json(set: &ScaleSet, vm: &Vm, instance_view: bool) -> Value {
    let mut properties = json!({
        "latestModelApplied": true,
        "vmId": vm.vm_id,
        "provisioningState": vm.state.provisioning_state(),
        "hardwareProfile": {"vmSize": set.sku},
        "osProfile": {"computerName": set.computer_name(vm.instance_id)},
        "timeCreated": vm.created.to_string(),
    });
    if instance_view {
        let power = match vm.state {
            VmState::Creating => ("PowerState/starting", "VM starting"),
            VmState::Running => ("PowerState/running", "VM running"),
            VmState::Deleting => ("PowerState/stopping", "VM stopping"),
        };
        properties["instanceView"] = json!({
            "statuses": [
                {
                    "code": format!("ProvisioningState/{}", vm.state.provisioning_state().to_ascii_lowercase()),
                    "level": "Info",
                    "displayStatus": format!("Provisioning {}", vm.state.provisioning_state().to_ascii_lowercase()),
                },
                {"code": power.0, "level": "Info", "displayStatus": power.1},
            ]
        });
    }
    let mut body = json!({
        "id": format!("{}/virtualMachines/{}", set.id(), vm.instance_id),
        "name": format!("{}_{}", set.name, vm.instance_id),
        "type": format!("{SCALE_SET_TYPE}/virtualMachines"),
        "location": set.location,
        "instanceId": vm.instance_id.to_string(),
        "sku": {"name": set.sku, "tier": "Standard"},
        "properties": properties,
    });
    if let Some(zone) = &vm.zone {
        body["zones"] = json!([zone]);
    }
    body
}
