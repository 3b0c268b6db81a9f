"""Azure's own Python SDKs against the simulator's HTTPS endpoint.

azure-mgmt-compute and azure-mgmt-containerservice refuse to send a bearer token
over plain HTTP; here they keep every check on and trust only the CA they are
given (connection_verify). The test in tests/tests/azure_simulator.rs runs this
with the venv of hack/tools/install-moto.sh and makes the fixtures first.

Usage: azure_sdk_check.py ENDPOINT CA_FILE SUBSCRIPTION
Prints one line per step; exits non-zero on the first failure.
"""

import sys
import time

from azure.core.credentials import AccessToken
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.containerservice import ContainerServiceClient


class FixedToken:
    """A credential with one token (the simulator takes any)."""

    def get_token(self, *scopes, **kwargs):
        return AccessToken("outrigger-python-check", int(time.time()) + 3600)


def main(endpoint, ca_file, subscription):
    options = dict(
        base_url=endpoint,
        credential_scopes=[endpoint.rstrip("/") + "/.default"],
        connection_verify=ca_file,
        polling_interval=1,
    )
    compute = ComputeManagementClient(FixedToken(), subscription, **options)
    scale_set = compute.virtual_machine_scale_sets.get("python-check", "h100")
    print(f"compute: got scale set {scale_set.name}, capacity {scale_set.sku.capacity}")
    poller = compute.virtual_machine_scale_sets.begin_update(
        "python-check", "h100", {"sku": {"capacity": 2}}
    )
    grown = poller.result(timeout=30)
    vms = list(compute.virtual_machine_scale_set_vms.list("python-check", "h100"))
    print(f"compute: begin_update done ({grown.provisioning_state}), {len(vms)} VMs")
    assert len(vms) == 2, vms

    aks = ContainerServiceClient(FixedToken(), subscription, **options)
    pool = aks.agent_pools.get("python-check", "aks-python", "gpu")
    print(f"containerservice: got agent pool {pool.name}, count {pool.count}")
    pool.count = 2
    grown = aks.agent_pools.begin_create_or_update(
        "python-check", "aks-python", "gpu", pool
    ).result(timeout=30)
    machines = [m.name for m in aks.machines.list("python-check", "aks-python", "gpu")]
    print(f"containerservice: count {grown.count}, machines {machines}")
    assert len(machines) == 2, machines
    aks.agent_pools.begin_delete_machines(
        "python-check", "aks-python", "gpu", {"machineNames": machines[:1]}
    ).result(timeout=30)
    after = aks.agent_pools.get("python-check", "aks-python", "gpu")
    left = [m.name for m in aks.machines.list("python-check", "aks-python", "gpu")]
    print(f"containerservice: deleteMachines done, count {after.count}, machines {left}")
    assert after.count == 1 and left == machines[1:], (after.count, left)


if __name__ == "__main__":
    main(*sys.argv[1:4])
