"""deploy/ is not run by the tests (no Docker engine, no cluster), so this keeps it
honest: every command parses with the real CLI, ports and env names match the code,
the configuration validates, probes point at the ports the processes listen on; the
Kubernetes base and each overlay, rendered, validate against the Kubernetes schemas
(``kubernetes-validate``, offline); the images run as a user, with a health check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.main import get_command

from cyllm.cli import app
from cyllm.coordinator.settings import CoordinatorSettings
from cyllm.gateway.settings import GatewaySettings
from cyllm.protocol.plane import InternalSettings
from cyllm.settings import load_settings
from cyllm.worker.settings import WorkerSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CONFIG_MOUNT = "/etc/cyllm/cyllm.yaml"
SETTINGS = {
    "CYLLM_GATEWAY_": GatewaySettings,
    "CYLLM_COORDINATOR_": CoordinatorSettings,
    "CYLLM_WORKER_": WorkerSettings,
    "CYLLM_INTERNAL_": InternalSettings,
}


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


BASE = DEPLOY / "k8s" / "base"
OVERLAYS = ["cpu", "nvidia", "ascend"]


def _load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_docs() -> list[dict]:
    """The base's resources, in its kustomization's order."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return [d for name in kustomization["resources"] for d in _load(BASE / name)]


def _merge(base, patch):
    """A strategic merge as kustomize does it for these patches: maps merge, lists of
    named items merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: _merge(base[k], v) if k in base else v for k, v in patch.items()}}
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in base + patch)
    ):
        named = {i["name"]: i for i in patch}
        merged = [_merge(i, named.pop(i["name"])) if i["name"] in named else i for i in base]
        return merged + list(named.values())
    return patch


def rendered(overlay: str) -> list[dict]:
    """The overlay applied to the base (images, patches, the base's labels): what
    ``kubectl kustomize`` renders, for these files (compared with it where installed)."""
    import copy

    folder = DEPLOY / "k8s" / "overlays" / overlay
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../../base"]
    base_k = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    docs = copy.deepcopy(k8s_docs())
    for patch in [_load(folder / p["path"])[0] for p in kustomization.get("patches", [])]:
        (i,) = [
            n
            for n, d in enumerate(docs)
            if (d["kind"], d["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])
        ]
        docs[i] = _merge(docs[i], patch)
    images = {
        i["name"]: f"{i['newName']}:{i['newTag']}"
        for i in base_k.get("images", []) + kustomization.get("images", [])
    }
    labels = {k: v for entry in base_k.get("labels", []) for k, v in entry["pairs"].items()}
    for d in docs:
        d["metadata"].setdefault("labels", {}).update(labels)
        for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            c["image"] = images.get(c["image"], c["image"])
    return docs


def k8s_containers() -> list[tuple[dict, dict]]:
    return [
        (d, c)
        for d in k8s_docs()
        if d["kind"] in ("Deployment", "StatefulSet")
        for c in d["spec"]["template"]["spec"]["containers"]
    ]


def parse_cli(argv: list[str]):
    """Parse a ``cyllm ...`` command line with the real CLI; return (subcommand, params)."""
    assert argv[0] == "cyllm"
    argv = [str(DEPLOY / "cyllm.yaml") if a == CONFIG_MOUNT else a for a in argv[1:]]
    group = get_command(app)
    sub = group.get_command(None, argv[0])
    assert sub is not None, f"unknown command {argv[0]}"
    ctx = sub.make_context(argv[0], list(argv[1:]))
    return argv[0], ctx.params


def all_commands() -> list[list[str]]:
    cmds = []
    for svc in compose()["services"].values():
        if svc.get("command", [""])[0] == "cyllm":
            cmds.append(svc["command"])
        test = svc.get("healthcheck", {}).get("test", [])
        if test[1:2] == ["cyllm"]:
            cmds.append(test[1:])
    cmds += [c["command"] for _, c in k8s_containers() if c.get("command", [""])[0] == "cyllm"]
    return cmds


@pytest.mark.parametrize("argv", all_commands(), ids=lambda a: " ".join(a[:2]))
def test_every_command_parses_with_the_real_cli(argv):
    name, params = parse_cli(argv)
    assert name in {"gateway", "coordinator", "worker", "probe"}


def env_names() -> set[str]:
    names = set()
    for svc in compose()["services"].values():
        names |= set((svc.get("environment") or {}).keys())
    for _, c in k8s_containers():
        names |= {e["name"] for e in c.get("env", [])}
    return names


def test_env_names_are_real_settings():
    cyllm_names = {n for n in env_names() if n.startswith("CYLLM_")}
    assert cyllm_names, "expected CYLLM_ settings in deploy/"
    for name in cyllm_names:
        prefix = next(p for p in SETTINGS if name.startswith(p))
        field = name.removeprefix(prefix).lower()
        assert field in SETTINGS[prefix].model_fields, f"{name}: no setting {field!r}"


def test_config_validates_and_the_configmap_carries_the_same_text():
    path = DEPLOY / "cyllm.yaml"
    for cls in SETTINGS.values():
        load_settings(cls, path)
    (cm,) = [d for d in k8s_docs() if d["kind"] == "ConfigMap"]
    assert cm["data"]["cyllm.yaml"] == path.read_text()


def _port(params: dict) -> int:
    return int(params["port"])


def test_compose_ports_probes_and_addresses_match():
    services = compose()["services"]
    listening = {}
    for name, svc in services.items():
        if svc.get("command", [""])[0] == "cyllm":
            _, params = parse_cli(svc["command"])
            listening[name] = _port(params)
            if "--config" in svc["command"]:
                assert any(v.endswith(":" + CONFIG_MOUNT + ":ro") for v in svc.get("volumes", []))
    assert listening["gateway"] == 8080 and services["gateway"]["ports"] == ["8080:8080"]
    for name, svc in services.items():
        test = svc.get("healthcheck", {}).get("test", [])
        if "probe" in test:
            assert test[-1] == f"127.0.0.1:{listening[name]}"
        _, params = parse_cli(svc["command"]) if name in listening else (None, {})
        for address in params.get("coordinator") or []:
            host, port = address.split(":")
            assert listening[host] == int(port), address
        if params.get("redis_url"):
            assert params["redis_url"].startswith("redis://redis:6379/")
        advertise = (svc.get("environment") or {}).get("CYLLM_WORKER_ADVERTISE_ADDRESS")
        if advertise:
            assert advertise == f"{name}:{listening[name]}"


def test_k8s_ports_probes_and_services_match():
    docs = k8s_docs()
    listening = {}
    for deployment, c in k8s_containers():
        app_label = deployment["spec"]["template"]["metadata"]["labels"]["app"]
        container_ports = {p["containerPort"] for p in c["ports"]}
        if c.get("command", [""])[0] == "cyllm":
            _, params = parse_cli(c["command"])
            port = _port(params)
            listening[app_label] = port
            assert port in container_ports
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = c.get(kind)
                if probe:
                    probe_port = (probe.get("grpc") or probe.get("httpGet"))["port"]
                    assert probe_port == port, (app_label, kind)
            for env in c.get("env", []):
                if env["name"] == "CYLLM_WORKER_ADVERTISE_ADDRESS":
                    assert env["value"].endswith(f":{port}")
        else:
            listening[app_label] = next(iter(container_ports))
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for svc in services.values():
        target = listening[svc["spec"]["selector"]["app"]]
        assert all(p["targetPort"] == target for p in svc["spec"]["ports"]), svc["metadata"]["name"]
    for _, c in k8s_containers():
        if c.get("command", [""])[0] != "cyllm":
            continue
        _, params = parse_cli(c["command"])
        for address in params.get("coordinator") or []:
            host, port = address.split(":")
            assert host in services and int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
        for env in c.get("env", []):
            if env["name"].endswith("REDIS_URL"):
                host, port = re.match(r"redis://([^:/]+):(\d+)/", env["value"]).groups()
                assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}


def exported_metrics() -> set[str]:
    """Every metric series name the gateway, coordinator and worker export."""
    from cyllm.coordinator.metrics import CoordinatorMetrics
    from cyllm.gateway.metrics import GatewayMetrics
    from cyllm.worker.metrics import WorkerMetrics
    from cyllm.worker.models import ModelManager
    from cyllm.worker.settings import ModelSpec, WorkerSettings

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    exported = set()
    for registry in (
        GatewayMetrics().registry,
        CoordinatorMetrics().registry,
        WorkerMetrics(
            ModelManager(WorkerSettings(models=[ModelSpec(id="m", engine="fake")]), "cpu"), "w"
        ).registry,
    ):
        for family in registry.collect():
            exported |= {family.name + suffix for suffix in suffixes[family.type]}
    return exported


def test_grafana_dashboard_queries_only_metrics_the_services_export():
    import json

    exported = exported_metrics()
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            queried |= set(re.findall(r"\b((?:gateway|coordinator|worker)_[a-z_]+)\b", target["expr"]))
    assert queried, "the dashboard queries nothing"
    missing = queried - exported
    assert not missing, missing


def test_the_shipped_deployments_are_closed_by_default():
    """Issue 12: auth on at the gateway, a token on every component, from a Secret or a
    required variable, never a value in the repository; a policy per internal port."""
    services = compose()["services"]
    for name in ("coordinator", "worker-1", "worker-2", "gateway"):
        env = services[name]["environment"]
        assert env["CYLLM_INTERNAL_TOKEN"].startswith("${CYLLM_INTERNAL_TOKEN:?"), name
    assert services["gateway"]["environment"]["CYLLM_GATEWAY_AUTH_ENABLED"] == "true"
    for _deployment, c in k8s_containers():
        if c.get("command", [""])[0] != "cyllm":
            continue
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["CYLLM_INTERNAL_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "cyllm-internal"
        if c["name"] == "gateway":
            assert env["CYLLM_GATEWAY_AUTH_ENABLED"]["value"] == "true"
    policies = {
        d["spec"]["podSelector"]["matchLabels"]["app"]: d for d in k8s_docs() if d["kind"] == "NetworkPolicy"
    }
    allowed = {
        app: {
            src["podSelector"]["matchLabels"]["app"]
            for rule in p["spec"]["ingress"]
            for src in rule["from"]
            if "podSelector" in src
        }
        for app, p in policies.items()
    }
    for name, p in policies.items():  # other sources (Prometheus) reach only metrics ports
        for rule in p["spec"]["ingress"]:
            if any("podSelector" not in src for src in rule["from"]):
                assert {port["port"] for port in rule["ports"]} <= {9150, 9151}, name
    assert allowed == {
        "cyllm-coordinator": {"cyllm-gateway", "cyllm-worker"},
        "cyllm-worker": {"cyllm-coordinator"},
        "redis": {"cyllm-coordinator", "cyllm-gateway"},
    }


def test_redis_keeps_its_data_across_a_restart_in_both_deployments():
    """AOF on a volume: what the coordinators keep in Redis (queued tasks, jobs, workers,
    keys) outlives the Redis process (tests/e2e/test_distributed.py restarts one)."""
    svc = compose()["services"]["redis"]
    assert svc["command"][svc["command"].index("--appendonly") + 1] == "yes"
    assert any(v.split(":")[1] == "/data" for v in svc["volumes"])
    assert svc["volumes"][0].split(":")[0] in compose()["volumes"]  # a named volume
    (redis_set,) = [d for d in k8s_docs() if d["metadata"]["name"] == "redis" and d["kind"] == "StatefulSet"]
    (c,) = redis_set["spec"]["template"]["spec"]["containers"]
    assert c["args"][c["args"].index("--appendonly") + 1] == "yes"
    mount = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    claims = {t["metadata"]["name"] for t in redis_set["spec"]["volumeClaimTemplates"]}
    assert mount and all(path == "/data" and name in claims for name, path in mount.items())


# -- the Kubernetes kustomization and the images -------------------------------------------

K8S_VERSION = "1.33.0"


@pytest.mark.parametrize("overlay", [None, *OVERLAYS])
def test_manifests_validate_against_the_kubernetes_schemas(overlay):
    import kubernetes_validate

    docs = k8s_docs() if overlay is None else rendered(overlay)
    assert {d["kind"] for d in docs} >= {
        "Deployment",
        "StatefulSet",
        "Service",
        "ConfigMap",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any error


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_render_with_kubectl_where_it_is_installed(overlay):
    import shutil
    import subprocess

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlays are rendered by the test's own merge")
    out = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    ours = {(d["kind"], d["metadata"]["name"]): d for d in rendered(overlay)}
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
    assert ours.keys() == theirs.keys()
    import kubernetes_validate

    for key, d in theirs.items():
        if "spec" in d:
            assert d["spec"] == ours[key]["spec"], key
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)


def test_overlays_ask_for_their_accelerator_and_their_image():
    def worker(overlay):
        (d,) = [
            d
            for d in rendered(overlay)
            if (d["kind"], d["metadata"]["name"]) == ("Deployment", "cyllm-worker")
        ]
        return d["spec"]["template"]["spec"]["containers"][0]

    assert worker("cpu")["image"].endswith("cyllm-worker-cpu:0.1.0")
    assert "nvidia.com/gpu" not in str(worker("cpu")["resources"])
    assert worker("nvidia")["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker("nvidia")["image"].endswith("cyllm-worker-nvidia:0.1.0")
    assert worker("ascend")["resources"]["limits"]["huawei.com/Ascend910"] == 1
    for overlay in OVERLAYS:  # the patch kept the rest of the container
        assert worker(overlay)["command"][:2] == ["cyllm", "worker"]
        assert worker(overlay)["resources"]["limits"]["memory"]
    (gateway,) = [
        d for d in rendered("nvidia") if (d["kind"], d["metadata"]["name"]) == ("Deployment", "cyllm-gateway")
    ]
    assert gateway["spec"]["template"]["spec"]["containers"][0]["image"].endswith("cyllm-control-plane:0.1.0")


def test_pods_run_as_a_user_with_resources_probes_and_disruption_budgets():
    workloads = [d for d in k8s_docs() if d["kind"] in ("Deployment", "StatefulSet")]
    for d in workloads:
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, d["metadata"]["name"]
        assert pod["securityContext"]["runAsUser"] != 0
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
            assert c.get("readinessProbe") and c.get("livenessProbe"), c["name"]
    budgets = {
        d["spec"]["selector"]["matchLabels"]["app"] for d in k8s_docs() if d["kind"] == "PodDisruptionBudget"
    }
    assert budgets == {
        d["spec"]["selector"]["matchLabels"]["app"] for d in workloads if d["kind"] == "Deployment"
    }


def test_uploads_and_training_folders_are_on_storage_every_pod_shares():
    (claim,) = [d for d in k8s_docs() if d["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    config = yaml.safe_load((DEPLOY / "cyllm.yaml").read_text())
    mounted = {}
    for deployment, c in k8s_containers():
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes", [])}
        for m in c.get("volumeMounts", []):
            claim_ref = volumes.get(m["name"], {}).get("persistentVolumeClaim")
            if claim_ref:
                assert claim_ref["claimName"] == claim["metadata"]["name"]
                mounted[c["name"]] = m["mountPath"]
    assert set(mounted) == {"coordinator", "worker"}
    assert config["coordinator"]["files_dir"].startswith(mounted["coordinator"] + "/")
    assert config["worker"]["training_dir"].startswith(mounted["worker"] + "/")
    services = compose()["services"]
    for name in ("coordinator", "worker-1", "worker-2"):
        assert any(v.startswith("shared:" + mounted["worker"]) for v in services[name]["volumes"])


def test_metrics_ports_are_declared_where_the_processes_serve_them():
    for deployment, c in k8s_containers():
        if c["name"] not in ("coordinator", "worker"):
            continue
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        port = int(env[f"CYLLM_{c['name'].upper()}_METRICS_PORT"])
        assert {"containerPort": port, "name": "metrics"} in c["ports"]
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(port)


def dockerfile(name: str) -> dict[str, list[str]]:
    """Each instruction's arguments (continuation lines joined), by instruction."""
    text = (DEPLOY / "docker" / f"{name}.Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", re.sub(r"(?m)^\s*#.*\n", "", text))
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.setdefault(word.upper(), []).append(rest.strip())
    return out


@pytest.mark.parametrize("name", ["control-plane", "cpu", "nvidia", "ascend"])
def test_images_run_as_a_user_with_a_health_check_and_a_real_command(name):
    import json

    d = dockerfile(name)
    assert d["USER"] == ["10001"]
    (health,) = d["HEALTHCHECK"]
    probe = json.loads(health.split(" CMD ", 1)[1])
    (cmd,) = d["CMD"]
    argv = json.loads(cmd)
    sub, params = parse_cli(argv)
    exposed = {int(p) for line in d["EXPOSE"] for p in line.split()}
    assert int(params["port"]) in exposed
    if probe[:2] == ["cyllm", "probe"]:
        assert probe[2] == f"127.0.0.1:{params['port']}"
    else:
        assert f":{params['port']}/api/v1/health/live" in probe[-1]
    installs = " ".join(d["RUN"])
    if name == "control-plane":  # no model runtime in the gateway's image
        assert sub == "gateway" and "pip install --no-cache-dir -c constraints.txt . " in installs + " "
    else:
        assert "'.[worker,train" in installs


def test_workers_scale_on_queue_depth_and_load_and_drain_when_they_go():
    """The HorizontalPodAutoscalers: each targets a Deployment of the base; the workers'
    metrics are ones the services export and prometheus-adapter's rules serve; a worker
    leaves one at a time, with a grace period longer than its drain."""
    from cyllm.worker.settings import WorkerSettings

    docs = k8s_docs()
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    scalers = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
    assert set(scalers) == {"cyllm-worker", "cyllm-gateway"}
    for name, spec in scalers.items():
        assert spec["scaleTargetRef"]["name"] == name and name in deployments
        assert "replicas" not in deployments[name]["spec"]  # the autoscaler's to set
    worker = scalers["cyllm-worker"]
    read = {m[m["type"].lower()]["metric"]["name"] for m in worker["metrics"]}
    assert read == {"coordinator_queue_depth", "worker_running_requests"}
    assert read <= exported_metrics()
    rules = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter-rules.yaml").read_text())["rules"]
    served = {r["name"]["as"] for kind in rules.values() for r in kind}
    assert read <= served
    assert worker["behavior"]["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 120}]
    grace = deployments["cyllm-worker"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > WorkerSettings.model_fields["drain_timeout_s"].default
    gateway = scalers["cyllm-gateway"]["metrics"]
    assert [m["resource"]["name"] for m in gateway] == ["cpu"]
