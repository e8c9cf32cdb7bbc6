"""deploy/kubernetes/: the manifests parse, hang together, match the topology file they ship,
and run only command lines the real ``flashback`` CLI accepts.

A hand-written schema, not the Kubernetes OpenAPI one (no cluster, no network): the fields the
deployment relies on are checked for presence and type, keys of pod specs and containers for
typos, and references between documents (selectors, service names, ConfigMap keys, volume
mounts, named ports) for dangling ends. The flags of every ``flashback <role>`` command line
are checked against ``python -m flashback <role> --help``; a role the CLI does not have fails.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import tempfile
import sys
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from store.topology import parse as parse_topology

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"

API_VERSIONS = {
    "Namespace": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "Service": "v1",
    "StatefulSet": "apps/v1",
    "Deployment": "apps/v1",
    "PodDisruptionBudget": "policy/v1",
}
# Dotted path -> type(s) that must be there, per kind.
REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "Namespace": {},
    "ConfigMap": {"data": dict},
    "Secret": {},
    "Service": {"spec.selector": dict, "spec.ports": list},
    "StatefulSet": {"spec.serviceName": str, "spec.replicas": int, "spec.selector.matchLabels": dict,
                    "spec.template.metadata.labels": dict, "spec.template.spec.containers": list,
                    "spec.volumeClaimTemplates": list},
    "Deployment": {"spec.replicas": int, "spec.selector.matchLabels": dict,
                   "spec.template.metadata.labels": dict, "spec.template.spec.containers": list},
    "PodDisruptionBudget": {"spec.selector.matchLabels": dict},
}
TOP_KEYS = {"apiVersion", "kind", "metadata", "spec", "data", "stringData", "type"}
POD_SPEC_KEYS = {"containers", "initContainers", "volumes", "securityContext", "affinity",
                 "terminationGracePeriodSeconds", "serviceAccountName", "nodeSelector", "tolerations",
                 "topologySpreadConstraints", "priorityClassName", "imagePullSecrets"}
CONTAINER_KEYS = {"name", "image", "imagePullPolicy", "command", "args", "env", "envFrom", "ports",
                  "resources", "livenessProbe", "readinessProbe", "startupProbe", "lifecycle",
                  "securityContext", "volumeMounts", "workingDir"}
PROBE_KEYS = {"httpGet", "tcpSocket", "grpc", "exec", "initialDelaySeconds", "periodSeconds", "timeoutSeconds",
              "successThreshold", "failureThreshold", "terminationGracePeriodSeconds"}
CONTAINER_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "name": str, "image": str, "ports": list, "livenessProbe": dict, "readinessProbe": dict,
    "resources.requests.cpu": (str, int), "resources.requests.memory": str,
    "resources.limits.cpu": (str, int), "resources.limits.memory": str}
# Secrets the manifests may reference without shipping them (created by the operator, README).
EXTERNAL_SECRETS = {"flashback-s3"}
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


# --------------------------------------------------------------------------------------------
# Loading


@functools.cache
def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


@functools.cache
def documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, document) of every non-empty document of every resource file."""
    out = []
    for name in kustomization()["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc is not None:
                out.append((name, doc))
    return tuple(out)


def of_kind(*kinds: str) -> list[dict[str, Any]]:
    return [d for _, d in documents() if d.get("kind") in kinds]


def get(doc: Any, path: str, default: Any = None) -> Any:
    for key in path.split("."):
        if not isinstance(doc, dict) or key not in doc:
            return default
        doc = doc[key]
    return doc


def named(kind: str, name: str) -> dict[str, Any] | None:
    return next((d for d in of_kind(kind) if d["metadata"]["name"] == name), None)


def workloads() -> list[dict[str, Any]]:
    return of_kind("StatefulSet", "Deployment")


def containers(w: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = w["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def is_flashback(c: dict[str, Any]) -> bool:
    return c["image"].rsplit("/", 1)[-1].split(":")[0] == "flashback"


def argv(c: dict[str, Any]) -> list[str]:
    return [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]


def flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def container_port(c: dict[str, Any], port: int | str) -> int | None:
    """The number of a container port given by number or name, None if it has no such port."""
    for p in c.get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            return p["containerPort"]
    return None


def mounted_file(w: dict[str, Any], c: dict[str, Any], path: str) -> tuple[str, str] | None:
    """(ConfigMap name, key) that the file ``path`` in container ``c`` comes from, if any."""
    volumes = {v["name"]: v for v in w["spec"]["template"]["spec"].get("volumes", [])}
    for m in c.get("volumeMounts", []):
        base = m["mountPath"].rstrip("/") + "/"
        if not path.startswith(base) or m["name"] not in volumes or "configMap" not in volumes[m["name"]]:
            continue
        cm = volumes[m["name"]]["configMap"]
        rel = path[len(base):]
        items = cm.get("items")
        if items is None:
            return cm["name"], rel
        for it in items:
            if it["path"] == rel:
                return cm["name"], it["key"]
    return None


def topology_doc() -> dict[str, Any]:
    cm = named("ConfigMap", "flashback-config")
    assert cm is not None, "ConfigMap flashback-config (topology.yml, objstore.yml) is missing"
    return cm


# --------------------------------------------------------------------------------------------
# Files and documents


def test_kustomization_lists_exactly_the_manifest_files():
    k = kustomization()
    assert k.get("apiVersion") == "kustomize.config.k8s.io/v1beta1" and k.get("kind") == "Kustomization"
    resources = k["resources"]
    assert len(resources) == len(set(resources)), f"listed twice: {resources}"
    present = {p.name for p in K8S.iterdir() if p.suffix in (".yaml", ".yml") and p.name != "kustomization.yaml"}
    assert set(resources) == present, (f"not listed: {sorted(present - set(resources))}, "
                                       f"listed but absent: {sorted(set(resources) - present)}")


def test_documents_have_known_kinds_and_required_fields():
    ns = kustomization()["namespace"]
    errors, seen = [], set()
    for fname, d in documents():
        where = f"{fname}: {d.get('kind')}/{get(d, 'metadata.name')}"
        if not all(isinstance(d.get(k), str) for k in ("apiVersion", "kind")) or not isinstance(
                get(d, "metadata.name"), str):
            errors.append(f"{where}: needs apiVersion, kind and metadata.name")
            continue
        kind, name = d["kind"], d["metadata"]["name"]
        if kind not in API_VERSIONS:
            errors.append(f"{where}: unknown kind (known: {sorted(API_VERSIONS)})")
            continue
        if d["apiVersion"] != API_VERSIONS[kind]:
            errors.append(f"{where}: apiVersion {d['apiVersion']} (expected {API_VERSIONS[kind]})")
        if set(d) - TOP_KEYS:
            errors.append(f"{where}: unknown top-level keys {sorted(set(d) - TOP_KEYS)}")
        if (kind, name) in seen:
            errors.append(f"{where}: defined twice")
        seen.add((kind, name))
        if not (DNS1035_LABEL if kind == "Service" else DNS1123_LABEL).match(name):
            errors.append(f"{where}: name is not a DNS label")
        if kind == "StatefulSet" and len(name) > 52:
            errors.append(f"{where}: StatefulSet names longer than 52 characters break pod labels")
        if kind == "Namespace":
            if name != ns:
                errors.append(f"{where}: the kustomization's namespace is {ns}")
        elif get(d, "metadata.namespace") != ns:
            errors.append(f"{where}: metadata.namespace must be {ns}")
        for path, typ in REQUIRED[kind].items():
            if not isinstance(get(d, path), typ) or isinstance(get(d, path), bool):
                errors.append(f"{where}: {path} is missing or not a {typ}")
    assert not errors, "\n".join(errors)


def test_workloads_are_consistent():
    errors = []
    config_maps = {d["metadata"]["name"]: d for d in of_kind("ConfigMap")}
    secrets = {d["metadata"]["name"] for d in of_kind("Secret")} | EXTERNAL_SECRETS
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for w in workloads():
        where = f"{w['kind']}/{w['metadata']['name']}"
        tmpl = w["spec"]["template"]
        labels, match = tmpl["metadata"]["labels"], w["spec"]["selector"]["matchLabels"]
        if not match or not selects(match, labels):
            errors.append(f"{where}: selector.matchLabels {match} not among the template labels {labels}")
        pod = tmpl["spec"]
        if set(pod) - POD_SPEC_KEYS:
            errors.append(f"{where}: unknown pod spec keys {sorted(set(pod) - POD_SPEC_KEYS)}")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        claims = {get(t, "metadata.name") for t in w["spec"].get("volumeClaimTemplates", [])}
        if len(volumes) != len(pod.get("volumes", [])) or volumes.keys() & claims:
            errors.append(f"{where}: volume names must be unique (volumes and volumeClaimTemplates)")
        for t in w["spec"].get("volumeClaimTemplates", []):
            if not get(t, "spec.resources.requests.storage") or not get(t, "spec.accessModes"):
                errors.append(f"{where}: volumeClaimTemplate {get(t, 'metadata.name')} needs accessModes and "
                              "a storage request")
        for vname, v in volumes.items():
            if "configMap" in v:
                cm = config_maps.get(v["configMap"]["name"])
                if cm is None:
                    errors.append(f"{where}: volume {vname}: no ConfigMap {v['configMap']['name']}")
                    continue
                for it in v["configMap"].get("items", []):
                    if it["key"] not in cm["data"]:
                        errors.append(f"{where}: volume {vname}: ConfigMap {cm['metadata']['name']} has no key "
                                      f"{it['key']}")
        used = set()
        for c in containers(w):
            cwhere = f"{where} container {c.get('name')}"
            if set(c) - CONTAINER_KEYS:
                errors.append(f"{cwhere}: unknown keys {sorted(set(c) - CONTAINER_KEYS)}")
            for path, typ in CONTAINER_REQUIRED.items():
                if not isinstance(get(c, path), typ):
                    errors.append(f"{cwhere}: {path} is missing or not a {typ}")
            ports = c.get("ports", [])
            names = [p.get("name") for p in ports if p.get("name")]
            if len(set(names)) != len(names) or any(len(n) > 15 or not DNS1123_LABEL.match(n) for n in names):
                errors.append(f"{cwhere}: port names must be unique DNS labels of at most 15 characters")
            if not all(isinstance(p.get("containerPort"), int) for p in ports):
                errors.append(f"{cwhere}: every port needs a numeric containerPort")
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if set(c.get(probe, {})) - PROBE_KEYS:
                    errors.append(f"{cwhere}: {probe}: unknown keys {sorted(set(c[probe]) - PROBE_KEYS)}")
                port = get(c, f"{probe}.httpGet.port")
                if probe in c and (port is None or container_port(c, port) is None):
                    errors.append(f"{cwhere}: {probe} port {port} is not a port of the container")
            for m in c.get("volumeMounts", []):
                used.add(m["name"])
                if m["name"] not in volumes and m["name"] not in claims:
                    errors.append(f"{cwhere}: volumeMount {m['name']} has no volume or volumeClaimTemplate")
            env = [e["name"] for e in c.get("env", [])]
            for ref in re.findall(r"\$\((\w+)\)", " ".join(argv(c))):
                if ref not in env:
                    errors.append(f"{cwhere}: $({ref}) in the command line is not in the container's env")
            for e in c.get("env", []):
                ref = get(e, "valueFrom.secretKeyRef")
                if ref and ref["name"] not in secrets:
                    errors.append(f"{cwhere}: env {e['name']}: no Secret {ref['name']}")
                ref = get(e, "valueFrom.configMapKeyRef")
                if ref and ref["key"] not in get(config_maps.get(ref["name"]), "data", {}):
                    errors.append(f"{cwhere}: env {e['name']}: no key {ref['key']} in ConfigMap {ref['name']}")
            if is_flashback(c):
                args = argv(c)
                if c["image"] != f"flashback:{version}":
                    errors.append(f"{cwhere}: image {c['image']} (expected flashback:{version}, pyproject's version)")
                if args[:1] != ["flashback"]:
                    errors.append(f"{cwhere}: the command must start with flashback, got {args[:1]}")
                listen = flag_value(args, "--listen")
                lport = port_of(listen) if listen else None
                for probe, path in (("livenessProbe", "/-/healthy"), ("readinessProbe", "/-/ready")):
                    if get(c, f"{probe}.httpGet.path") != path:
                        errors.append(f"{cwhere}: {probe} must GET {path}")
                    if container_port(c, get(c, f"{probe}.httpGet.port")) != lport:
                        errors.append(f"{cwhere}: {probe} must probe the --listen port {lport}")
                for flag, key in (("--topology", "topology.yml"), ("--objstore.config-file", "objstore.yml")):
                    path = flag_value(args, flag)
                    if path is not None and mounted_file(w, c, path) != ("flashback-config", key):
                        errors.append(f"{cwhere}: {flag} {path} is not key {key} of ConfigMap flashback-config")
                for flag in ("--data-dir",):
                    path = flag_value(args, flag)
                    if path is not None and not any(m["mountPath"].rstrip("/") == path.rstrip("/")
                                                    for m in c.get("volumeMounts", [])):
                        errors.append(f"{cwhere}: {flag} {path} is not a mounted volume")
        for vname in (set(volumes) | claims) - used:
            errors.append(f"{where}: volume {vname} is mounted by no container")
        if w["kind"] == "StatefulSet":
            svc = named("Service", w["spec"]["serviceName"])
            if svc is None or get(svc, "spec.clusterIP") != "None":
                errors.append(f"{where}: serviceName {w['spec']['serviceName']} is not a headless Service here")
            elif not selects(svc["spec"]["selector"], labels):
                errors.append(f"{where}: its Service {svc['metadata']['name']} does not select its pods")
    assert not errors, "\n".join(errors)


def test_services_select_pods_and_target_their_ports():
    errors = []
    for svc in of_kind("Service"):
        where = f"Service/{svc['metadata']['name']}"
        pods = [w for w in workloads() if selects(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        if not svc["spec"]["selector"] or not pods:
            errors.append(f"{where}: selects no pods of these manifests")
            continue
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p.get("port"))
            for w in pods:
                if not any(container_port(c, target) is not None for c in containers(w)):
                    errors.append(f"{where}: targetPort {target} is no container port of {w['kind']}/"
                                  f"{w['metadata']['name']}")
    assert not errors, "\n".join(errors)


def test_disruption_budgets_cover_every_statefulset():
    errors = []
    pdbs = of_kind("PodDisruptionBudget")
    for pdb in pdbs:
        spec = pdb["spec"]
        if ("minAvailable" in spec) == ("maxUnavailable" in spec):
            errors.append(f"PodDisruptionBudget/{pdb['metadata']['name']}: set one of minAvailable, maxUnavailable")
        if not any(selects(spec["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])
                   for w in workloads()):
            errors.append(f"PodDisruptionBudget/{pdb['metadata']['name']}: selects no pods")
    for sts in of_kind("StatefulSet"):
        labels = sts["spec"]["template"]["metadata"]["labels"]
        covering = [p for p in pdbs if selects(p["spec"]["selector"]["matchLabels"], labels)]
        if len(covering) != 1:
            errors.append(f"StatefulSet/{sts['metadata']['name']}: {len(covering)} PodDisruptionBudgets (want 1)")
        elif covering[0]["spec"].get("maxUnavailable") != 1:
            errors.append(f"StatefulSet/{sts['metadata']['name']}: its budget must allow exactly one pod down")
    assert not errors, "\n".join(errors)


# --------------------------------------------------------------------------------------------
# The topology file against the StatefulSets


def _pod_dns(sts: dict[str, Any], ordinal: int) -> str:
    return f"{sts['metadata']['name']}-{ordinal}.{sts['spec']['serviceName']}.{sts['metadata']['namespace']}.svc"


def test_topology_matches_the_store_and_nats_statefulsets():
    topo = parse_topology(topology_doc()["data"]["topology.yml"])
    errors = []
    assert len(topo.shards) == 3 and all(len(s.replicas) == 3 for s in topo.shards), "3 shards x 3 replicas"
    streams = [s.stream for s in topo.shards]
    if len(set(streams)) != len(streams):
        errors.append(f"stream names are not unique: {streams}")
    stores: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for sts in of_kind("StatefulSet"):
        for c in containers(sts):
            args = argv(c)
            if is_flashback(c) and args[1:2] == ["store"]:
                shard = flag_value(args, "--shard")
                if shard in stores:
                    errors.append(f"shard {shard} has two StatefulSets")
                stores[shard] = (sts, c)
    if set(stores) != {s.name for s in topo.shards}:
        errors.append(f"StatefulSets run shards {sorted(stores)}, the topology has {[s.name for s in topo.shards]}")
    for shard in topo.shards:
        if shard.name not in stores:
            continue
        sts, c = stores[shard.name]
        where = f"shard {shard.name} (StatefulSet/{sts['metadata']['name']})"
        args = argv(c)
        if sts["spec"]["replicas"] != len(shard.replicas):
            errors.append(f"{where}: {sts['spec']['replicas']} pods for {len(shard.replicas)} replicas")
        # The pod passes its own name as --replica: replica names must be the pod names.
        pod_name_env = [e["name"] for e in c.get("env", [])
                        if get(e, "valueFrom.fieldRef.fieldPath") == "metadata.name"]
        replica_arg = flag_value(args, "--replica")
        if not pod_name_env or replica_arg != f"$({pod_name_env[0]})":
            errors.append(f"{where}: --replica must be $(POD_NAME) from the downward API (metadata.name), "
                          f"got {replica_arg}")
        grpc_port = port_of(flag_value(args, "--grpc-listen") or ":0")
        http_port = port_of(flag_value(args, "--listen") or ":0")
        for p, name in ((grpc_port, "grpc"), (http_port, "http")):
            if container_port(c, name) != p:
                errors.append(f"{where}: container port {name} is not the listen port {p}")
        svc = named("Service", sts["spec"]["serviceName"])
        svc_ports = {p.get("targetPort", p["port"]): p["port"] for p in get(svc, "spec.ports", [])}
        if svc_ports.get("grpc") != grpc_port or svc_ports.get("http") != http_port:
            errors.append(f"{where}: its headless Service must expose grpc {grpc_port} and http {http_port} "
                          "on the same numbers")
        for ordinal, r in enumerate(shard.replicas):
            pod = f"{sts['metadata']['name']}-{ordinal}"
            if r.name != pod:
                errors.append(f"{where}: replica {ordinal} is named {r.name}, its pod {pod}")
            if r.grpc != f"{_pod_dns(sts, ordinal)}:{grpc_port}":
                errors.append(f"{where}: replica {r.name} grpc {r.grpc} is not {_pod_dns(sts, ordinal)}:{grpc_port}")
            if r.http and r.http != f"{_pod_dns(sts, ordinal)}:{http_port}":
                errors.append(f"{where}: replica {r.name} http {r.http} is not {_pod_dns(sts, ordinal)}:{http_port}")

    nats = named("StatefulSet", "flashback-nats")
    assert nats is not None, "StatefulSet flashback-nats is missing"
    nc = next(c for c in containers(nats) if c["name"] == "nats")
    client_port = container_port(nc, "client")
    want = [f"nats://{_pod_dns(nats, i)}:{client_port}" for i in range(nats["spec"]["replicas"])]
    if list(topo.nats) != want:
        errors.append(f"topology nats {list(topo.nats)} are not the NATS pods {want}")
    if topo.stream_replicas > nats["spec"]["replicas"]:
        errors.append(f"stream_replicas {topo.stream_replicas} > {nats['spec']['replicas']} NATS servers")
    assert not errors, "\n".join(errors)


def test_nats_cluster_config():
    sts = named("StatefulSet", "flashback-nats")
    assert sts is not None and sts["spec"]["replicas"] == 3
    c = next(c for c in containers(sts) if c["name"] == "nats")
    m = re.fullmatch(r"(?:.*/)?nats:(\d+)\.(\d+)\.(\d+)(?:-[\w.]+)?", c["image"])
    assert m and tuple(map(int, m.groups())) >= (2, 10, 0), f"NATS 2.10 or newer, pinned: {c['image']}"
    conf_path = flag_value(argv(c), "--config")
    src = mounted_file(sts, c, conf_path or "")
    assert src is not None, f"--config {conf_path} is not mounted from a ConfigMap"
    conf = named("ConfigMap", src[0])["data"][src[1]]
    assert re.search(r"^\s*jetstream\s*\{", conf, re.M), "JetStream is not enabled"
    store_dir = re.search(r"^\s*store_dir:\s*(\S+)", conf, re.M)
    claims = {get(t, "metadata.name") for t in sts["spec"]["volumeClaimTemplates"]}
    assert store_dir and any(mt["mountPath"] == store_dir[1] and mt["name"] in claims for mt in c["volumeMounts"]), \
        "the JetStream store_dir must be the PVC"
    cluster_port = container_port(c, "cluster")
    routes = re.findall(r"nats://([\w.-]+):(\d+)", conf.split("routes", 1)[1] if "routes" in conf else "")
    assert routes == [(_pod_dns(sts, i), str(cluster_port)) for i in range(3)], f"cluster routes: {routes}"
    for port in ("client", "monitor"):
        assert container_port(c, port) is not None, f"the nats container has no port {port}"
    variables = set(re.findall(r"\$(\w+)", conf))
    env = {e["name"] for e in c.get("env", [])}
    assert variables <= env, f"nats.conf uses {sorted(variables - env)} that the container does not define"

    from store.natscluster import NatsServerError, find_nats_server

    try:
        binary = find_nats_server()
    except NatsServerError as e:
        if os.environ.get("FLASHBACK_SKIP_NATS") == "1":
            pytest.skip(f"FLASHBACK_SKIP_NATS=1: {e}")
        pytest.fail(f"{e}. Set FLASHBACK_SKIP_NATS=1 to skip the NATS tests.", pytrace=False)
    # The server's own parser: `-t` checks the configuration and exits.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "nats.conf"
        path.write_text(conf)
        env_vars = {**os.environ, **{v: f"{sts['metadata']['name']}-0" for v in variables}}
        r = subprocess.run([binary, "-t", "-c", str(path)], capture_output=True, text=True, timeout=30, env=env_vars)
    assert r.returncode == 0, f"nats-server -t rejects nats.conf: {r.stdout}{r.stderr}"


def test_objstore_config_is_s3_without_keys():
    from store.s3bucket import S3Options

    doc = yaml.safe_load(topology_doc()["data"]["objstore.yml"])
    assert doc["type"].upper() == "S3" and set(doc) <= {"type", "config", "prefix"}
    options = S3Options.from_config(doc["config"])
    assert options.bucket and options.endpoint
    assert not {"access_key", "secret_key"} & set(doc["config"]), "credentials belong in the Secret, not the ConfigMap"


def test_dockerfile():
    text = (K8S / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\s*$", text, re.M)
    assert re.search(r"^RUN pip install \.", text, re.M)
    assert re.search(r'^ENTRYPOINT \["flashback"\]\s*$', text, re.M)
    for pkg in ("store", "adapter", "querier", "compactor", "flashback"):
        assert re.search(rf"^COPY {pkg} ", text, re.M), f"the image lacks package {pkg}"


# --------------------------------------------------------------------------------------------
# Command lines against the real CLI


_OPTION_LINE = re.compile(r"^  (-\S.*?)(?:\s{2,}|$)")


def parse_help(text: str) -> tuple[dict[str, bool], set[str]]:
    """From argparse help: {flag: takes a value} and the flags the usage line requires."""
    flags: dict[str, bool] = {}
    for line in text.splitlines():
        m = _OPTION_LINE.match(line)
        if m:
            # "-o {a,b}, --output {a,b}" (Python 3.11) or "-o, --output {a,b}" (3.13)
            parts = [p.split() for p in m.group(1).split(", ")]
            takes_value = any(len(words) > 1 for words in parts)
            for words in parts:
                if words and words[0].startswith("-"):
                    flags[words[0]] = takes_value
    usage = text.split("\n\n", 1)[0]
    required, depth = set(), 0
    for tok in usage.split()[1:]:
        opened = len(tok) - len(tok.lstrip("[("))
        depth += opened
        word = tok.strip("[]()|")
        if word.startswith("-") and depth == 0:
            required.add(word)
        depth -= len(tok) - len(tok.rstrip("])"))
    return flags, required


def check_command_line(args: list[str], top: dict[str, bool], roles: dict[str, tuple[dict[str, bool], set[str]]]
                       ) -> list[str]:
    """Problems of one ``flashback ...`` argv given the parsed helps."""
    errors = []

    def consume(i: int, flags: dict[str, bool], where: str) -> int:
        flag, _, value = args[i].partition("=")
        if flag not in flags:
            errors.append(f"{where} does not accept {flag} (accepts {sorted(flags)})")
            return i + 1
        if flags[flag] and not value:
            if i + 1 >= len(args):
                errors.append(f"{where}: {flag} needs a value")
            return i + 2
        return i + 1

    i = 1
    while i < len(args) and args[i].startswith("-"):
        i = consume(i, top, "flashback")
    if i >= len(args):
        return ["no role in the command line"]
    role = args[i]
    flags, required = roles[role]
    i, seen = i + 1, set()
    while i < len(args):
        if not args[i].startswith("-"):
            errors.append(f"flashback {role}: unexpected argument {args[i]!r}")
            i += 1
            continue
        seen.add(args[i].partition("=")[0])
        i = consume(i, flags, f"flashback {role}")
    if required - seen:
        errors.append(f"flashback {role}: required {sorted(required - seen)} missing")
    return errors


def test_parse_help_reads_argparse_output():
    import argparse

    p = argparse.ArgumentParser(prog="x")
    p.add_argument("--topology", metavar="FILE", required=True)
    p.add_argument("--objstore.config-file", metavar="FILE")
    p.add_argument("-o", "--output", choices=["a", "b"])
    p.add_argument("--verbose", action="store_true")
    flags, required = parse_help(p.format_help())
    assert flags == {"-h": False, "--help": False, "--topology": True, "--objstore.config-file": True,
                     "-o": True, "--output": True, "--verbose": False}
    assert required == {"--topology"}
    roles = {"r": (flags, required)}
    assert check_command_line(["flashback", "r", "--topology", "f", "--verbose"], {}, roles) == []
    assert check_command_line(["flashback", "r", "--topology=f", "-o", "a"], {}, roles) == []
    assert len(check_command_line(["flashback", "r", "--topolgy", "f"], {}, roles)) == 3  # unknown, stray, required
    assert check_command_line(["flashback", "r", "--verbose"], {}, roles) == [
        "flashback r: required ['--topology'] missing"]


def _run_helps(cmds: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Runs the help commands concurrently."""
    procs = {k: subprocess.Popen([sys.executable, "-m", "flashback", *c], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
             for k, c in cmds.items()}
    out = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        out[k] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


def test_command_lines_use_only_flags_the_cli_accepts():
    lines = [(f"{w['kind']}/{w['metadata']['name']}", argv(c)) for w in workloads() for c in containers(w)
             if is_flashback(c)]
    assert lines, "no flashback containers"
    roles = sorted({next(a for a in args[1:] if not a.startswith("-")) for _, args in lines})
    helps = _run_helps({"": ["--help"], **{r: [r, "--help"] for r in roles}})
    failed = [f"`flashback {k} --help`".replace("  ", " ") + f" exits {h.returncode}: {h.stderr.strip()[-300:]}"
              for k, h in helps.items() if h.returncode != 0]
    assert not failed, "the manifests run roles the CLI lacks:\n" + "\n".join(failed)
    assert set(roles) == {"store", "adapter", "querier", "compactor"}, f"roles run: {roles}"
    top, _ = parse_help(helps[""].stdout)
    parsed = {r: parse_help(helps[r].stdout) for r in roles}
    errors = [f"{where}: {shlex.join(args)}: {e}" for where, args in lines
              for e in check_command_line(args, top, parsed)]
    assert not errors, "\n".join(errors)
