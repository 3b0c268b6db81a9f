//! The Azure simulator through the real `azure_mgmt_compute` client: no cluster
//! (and no moto) needed. Long-running operations are sent with `.send()` and
//! followed through `Azure-AsyncOperation` by the test, as the operator must: the
//! client's own `.await` does not follow it.

use std::time::Duration;

use azure_core::headers::HeaderName;
use azure_core::{RetryOptions, StatusCode};
use azure_mgmt_compute::package_2024_07_01::models::{
    Sku, VirtualMachineScaleSetUpdate, VirtualMachineScaleSetVmInstanceRequiredIDs,
};
use azure_mgmt_compute::package_2024_07_01::{Client, ClientBuilder};
use futures::StreamExt;
use outrigger_tests::azure_client::{credential, https_client, transport};
use outrigger_tests::harness::{Control, eventually};
use outrigger_tests::{Simulator, SimulatorConfig};
use serde_json::{Value, json};

const SUB: &str = "00000000-0000-0000-0000-000000000001";
const RG: &str = "outrigger-test";
const H100: &str = "Standard_ND96isr_H100_v5";
/// Operations take 1 s in the simulator; this is the most a test waits for one.
const OPERATION_DEADLINE: Duration = Duration::from_secs(20);

async fn simulator() -> (Simulator, Control) {
    // The Azure endpoint never calls moto; any address will do.
    let config = SimulatorConfig::local("http://127.0.0.1:9").expect("a TLS identity");
    let sim = Simulator::start(config)
        .await
        .expect("the simulator starts");
    let control = Control::new(sim.control_url());
    (sim, control)
}

/// The CA of the simulator's HTTPS endpoint.
fn ca(sim: &Simulator) -> &[u8] {
    sim.azure_ca_pem().expect("the simulator made its CA")
}

fn client(sim: &Simulator, retries: bool) -> Client {
    let endpoint = azure_core::Url::parse(sim.azure_url()).expect("a URL");
    let mut builder = ClientBuilder::new(credential(sim.azure_url(), ca(sim), "outrigger-test"))
        .endpoint(endpoint)
        .transport(transport(ca(sim)));
    if !retries {
        builder = builder.retry(RetryOptions::none());
    }
    builder.build().expect("a client")
}

async fn scale_set(control: &Control, name: &str, zones: &[&str], capacity: u32) {
    control
        .create_scale_set(json!({
            "subscriptionId": SUB, "resourceGroup": RG, "name": name,
            "location": "eastus", "sku": H100, "zones": zones, "capacity": capacity,
            "pool": format!("azure-{name}"),
        }))
        .await;
}

fn capacity(n: i64) -> VirtualMachineScaleSetUpdate {
    VirtualMachineScaleSetUpdate {
        sku: Some(Sku {
            name: None,
            tier: None,
            capacity: Some(n),
        }),
        ..Default::default()
    }
}

fn header(response: &azure_core::Response, name: &'static str) -> Option<String> {
    response
        .headers()
        .get_optional_string(&HeaderName::from_static(name))
}

/// Follows an `Azure-AsyncOperation` URL until the operation leaves `InProgress`;
/// the final status resource.
async fn follow(sim: &Simulator, url: &str) -> Value {
    let http = https_client(ca(sim));
    eventually("the operation to finish", OPERATION_DEADLINE, || async {
        let status: Value = http
            .get(url)
            .bearer_auth("outrigger-test-token")
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (status["status"] != "InProgress").then_some(status)
    })
    .await
}

async fn status_of(sim: &Simulator, url: &str) -> Value {
    https_client(ca(sim))
        .get(url)
        .bearer_auth("t")
        .send()
        .await
        .expect("operation status")
        .json()
        .await
        .expect("JSON")
}

/// Sends a capacity update; the response's Azure-AsyncOperation URL.
async fn update(client: &Client, name: &str, n: i64) -> azure_core::Result<String> {
    let response = client
        .virtual_machine_scale_sets_client()
        .update(RG, name, capacity(n), SUB)
        .send()
        .await?
        .into_raw_response();
    Ok(header(&response, "azure-asyncoperation").expect("an Azure-AsyncOperation header"))
}

fn http_error(error: &azure_core::Error) -> (StatusCode, String) {
    match error.kind() {
        azure_core::error::ErrorKind::HttpResponse { status, error_code } => {
            (*status, error_code.clone().unwrap_or_default())
        }
        other => panic!("expected an HTTP error, got {other:?}: {error}"),
    }
}

