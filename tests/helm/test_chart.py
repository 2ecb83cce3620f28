"""The Helm chart, without a cluster: rendered by the Helm library (helm-python-sdk), every
manifest checked against the Kubernetes schemas (kubernetes-validate), kilnd's configs read by
kilnd itself (`kilnd --config F check`), and the chart's invariants checked here: each pool
selects its architecture, disruption budgets cover every workload, probes point at the paths
kilnd serves on the port it serves them, the raft peers match the replicas, certificates cover
exactly the names their holders use, and autoscalers read the pool's queue.

Run by `cargo xtask deploy` (and `cargo xtask ci`): python test_chart.py CHART KILND.
"""

import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
import urllib.parse

import helm_python as helm
import kubernetes_validate
import yaml

CHART_DIR, KILND = sys.argv[1], sys.argv[2]
CHART = helm.Chart.load(CHART_DIR)
KUBE_VERSION = "1.30.0"
NAMESPACE = "ci"
DOMAIN = "ci.svc.cluster.local"
# Kinds from CRDs, which kubernetes-validate has no schema for: checked structurally below.
CUSTOM_KINDS = {"ScaledObject", "ServiceMonitor", "Certificate"}


def render(values, name="kiln"):
    """The chart's manifests for `values` (over the defaults), as a list of objects."""
    CHART.validate_schema(values)
    rendered = CHART.render(values, name=name, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                document.setdefault("metadata", {})["_template"] = path
                objects.append(document)
    return objects


def named(objects, kind):
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def one(objects, kind, name):
    found = named(objects, kind)
    assert name in found, f"no {kind} {name} among {sorted(found)}"
    return found[name]


def validate_schemas(objects):
    for obj in objects:
        body = {k: v for k, v in obj.items()}
        body["metadata"] = {k: v for k, v in obj["metadata"].items() if k != "_template"}
        if obj["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(body, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            raise AssertionError(f"{obj['metadata']['_template']}: {obj['kind']} {obj['metadata']['name']}: "
                                 f"{'.'.join(str(p) for p in error.path)}: {error.message}")


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def config_files(objects):
    secret = one(objects, "Secret", "kiln-config")
    return secret["stringData"]


def check_configs_with_kilnd(objects):
    """kilnd reads every config the chart writes, as the daemon would."""
    with tempfile.TemporaryDirectory() as directory:
        for name, text in config_files(objects).items():
            path = os.path.join(directory, name)
            with open(path, "w") as file:
                file.write(text)
            checked = subprocess.run([KILND, "--config", path, "check"], capture_output=True, text=True)
            assert checked.returncode == 0, f"kilnd refuses the chart's {name}: {checked.stderr}\n{text}"
            role = "coordinator" if name.startswith("coordinator") else "worker"
            assert role in checked.stdout, checked.stdout


def container(workload):
    [kilnd] = workload["spec"]["template"]["spec"]["containers"]
    return kilnd


def check_probes(workload, metrics_port):
    kilnd = container(workload)
    ports = {p["name"]: p["containerPort"] for p in kilnd["ports"]}
    assert ports["metrics"] == metrics_port, (ports, metrics_port)
    for probe, path in [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
        get = kilnd[probe]["httpGet"]
        assert get["path"] == path and get["port"] == "metrics", (workload["metadata"]["name"], probe, get)


def check_pdb(objects, workload):
    labels = workload["spec"]["template"]["metadata"]["labels"]
    budgets = [p for p in named(objects, "PodDisruptionBudget").values() if matches(p["spec"]["selector"], labels)]
    assert len(budgets) == 1, f"{workload['metadata']['name']}: {len(budgets)} disruption budgets"
    assert budgets[0]["spec"]["maxUnavailable"] == 1


def toml_value(text, key):
    for line in text.splitlines():
        if line.startswith(f"{key} = "):
            return line.split(" = ", 1)[1]
    return None


def certificate_names(secret):
    pem = secret["data"]["tls.crt"]
    import base64
    decoded = base64.b64decode(pem)
    out = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName"], input=decoded,
                         capture_output=True, check=True).stdout.decode()
    return re.findall(r"DNS:([^,\s]+)", out)


def covered(names, host):
    for name in names:
        if name == host:
            return True
        if name.startswith("*.") and host.split(".", 1)[1:] == [name[2:]]:
            return True
    return False


def check_fleet(objects, values):
    replicas = values.get("coordinator", {}).get("replicas", 1)
    pools = values.get("workerPools") or CHART.values["workerPools"]
    coordinator = one(objects, "StatefulSet", "kiln-coordinator")
    assert coordinator["spec"]["replicas"] == replicas
    headless = one(objects, "Service", "kiln-coordinator")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    assert coordinator["spec"]["serviceName"] == "kiln-coordinator"
    check_probes(coordinator, 9090)
    check_pdb(objects, coordinator)
    # Clients get the gRPC port only; the queue and metrics stay on an in-cluster Service.
    client = one(objects, "Service", "kiln")
    assert [p["name"] for p in client["spec"]["ports"]] == ["grpc"], client["spec"]["ports"]
    metrics_service = one(objects, "Service", "kiln-metrics")
    assert metrics_service["spec"]["type"] == "ClusterIP"
    assert [p["port"] for p in metrics_service["spec"]["ports"]] == [9090]
    claims = coordinator["spec"]["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == ["state"], "a claim per coordinator"
    configs = config_files(objects)
    # The peers: one per replica, pod i of the set is member i + 1.
    for i in range(replicas):
        text = configs[f"coordinator-{i}.toml"]
        assert toml_value(text, "metrics-listen") == '"0.0.0.0:9090"'
        if replicas == 1:
            assert toml_value(text, "peers") is None and toml_value(text, "node-id") is None
            continue
        assert toml_value(text, "node-id") == str(i + 1)
        peers = json.loads(toml_value(text, "peers"))
        expected = [f"{j + 1}=https://kiln-coordinator-{j}.kiln-coordinator.{DOMAIN}:7070" for j in range(replicas)]
        assert peers == expected, (peers, expected)
    assert f"coordinator-{replicas}.toml" not in configs
    args = container(coordinator)["args"]
    assert args == ["--config", "/etc/kiln/config/coordinator-$(POD_INDEX).toml"], args
    coordinator_context = container(coordinator)["securityContext"]
    assert coordinator_context["runAsNonRoot"] and not coordinator_context["allowPrivilegeEscalation"]
    assert coordinator_context["capabilities"]["drop"] == ["ALL"]

    secrets = named(objects, "Secret")
    coordinator_names = certificate_names(secrets["kiln-coordinator-tls"]) if "kiln-coordinator-tls" in secrets else None
    if coordinator_names is not None:
        for i in range(replicas):
            assert covered(coordinator_names, f"kiln-coordinator-{i}.kiln-coordinator.{DOMAIN}")
        assert covered(coordinator_names, f"kiln-coordinator.{DOMAIN}")
        assert covered(coordinator_names, f"kiln.{DOMAIN}")

    for pool in pools:
        name = f"kiln-worker-{pool['name']}"
        workload = one(objects, "StatefulSet", name)
        spec = workload["spec"]["template"]["spec"]
        arch = pool["platform"].split("/")[1]
        assert spec["nodeSelector"]["kubernetes.io/arch"] == arch, spec["nodeSelector"]
        assert spec.get("tolerations", []) == pool.get("tolerations", [])
        assert spec["terminationGracePeriodSeconds"] >= 600, "a step gets time to finish"
        check_probes(workload, 9091)
        check_pdb(objects, workload)
        kilnd = container(workload)
        assert kilnd["lifecycle"]["preStop"]["exec"]["command"][-1] == "drain"
        assert kilnd["securityContext"]["privileged"] is True
        text = configs[f"worker-{pool['name']}.toml"]
        assert toml_value(text, "platforms") == f'["{pool["platform"]}"]'
        assert toml_value(text, "max-parallelism") == str(pool["maxParallelism"])
        assert f'pool = "{pool["name"]}"' in toml_value(text, "labels")
        assert toml_value(text, "coordinator") == f'"https://kiln-coordinator.{DOMAIN}:7070"'
        env = {e["name"]: e for e in kilnd["env"]}
        assert env["KILN_WORKER_NAME"]["value"] == f"$(POD_NAME).{name}.{DOMAIN}"
        cache = pool.get("cache", {"type": "emptyDir"})
        claims = [c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])]
        volumes = {v["name"]: v for v in spec["volumes"]}
        used = toml_value(text, "max-used-space")
        if cache["type"] == "pvc":
            assert claims == ["state"] and "state" not in volumes
            assert used == (f'"{pool["gc"]["maxUsedSpace"]}"' if pool.get("gc", {}).get("maxUsedSpace") else None), used
        else:
            assert claims == [] and "emptyDir" in volumes["state"]
            # Collected before the emptyDir's limit evicts the pod.
            size = cache.get("size", "50Gi")
            limit = int(size[:-2]) * (1024 if size.endswith("Gi") else 1024 * 1024)
            if not pool.get("gc", {}).get("maxUsedSpace"):
                assert used == f'"{limit * 8 // 10}MiB"', used
            if not pool.get("gc", {}).get("reservedSpace"):
                assert toml_value(text, "reserved-space") == f'"{limit // 10}MiB"', text
            assert volumes["state"]["emptyDir"]["sizeLimit"] == size
        expected_image = pool.get("image", {}).get("repository", values.get("image", {}).get("repository", "kiln/kilnd"))
        assert kilnd["image"].startswith(expected_image + ":"), kilnd["image"]
        headless = one(objects, "Service", name)
        assert headless["spec"]["clusterIP"] == "None"
        if coordinator_names is not None:
            worker_names = certificate_names(secrets[f"{name}-tls"])
            assert covered(worker_names, f"{name}-0.{name}.{DOMAIN}"), worker_names
            # A worker's certificate speaks for none of the coordinators, nor another pool.
            assert not covered(worker_names, f"kiln-coordinator-0.kiln-coordinator.{DOMAIN}")
            for other in pools:
                if other["name"] != pool["name"]:
                    assert not covered(worker_names, f"kiln-worker-{other['name']}-0.kiln-worker-{other['name']}.{DOMAIN}")
        check_autoscaling(objects, values, pool, name, workload)

    if values.get("networkPolicy", {}).get("enabled", True):
        workers_policy = one(objects, "NetworkPolicy", "kiln-workers")
        [blobs, metrics] = workers_policy["spec"]["ingress"]
        assert blobs["ports"] == [{"port": "blobs"}]
        assert blobs["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "kiln"}}}]
        assert metrics["ports"] == [{"port": "metrics"}]
        # No empty `from` (that would admit anyone, outside the cluster too).
        assert metrics["from"] == [{"namespaceSelector": {}}], metrics
        coordinator_policy = one(objects, "NetworkPolicy", "kiln-coordinator")
        [grpc, coordinator_metrics] = coordinator_policy["spec"]["ingress"]
        assert grpc["ports"] == [{"port": "grpc"}] and coordinator_metrics["from"] == [{"namespaceSelector": {}}]


def check_autoscaling(objects, values, pool, name, workload):
    engine = values.get("autoscaling", {}).get("engine", "none")
    scaled = named(objects, "ScaledObject")
    hpas = named(objects, "HorizontalPodAutoscaler")
    if engine == "none":
        assert workload["spec"]["replicas"] == pool.get("replicas", 1)
        assert not scaled and not hpas
        return
    assert "replicas" not in workload["spec"], "the autoscaler owns the replica count"
    target = {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name}
    if engine == "keda":
        spec = one(objects, "ScaledObject", name)["spec"]
        assert spec["scaleTargetRef"] == target
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (pool["minReplicas"], pool["maxReplicas"])
        down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        assert down["stabilizationWindowSeconds"] >= 300, "busy workers are not scaled away at once"
        [trigger] = spec["triggers"]
        if trigger["type"] == "metrics-api":
            url = urllib.parse.urlparse(trigger["metadata"]["url"])
            assert (url.hostname, url.port, url.path) == (f"kiln-metrics.{DOMAIN}", 9090, "/v1/queue"), url
            query = urllib.parse.parse_qs(url.query)
            assert query == {"pool": [pool["name"]], "platform": [pool["platform"]]}, query
            assert trigger["metadata"]["valueLocation"] == "demand"
            assert trigger["metadata"]["targetValue"] == str(pool["maxParallelism"])
        else:
            assert trigger["type"] == "prometheus"
            query = trigger["metadata"]["query"]
            assert f'kiln_pool_demand{{pool="{pool["name"]}"}}' in query, query
            assert f'kiln_queue_depth{{platform="{pool["platform"]}"}}' in query, query
            assert 'unless on() (sum(kiln_workers{state="ready"}) > 0)' in query, query
            assert trigger["metadata"]["threshold"] == str(pool["maxParallelism"])
    else:
        spec = one(objects, "HorizontalPodAutoscaler", name)["spec"]
        assert spec["scaleTargetRef"] == target
        [metric] = spec["metrics"]
        assert metric["external"]["metric"] == {"name": "kiln_pool_demand",
                                                "selector": {"matchLabels": {"pool": pool["name"]}}}
        assert metric["external"]["target"]["averageValue"] == str(pool["maxParallelism"])
        assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


FLEET = {
    "coordinator": {"replicas": 3, "sharedCache": "type=s3,bucket=kiln-cache,region=eu-west-1"},
    "workerPools": [
        {"name": "amd64", "platform": "linux/amd64", "replicas": 2, "minReplicas": 1, "maxReplicas": 8,
         "maxParallelism": 8, "cache": {"type": "pvc", "size": "200Gi"},
         "gc": {"maxUsedSpace": "150GB", "keepDuration": "48h"}, "labels": {"disk": "ssd"}},
        {"name": "arm64", "platform": "linux/arm64", "replicas": 1, "minReplicas": 0, "maxReplicas": 4,
         "maxParallelism": 4, "cache": {"type": "emptyDir", "size": "100Gi"},
         "tolerations": [{"key": "arch", "operator": "Equal", "value": "arm64", "effect": "NoSchedule"}]},
    ],
    "autoscaling": {"engine": "keda"},
    "tokens": [{"name": "ci", "tenant": "ci", "role": "build", "sha256": "ab" * 32}],
    "metrics": {"serviceMonitor": {"enabled": True}},
}


def with_values(base, **changes):
    values = copy.deepcopy(base)
    for path, value in changes.items():
        node = values
        keys = path.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return values


def test_default_values_render_one_coordinator_and_one_pool():
    objects = render({})
    validate_schemas(objects)
    check_configs_with_kilnd(objects)
    check_fleet(objects, {})


def test_a_fleet_of_three_coordinators_and_two_arch_pools_scaled_by_keda():
    objects = render(FLEET)
    validate_schemas(objects)
    check_configs_with_kilnd(objects)
    check_fleet(objects, FLEET)
    monitor = one(objects, "ServiceMonitor", "kiln")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    scraped = [s for s in named(objects, "Service").values()
               if matches(monitor["spec"]["selector"], s["metadata"]["labels"])]
    # Every pod once: the coordinators' and each pool's headless Service.
    assert sorted(s["metadata"]["name"] for s in scraped) == ["kiln-coordinator", "kiln-worker-amd64", "kiln-worker-arm64"]
    config = config_files(objects)["coordinator-1.toml"]
    assert 'shared = "type=s3,bucket=kiln-cache,region=eu-west-1"' in config
    assert f'sha256 = "{"ab" * 32}"' in config


def test_the_web_ui_is_served_on_its_port_when_enabled():
    assert "kiln-web" not in named(render({}), "Service")
    assert "web-listen" not in config_files(render({}))["coordinator-0.toml"]
    values = with_values(FLEET, coordinator__web={"enabled": True, "port": 8088})
    objects = render(values)
    validate_schemas(objects)
    check_configs_with_kilnd(objects)
    for i in range(3):
        assert 'web-listen = "0.0.0.0:8088"' in config_files(objects)[f"coordinator-{i}.toml"]
    service = one(objects, "Service", "kiln-web")
    assert service["spec"]["ports"] == [{"name": "web", "port": 8088, "targetPort": "web"}]
    pods = one(objects, "StatefulSet", "kiln-coordinator")["spec"]["template"]
    assert matches({"matchLabels": service["spec"]["selector"]}, pods["metadata"]["labels"])
    ports = pods["spec"]["containers"][0]["ports"]
    assert {"name": "web", "containerPort": 8088} in ports
    policy = one(objects, "NetworkPolicy", "kiln-coordinator")
    assert any({"port": "web"} in rule["ports"] for rule in policy["spec"]["ingress"])
    try:
        render(with_values(FLEET, coordinator__web={"enabled": True, "port": 0}))
    except Exception as error:
        assert "port" in str(error), error
    else:
        raise AssertionError("port 0 was taken")


def test_five_coordinators_prometheus_triggers_and_hpa():
    for values in [
        with_values(FLEET, coordinator__replicas=5),
        with_values(FLEET, autoscaling={"engine": "keda", "keda": {"trigger": "prometheus",
                                                                    "prometheusAddress": "http://prometheus:9090"}}),
        with_values(FLEET, autoscaling={"engine": "hpa"}),
    ]:
        objects = render(values)
        validate_schemas(objects)
        check_fleet(objects, values)


def test_existing_secrets_must_be_named():
    try:
        render(with_values(FLEET, tls={"mode": "secrets", "coordinatorSecret": "kiln-tls"}))
    except helm.HelmError as error:
        assert "tls.poolSecrets.amd64" in str(error), error
    else:
        raise AssertionError("rendered without the pools' secrets")
    values = with_values(FLEET, tls={"mode": "secrets", "coordinatorSecret": "c", "poolSecrets": {"amd64": "a", "arm64": "b"}})
    objects = render(values)
    arm = one(objects, "StatefulSet", "kiln-worker-arm64")
    [tls] = [v for v in arm["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    assert tls["secret"]["secretName"] == "b"


def test_cert_manager_issues_the_certificates():
    values = with_values(FLEET, tls={"mode": "certManager", "certManager": {"issuerRef": {"name": "ca", "kind": "ClusterIssuer"}}})
    objects = render(values)
    validate_schemas(objects)
    certificates = named(objects, "Certificate")
    assert sorted(certificates) == ["kiln-coordinator-tls", "kiln-worker-amd64-tls", "kiln-worker-arm64-tls"]
    assert f"*.kiln-coordinator.{DOMAIN}" in certificates["kiln-coordinator-tls"]["spec"]["dnsNames"]
    assert certificates["kiln-worker-arm64-tls"]["spec"]["dnsNames"] == [f"*.kiln-worker-arm64.{DOMAIN}"]
    assert not [s for s in named(objects, "Secret") if s.endswith("-tls")], "cert-manager writes them"


def test_a_pools_change_restarts_only_that_pool_and_long_names_fit():
    before = {o["metadata"]["name"]: o for o in render(FLEET) if o["kind"] == "StatefulSet"}
    changed = copy.deepcopy(FLEET)
    changed["workerPools"][1]["maxParallelism"] = 6
    after = {o["metadata"]["name"]: o for o in render(changed) if o["kind"] == "StatefulSet"}
    checksum = lambda workload: workload["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert checksum(before["kiln-worker-arm64"]) != checksum(after["kiln-worker-arm64"])
    for name in ["kiln-worker-amd64", "kiln-coordinator"]:
        assert checksum(before[name]) == checksum(after[name]), f"{name} restarts for another pool's change"
    # The longest names the schema allows still fit Kubernetes' limits.
    values = with_values(FLEET, workerPools=[{"name": "p" * 16, "platform": "linux/arm64", "maxParallelism": 1}])
    objects = render(values, name="a-very-long-release-name-for-the-ci-fleet")
    for obj in objects:
        limit = 52 if obj["kind"] == "StatefulSet" else 63
        assert len(obj["metadata"]["name"]) <= limit, (obj["kind"], obj["metadata"]["name"])
    # A pool with its own image (one per architecture).
    values = copy.deepcopy(FLEET)
    values["workerPools"][1]["image"] = {"repository": "registry.example/kilnd-arm64", "tag": "1"}
    arm = one(render(values), "StatefulSet", "kiln-worker-arm64")
    assert container(arm)["image"] == "registry.example/kilnd-arm64:1"


def test_wrong_values_fail_at_install_with_the_key_named():
    wrong = [
        (with_values({}, coordinator__replicas=2), "replicas"),
        (with_values(FLEET, workerPools=[{"name": "x", "platform": "amd64", "maxParallelism": 2}]), "platform"),
        (with_values({}, autoscaling={"engine": "cpu"}), "engine"),
        (with_values({}, unknown=1), "unknown"),
        (with_values(FLEET, workerPools=[{"name": "x", "platform": "linux/amd64", "maxParallelism": 0}]), "maxParallelism"),
        (with_values(FLEET, workerPools=[{"name": "x", "platform": "linux/amd64", "maxParallelism": 1,
                                           "labels": {"pool": "y"}}]), "labels"),
        (with_values({}, tokens=[{"name": "t", "sha256": "not-hex"}]), "sha256"),
        # The platform as kilnd names it (the queue is looked up by that name).
        (with_values(FLEET, workerPools=[{"name": "x", "platform": "linux/arm64/v8", "maxParallelism": 1}]), "platform"),
        (with_values(FLEET, workerPools=[{"name": "x", "platform": "linux/amd64", "maxParallelism": 1,
                                           "cache": {"type": "emptyDir", "size": "50G"}}]), "size"),
        (with_values(FLEET, workerPools=[{"name": "x", "platform": "linux/amd64", "maxParallelism": 1,
                                           "cache": {"type": "emptyDir", "size": "08Gi"}}]), "size"),
    ]
    for values, key in wrong:
        try:
            CHART.validate_schema(values)
        except helm.HelmValuesError as error:
            assert key in str(error), f"{key} not named in: {error}"
            continue
        raise AssertionError(f"accepted: {values}")


def main():
    tests = [(name, fn) for name, fn in sorted(globals().items()) if name.startswith("test_") and callable(fn)]
    failed = 0
    for name, fn in tests:
        try:
            fn()
            print(f"chart: {name} ... ok")
        except Exception:
            failed += 1
            print(f"chart: {name} ... FAILED")
            traceback.print_exc()
    print(f"chart: {len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