async fn vm_ids(client: &Client, name: &str) -> Vec<String> {
    let mut pages = client
        .virtual_machine_scale_set_v_ms_client()
        .list(RG, name, SUB)
        .into_stream();
    let mut ids = Vec::new();
    while let Some(page) = pages.next().await {
        for vm in page.expect("a page of VMs").value {
            ids.push(vm.instance_id.expect("an instance id"));
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn capacity_update_is_a_long_running_operation_with_azure_async_operation() {
    let (sim, control) = simulator().await;
    let client = client(&sim, false);
    scale_set(&control, "gpu-a", &["1", "2"], 1).await;

    let response = client
        .virtual_machine_scale_sets_client()
        .update(RG, "gpu-a", capacity(3), SUB)
        .send()
        .await
        .expect("PATCH accepted")
        .into_raw_response();
    assert_eq!(response.status(), StatusCode::Ok);
    let operation = header(&response, "azure-asyncoperation").expect("Azure-AsyncOperation");
    let location = header(&response, "location").expect("Location");
    assert!(header(&response, "retry-after").is_some(), "Retry-After");
    assert!(operation.contains("/providers/Microsoft.Compute/locations/eastus/operations/"));
    let body: Value =
        serde_json::from_slice(&response.into_body().collect().await.expect("a body"))
            .expect("JSON");
    assert_eq!(body["properties"]["provisioningState"], "Updating");
    assert_eq!(body["sku"]["capacity"], 3);

    let done = follow(&sim, &operation).await;
    assert_eq!(done["status"], "Succeeded", "{done}");
    assert!(done["endTime"].is_string());
    let result = https_client(ca(&sim))
        .get(&location)
        .bearer_auth("t")
        .send()
        .await
        .expect("operation result");
    assert_eq!(result.status(), reqwest::StatusCode::OK);

    let set = client
        .virtual_machine_scale_sets_client()
        .get(RG, "gpu-a", SUB)
        .await
        .expect("GET scale set");
    assert_eq!(set.sku.and_then(|s| s.capacity), Some(3));
    assert_eq!(
        set.properties.and_then(|p| p.provisioning_state).as_deref(),
        Some("Succeeded")
    );

    let mut pages = client
        .virtual_machine_scale_set_v_ms_client()
        .list(RG, "gpu-a", SUB)
        .into_stream();
    let vms = pages.next().await.expect("a page").expect("VMs").value;
    assert_eq!(vms.len(), 3);
    let mut zones: Vec<String> = vms.iter().flat_map(|vm| vm.zones.clone()).collect();
    zones.sort();
    assert_eq!(zones, ["1", "1", "2"], "spread over the scale set's zones");
    for vm in &vms {
        let id = vm.instance_id.as_deref().expect("instanceId");
        assert_eq!(
            vm.resource.id.as_deref(),
            Some(format!("/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachineScaleSets/gpu-a/virtualMachines/{id}").as_str()),
            "the id a Node's providerID is made from"
        );
        let properties = vm.properties.as_ref().expect("properties");
        assert_eq!(properties.provisioning_state.as_deref(), Some("Succeeded"));
        assert!(
            properties
                .os_profile
                .as_ref()
                .and_then(|o| o.computer_name.as_deref())
                .is_some_and(|n| n.starts_with("gpu-a"))
        );
    }
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_instances_is_long_running_and_lowers_capacity() {
    let (sim, control) = simulator().await;
    let client = client(&sim, false);
    scale_set(&control, "gpu-b", &["1"], 3).await;

    let response = client
        .virtual_machine_scale_sets_client()
        .delete_instances(
            RG,
            "gpu-b",
            VirtualMachineScaleSetVmInstanceRequiredIDs {
                instance_ids: vec!["0".into(), "2".into()],
            },
            SUB,
        )
        .send()
        .await
        .expect("deleteInstances accepted")
        .into_raw_response();
    assert_eq!(response.status(), StatusCode::Accepted);
    let operation = header(&response, "azure-asyncoperation").expect("Azure-AsyncOperation");
    assert_eq!(status_of(&sim, &operation).await["status"], "InProgress");
    assert_eq!(follow(&sim, &operation).await["status"], "Succeeded");
    assert_eq!(vm_ids(&client, "gpu-b").await, ["1"]);
    let set = client
        .virtual_machine_scale_sets_client()
        .get(RG, "gpu-b", SUB)
        .await
        .expect("GET");
    assert_eq!(set.sku.and_then(|s| s.capacity), Some(1));

    let missing = client
        .virtual_machine_scale_sets_client()
        .delete_instances(
            RG,
            "gpu-b",
            VirtualMachineScaleSetVmInstanceRequiredIDs {
                instance_ids: vec!["7".into()],
            },
            SUB,
        )
        .send()
        .await
        .expect_err("no VM 7");
    assert_eq!(
        http_error(&missing),
        (StatusCode::NotFound, "NotFound".into())
    );
    let unknown = client
        .virtual_machine_scale_sets_client()
        .get(RG, "no-such-set", SUB)
        .await
        .expect_err("no such scale set");
    assert_eq!(
        http_error(&unknown),
        (StatusCode::NotFound, "ResourceNotFound".into())
    );
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resource_skus_show_gpu_sizes_and_zone_restrictions() {
    let (sim, control) = simulator().await;
    let client = client(&sim, false);
    control
        .inject(json!({"fault": "SkuNotAvailable", "instanceType": H100, "region": "eastus", "zone": "2"}))
        .await;
    let mut pages = client
        .resource_skus_client()
        .list(SUB)
        .filter("location eq 'eastus'")
        .into_stream();
    let skus = pages.next().await.expect("a page").expect("SKUs").value;
    let h100 = skus
        .iter()
        .find(|s| s.name.as_deref() == Some(H100))
        .expect("the H100 size");
    assert!(
        h100.locations.iter().all(|l| l == "eastus"),
        "filtered to eastus"
    );
    let gpus = h100
        .capabilities
        .iter()
        .find(|c| c.name.as_deref() == Some("GPUs"))
        .and_then(|c| c.value.clone());
    assert_eq!(gpus.as_deref(), Some("8"));
    assert_eq!(h100.restrictions.len(), 1);
    let info = h100.restrictions[0]
        .restriction_info
        .as_ref()
        .expect("restriction info");
    assert_eq!(info.zones, ["2"]);
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn faults_reach_the_client_with_their_codes() {
    let (sim, control) = simulator().await;
    let client = client(&sim, false);
    scale_set(&control, "gpu-c", &["1"], 1).await;
    scale_set(&control, "gpu-d", &[], 0).await;

    control
        .inject(json!({"fault": "SkuNotAvailable", "instanceType": H100}))
        .await;
    let err = update(&client, "gpu-c", 2)
        .await
        .expect_err("size not available");
    assert_eq!(
        http_error(&err),
        (StatusCode::Conflict, "SkuNotAvailable".into())
    );
    control.clear_all().await;

    control
        .inject(json!({"fault": "OperationNotAllowed", "region": "eastus"}))
        .await;
    let err = update(&client, "gpu-c", 2).await.expect_err("over quota");
    assert_eq!(
        http_error(&err),
        (StatusCode::Conflict, "OperationNotAllowed".into())
    );
    control.clear_all().await;

    control
        .inject(json!({"fault": "ZonalAllocationFailed", "zone": "1"}))
        .await;
    let operation = update(&client, "gpu-c", 3)
        .await
        .expect("accepted, fails later");
    let failed = follow(&sim, &operation).await;
    assert_eq!(failed["status"], "Failed");
    assert_eq!(failed["error"]["code"], "ZonalAllocationFailed");
    assert_eq!(
        vm_ids(&client, "gpu-c").await.len(),
        1,
        "nothing was allocated"
    );
    control.clear_all().await;

    // Finite capacity fails the same way; a regional scale set says AllocationFailed.
    control
        .capacity(
            json!({"provider": "azure", "instanceType": H100, "region": "eastus", "limit": 2}),
        )
        .await;
    let operation = update(&client, "gpu-d", 2).await.expect("accepted");
    let failed = follow(&sim, &operation).await;
    assert_eq!(
        failed["error"]["code"], "AllocationFailed",
        "1 + 2 > 2: {failed}"
    );
    let operation = update(&client, "gpu-d", 1).await.expect("accepted");
    assert_eq!(
        follow(&sim, &operation).await["status"],
        "Succeeded",
        "1 + 1 fits"
    );
    control
        .capacity(
            json!({"provider": "azure", "instanceType": H100, "region": "eastus", "limit": null}),
        )
        .await;

    control
        .inject(json!({"fault": "TooManyRequests", "retryAfterSeconds": 1, "times": 1}))
        .await;
    let err = client
        .virtual_machine_scale_sets_client()
        .get(RG, "gpu-c", SUB)
        .await
        .expect_err("throttled");
    assert_eq!(
        http_error(&err),
        (StatusCode::TooManyRequests, "TooManyRequests".into())
    );
    control
        .inject(json!({"fault": "TooManyRequests", "retryAfterSeconds": 1, "times": 1}))
        .await;
    let retrying = self::client(&sim, true);
    assert!(
        retrying
            .virtual_machine_scale_sets_client()
            .get(RG, "gpu-c", SUB)
            .await
            .is_ok(),
        "the client's retry policy waits out Retry-After"
    );

    control
        .inject(json!({"fault": "OperationFailed", "code": "InternalExecutionError", "times": 1}))
        .await;
    let operation = update(&client, "gpu-c", 2).await.expect("accepted");
    let failed = follow(&sim, &operation).await;
    assert_eq!(failed["error"]["code"], "InternalExecutionError");

    // A stalled operation stays InProgress past the time an unstalled one takes.
    let stall = control
        .inject(json!({"fault": "OperationStalled", "scaleSet": "gpu-c"}))
        .await;
    let stalled = update(&client, "gpu-c", 2).await.expect("accepted");
    let other = update(&client, "gpu-d", 2).await.expect("accepted");
    assert_eq!(follow(&sim, &other).await["status"], "Succeeded");
    assert_eq!(status_of(&sim, &stalled).await["status"], "InProgress");
    control.clear(&stall).await;
    assert_eq!(follow(&sim, &stalled).await["status"], "Succeeded");
    assert_eq!(vm_ids(&client, "gpu-c").await.len(), 2);

    control
        .outage(json!({"provider": "azure", "api": true}))
        .await;
    let err = client
        .virtual_machine_scale_sets_client()
        .get(RG, "gpu-c", SUB)
        .await
        .expect_err("provider down");
    assert_eq!(
        http_error(&err),
        (StatusCode::ServiceUnavailable, "ServiceUnavailable".into())
    );
    control.recover("azure").await;
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_need_an_api_version_and_a_bearer_token() {
    let (sim, _control) = simulator().await;
    let http = https_client(ca(&sim));
    let url = format!(
        "{}/subscriptions/{SUB}/providers/Microsoft.Compute/skus",
        sim.azure_url()
    );
    let no_version = http
        .get(&url)
        .bearer_auth("t")
        .send()
        .await
        .expect("answer");
    assert_eq!(no_version.status(), reqwest::StatusCode::BAD_REQUEST);
    let body: Value = no_version.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "MissingApiVersionParameter");
    let anonymous = http
        .get(format!("{url}?api-version=2021-07-01"))
        .send()
        .await
        .expect("answer");
    assert_eq!(anonymous.status(), reqwest::StatusCode::UNAUTHORIZED);
    sim.stop().await;
}

/// The token endpoint beside ARM: azure_identity's client secret credential gets a
/// bearer token from it, and a request without a secret is refused as the identity
/// platform refuses it.
#[tokio::test(flavor = "multi_thread")]
async fn the_token_endpoint_issues_client_credential_tokens() {
    let (sim, _control) = simulator().await;
    let token = credential(sim.azure_url(), ca(&sim), "outrigger-test")
        .get_token(&["https://management.azure.com/.default"])
        .await
        .expect("a token from the simulator");
    assert!(token.token.secret().starts_with("sim-"));
    assert!(token.expires_on > time::OffsetDateTime::now_utc() + time::Duration::minutes(50));

    let refused = https_client(ca(&sim))
        .post(format!("{}/tenant-a/oauth2/v2.0/token", sim.azure_url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials&client_id=a&scope=s")
        .send()
        .await
        .expect("answer");
    assert_eq!(refused.status(), reqwest::StatusCode::BAD_REQUEST);
    let body: Value = refused.json().await.expect("JSON");
    assert_eq!(body["error"], "invalid_request");
    assert!(
        body["error_description"]
            .as_str()
            .is_some_and(|d| d.contains("'client_secret'")),
        "{body}"
    );
    sim.stop().await;
}

/// Azure's own Python SDKs (azure-mgmt-compute, azure-mgmt-containerservice) with
/// every HTTPS check on, trusting only the simulator's CA: a scale-set update and
/// an agent pool's count and deleteMachines, each followed to the end by the SDK's
/// own poller.
#[tokio::test(flavor = "multi_thread")]
async fn azure_python_sdks_accept_the_https_endpoint() {
    let (sim, control) = simulator().await;
    control
        .create_scale_set(json!({
            "subscriptionId": SUB, "resourceGroup": "python-check", "name": "h100",
            "location": "eastus", "sku": H100, "capacity": 0,
        }))
        .await;
    control
        .create_agent_pool(json!({
            "subscriptionId": SUB, "resourceGroup": "python-check", "cluster": "aks-python",
            "name": "gpu", "location": "eastus", "vmSize": H100, "count": 1,
        }))
        .await;
    let ca = std::env::temp_dir().join(format!("outrigger-sim-ca-{}.pem", std::process::id()));
    std::fs::write(&ca, self::ca(&sim)).expect("the CA written");
    let python = tokio::task::spawn_blocking(outrigger_tests::harness::moto_bin)
        .await
        .expect("the installer ran")
        .expect("the test bed's Python venv")
        .join("python");
    let script = outrigger_tests::harness::repo_root().join("tests/python/azure_sdk_check.py");
    let output = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(sim.azure_url())
        .arg(&ca)
        .arg(SUB)
        .output()
        .await
        .expect("python runs");
    let _ = std::fs::remove_file(&ca);
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("deleteMachines done, count 1"), "{stdout}");
    sim.stop().await;
}
