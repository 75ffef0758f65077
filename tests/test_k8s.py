"""k8s/ and the Dockerfile, checked offline: every manifest against Kubernetes 1.29's schemas
(kubernetes-validate bundles them) or, for Multus' NetworkAttachmentDefinition, against
k8s/schemas/; then the invariants DESIGN.md §6 promises: NET_ADMIN and NET_RAW only, never
privileged, Guaranteed QoS with whole CPUs, probes that ask the VICI socket, UDP 500 and 4500
with externalTrafficPolicy Local, a config checksum that rolls the pods, no key material in
the ConfigMap."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
KUBERNETES_VERSION = "1.29.0"  # pinned: kubernetes-validate bundles its schemas
CORE_KINDS = {"Namespace", "ConfigMap", "Secret", "Service", "PodDisruptionBudget", "DaemonSet"}
NAD_KIND = "NetworkAttachmentDefinition"
VARIANTS = {"hostnetwork": K8S, "multus": K8S / "multus"}
CAPABILITIES = {"NET_ADMIN", "NET_RAW"}
VICI_URI = "unix:///run/espline/vici.sock"


def _load_render() -> Any:
    spec = importlib.util.spec_from_file_location("k8s_render", K8S / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_render()


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def _manifest_files() -> list[Path]:
    files = sorted(K8S.rglob("*.yaml"))
    return [p for p in files if p.name != "kustomization.yaml"]


def _all_docs() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in _manifest_files():
        for i, doc in enumerate(_docs(path)):
            yield f"{path.relative_to(K8S)}[{i}]", doc


def _one(path: Path, kind: str) -> dict[str, Any]:
    found = [d for d in _docs(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{path}: {len(found)} {kind}s"
    return found[0]


def _daemonset(variant: str) -> dict[str, Any]:
    return _one(VARIANTS[variant] / "daemonset.yaml", "DaemonSet")


def _espline_yaml(variant: str) -> dict[str, Any]:
    configmap = _one(VARIANTS[variant] / "configmap.yaml", "ConfigMap")
    config = yaml.safe_load(configmap["data"]["espline.yaml"])
    assert isinstance(config, dict)
    return config


def _containers(daemonset: dict[str, Any]) -> list[dict[str, Any]]:
    pod = daemonset["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def _espline_container(daemonset: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in daemonset["spec"]["template"]["spec"]["containers"]
                    if c["name"] == "espline"]
    return container


def _cpu_cores(quantity: object) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --- schemas ----------------------------------------------------------------------------------


def test_every_manifest_is_a_kind_that_is_checked() -> None:
    kinds = {doc["kind"] for _, doc in _all_docs()}
    assert kinds <= CORE_KINDS | {NAD_KIND}, kinds - CORE_KINDS - {NAD_KIND}
    assert kinds == CORE_KINDS | {NAD_KIND}


@pytest.mark.parametrize(
    "where", [w for w, doc in _all_docs() if doc["kind"] in CORE_KINDS]
)
def test_core_manifests_validate_against_kubernetes(where: str) -> None:
    doc = dict(_all_docs())[where]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{where}: {path}: {exc.message}")


def test_the_kubernetes_schemas_catch_mistakes() -> None:
    """The oracle is live: strict mode rejects an unknown field, a wrong type, a missing
    required field."""
    daemonset = _daemonset("hostnetwork")
    kubernetes_validate.validate(daemonset, KUBERNETES_VERSION, strict=True)
    broken = [copy.deepcopy(daemonset) for _ in range(3)]
    broken[0]["spec"]["template"]["spec"]["hostNetwrok"] = True
    _espline_container(broken[1])["securityContext"]["privileged"] = "no"
    del broken[2]["spec"]["selector"]
    for doc in broken:
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _nad_schema() -> dict[str, Any]:
    schema = json.loads((K8S / "schemas" / "network-attachment-definition.schema.json")
                        .read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def _cni_schema() -> dict[str, Any]:
    schema = json.loads((K8S / "schemas" / "cni-config.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def _check_nad(doc: dict[str, Any]) -> dict[str, Any]:
    jsonschema.Draft202012Validator(_nad_schema()).validate(doc)
    cni = json.loads(doc["spec"]["config"])
    jsonschema.Draft202012Validator(_cni_schema()).validate(cni)
    return cni


def _nads() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in _all_docs() if doc["kind"] == NAD_KIND}


def test_network_attachment_definitions_hold_a_cni_config() -> None:
    nads = _nads()
    assert nads
    for name, doc in nads.items():
        cni = _check_nad(doc)
        assert cni["name"] == name
        plugins = cni.get("plugins", [cni])
        assert plugins[0]["type"] in {"macvlan", "ipvlan", "host-device", "sriov"}, name


def test_the_nad_schemas_reject_what_multus_would() -> None:
    (good, *_) = _nads().values()
    _check_nad(good)
    not_json = copy.deepcopy(good)
    not_json["spec"]["config"] = '{"cniVersion": "0.4.0", "type": "macvlan",'
    with pytest.raises(json.JSONDecodeError):
        _check_nad(not_json)
    no_type = copy.deepcopy(good)
    no_type["spec"]["config"] = json.dumps({"cniVersion": "0.4.0", "name": "x"})
    not_a_string = copy.deepcopy(good)
    not_a_string["spec"]["config"] = json.loads(good["spec"]["config"])
    wrong_group = copy.deepcopy(good)
    wrong_group["apiVersion"] = "k8s.cni.cncf.io/v1beta1"
    ipam_without_type = copy.deepcopy(good)
    cni = json.loads(good["spec"]["config"])
    cni["ipam"] = {"range": "203.0.113.0/24"}
    ipam_without_type["spec"]["config"] = json.dumps(cni)
    for doc in (no_type, not_a_string, wrong_group, ipam_without_type):
        with pytest.raises(jsonschema.ValidationError):
            _check_nad(doc)


def test_multus_annotation_names_the_attachments_and_the_outside_interface() -> None:
    daemonset = _daemonset("multus")
    template = daemonset["spec"]["template"]
    assert template["spec"].get("hostNetwork") is not True
    networks = json.loads(template["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"])
    nads = _nads()
    interfaces = {}
    for selection in networks:
        assert selection["name"] in nads, selection
        assert selection.get("namespace", daemonset["metadata"]["namespace"]) == (
            nads[selection["name"]]["metadata"]["namespace"])
        interfaces[selection["interface"]] = selection["name"]
    outside = _espline_yaml("multus")["dataplane"]["outside"]
    assert outside["mode"] == "af_packet"
    assert outside["interface"] in interfaces, "the AF_PACKET side must be a Multus interface"


# --- the DaemonSet's invariants ---------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_capabilities_are_net_admin_and_net_raw_only(variant: str) -> None:
    daemonset = _daemonset(variant)
    pod = daemonset["spec"]["template"]["spec"]
    assert not pod.get("hostPID") and not pod.get("hostIPC")
    pod_seccomp = pod.get("securityContext", {}).get("seccompProfile", {}).get("type")
    for container in _containers(daemonset):
        sc = container["securityContext"]
        assert sc["privileged"] is False
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        added = sc["capabilities"].get("add", [])
        assert len(added) == len(set(added))
        assert set(added) <= CAPABILITIES
        assert sc.get("seccompProfile", {}).get("type", pod_seccomp) == "RuntimeDefault"
    assert set(_espline_container(daemonset)["securityContext"]["capabilities"]["add"]) == (
        CAPABILITIES)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_only_host_path_is_the_tun_device(variant: str) -> None:
    daemonset = _daemonset(variant)
    host_paths = [v for v in daemonset["spec"]["template"]["spec"]["volumes"] if "hostPath" in v]
    assert [v["hostPath"] for v in host_paths] == [{"path": "/dev/net/tun", "type": "CharDevice"}]
    mounts = {m["name"]: m for m in _espline_container(daemonset)["volumeMounts"]}
    assert mounts[host_paths[0]["name"]]["mountPath"] == "/dev/net/tun"


@pytest.mark.parametrize("variant", VARIANTS)
def test_guaranteed_qos_with_whole_cpus(variant: str) -> None:
    daemonset = _daemonset(variant)
    for container in _containers(daemonset):
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], container["name"]
        assert {"cpu", "memory"} <= resources["limits"].keys()
        cores = _cpu_cores(resources["limits"]["cpu"])
        assert cores == int(cores) and cores >= 1, "the static CPU manager pins whole CPUs"
    cores = int(_cpu_cores(_espline_container(daemonset)["resources"]["limits"]["cpu"]))
    workers = _espline_yaml(variant)["dataplane"]["workers"]
    assert 1 <= workers < cores, "one CPU is left for the I/O process and the controller"


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_ask_the_vici_socket(variant: str) -> None:
    container = _espline_container(_daemonset(variant))
    vici = _espline_yaml(variant)["controller"]["vici_socket"]
    assert f"unix://{vici}" == VICI_URI
    assert {"readinessProbe", "livenessProbe"} <= container.keys()
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        if name not in container:
            continue
        probe = container[name]
        assert probe.keys() & {"httpGet", "tcpSocket", "grpc"} == set(), name
        command = probe["exec"]["command"]
        assert command == ["espline", "stats", "--uri", VICI_URI], name
        assert not {"pgrep", "pidof", "ps", "sh", "bash"} & set(command)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    run = mounts[vici.rsplit("/", 1)[0]]
    assert not run.get("readOnly")
    volumes = {v["name"]: v for v in _daemonset(variant)["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes[run["name"]]


def test_the_probe_command_fails_without_a_daemon(tmp_path: Path) -> None:
    """The probes' argv is one espline accepts, and it fails (so the probe fails) when no
    controller answers on the socket."""
    command = _espline_container(_daemonset("hostnetwork"))["livenessProbe"]["exec"]["command"]
    argv = [f"unix://{tmp_path}/vici.sock" if a == VICI_URI else a for a in command[1:]]
    done = subprocess.run([sys.executable, "-m", "controller.cli", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr


@pytest.mark.parametrize("variant", VARIANTS)
def test_runs_espline_on_the_mounted_config_and_secret(variant: str) -> None:
    daemonset = _daemonset(variant)
    container = _espline_container(daemonset)
    assert [*container.get("command", []), *container.get("args", [])] == [
        "espline", "run", "-c", "/etc/espline/espline.yaml"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/espline"]
    assert mount["readOnly"] is True
    volumes = {v["name"]: v for v in daemonset["spec"]["template"]["spec"]["volumes"]}
    files = {}
    for source in volumes[mount["name"]]["projected"]["sources"]:
        ((kind, ref),) = source.items()
        for item in ref["items"]:
            files[f"/etc/espline/{item['path']}"] = (kind, ref["name"], item["key"],
                                                     item.get("mode"))
    configmap = _one(VARIANTS[variant] / "configmap.yaml", "ConfigMap")
    assert files["/etc/espline/espline.yaml"][:3] == (
        "configMap", configmap["metadata"]["name"], "espline.yaml")
    secret = _one(K8S / "secret.example.yaml", "Secret")
    secrets_file = _espline_yaml(variant)["controller"]["secrets_file"]
    assert files[secrets_file] == ("secret", secret["metadata"]["name"], "secrets.yaml", 0o400)


@pytest.mark.parametrize("variant", VARIANTS)
def test_scheduled_on_labelled_gateway_nodes(variant: str) -> None:
    daemonset = _daemonset(variant)
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"espline.io/gateway": "true"}
    selector = daemonset["spec"]["selector"]["matchLabels"]
    assert selector.items() <= daemonset["spec"]["template"]["metadata"]["labels"].items()
    assert daemonset["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 0


def test_default_variant_uses_the_host_network() -> None:
    daemonset = _daemonset("hostnetwork")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert _espline_yaml("hostnetwork")["dataplane"]["outside"]["mode"] == "af_packet"


def _network_neutral(daemonset: dict[str, Any]) -> dict[str, Any]:
    """A DaemonSet without what legitimately differs between the two variants."""
    doc = copy.deepcopy(daemonset)
    template = doc["spec"]["template"]
    for key in ("checksum/config", "k8s.v1.cni.cncf.io/networks"):
        template["metadata"]["annotations"].pop(key, None)
    pod = template["spec"]
    for key in ("hostNetwork", "dnsPolicy"):
        pod.pop(key, None)
    pod["securityContext"].pop("sysctls", None)
    for container in pod["containers"]:
        for port in container.get("ports", []):
            port.pop("hostPort", None)
    return doc


def test_the_two_variants_differ_only_in_the_network() -> None:
    assert _network_neutral(_daemonset("hostnetwork")) == _network_neutral(_daemonset("multus"))
    host, multus = _espline_yaml("hostnetwork"), _espline_yaml("multus")
    for config in (host, multus):
        config["dataplane"]["outside"].pop("interface")
    assert host == multus


# --- Services and the disruption budget -------------------------------------------------------


def _pod_labels() -> dict[str, str]:
    labels: dict[str, str] = _daemonset("hostnetwork")["spec"]["template"]["metadata"]["labels"]
    return labels


def test_load_balancer_carries_ike_and_nat_t_to_local_pods() -> None:
    service = _one(K8S / "service.yaml", "Service")
    spec = service["spec"]
    assert spec["type"] == "LoadBalancer"
    assert spec["externalTrafficPolicy"] == "Local"
    assert {(p["port"], p["protocol"]) for p in spec["ports"]} == {(500, "UDP"), (4500, "UDP")}
    assert all(p["targetPort"] == p["port"] for p in spec["ports"])
    assert spec["selector"].items() <= _pod_labels().items()
    container_ports = {(p["containerPort"], p["protocol"])
                       for p in _espline_container(_daemonset("hostnetwork"))["ports"]}
    assert {(500, "UDP"), (4500, "UDP")} <= container_ports
    for connection in _espline_yaml("hostnetwork")["connections"].values():
        assert connection["encap"] is True, "a Service carries UDP, never raw ESP"


def test_metrics_are_scraped_on_the_configured_port() -> None:
    port = int(_espline_yaml("hostnetwork")["controller"]["metrics_listen"].rpartition(":")[2])
    service = _one(K8S / "common" / "service-metrics.yaml", "Service")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= _pod_labels().items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == port
    annotations = service["metadata"]["annotations"]
    for variant in VARIANTS:
        pod_annotations = _daemonset(variant)["spec"]["template"]["metadata"]["annotations"]
        for a in (annotations, pod_annotations):
            assert a["prometheus.io/scrape"] == "true"
            assert a["prometheus.io/port"] == str(port)
            assert a["prometheus.io/path"] == "/metrics"
        ports = {p["name"]: p for p in _espline_container(_daemonset(variant))["ports"]}
        assert ports[service_port["targetPort"]]["containerPort"] == port


def test_disruption_budget_covers_the_gateway_pods() -> None:
    pdb = _one(K8S / "common" / "pdb.yaml", "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= _pod_labels().items()


# --- the configuration and the secret ---------------------------------------------------------


SWANCTL_CONNECTION_KEYS = {
    "version", "local_addrs", "remote_addrs", "proposals", "encap", "dpd_delay", "rekey_time",
    "local", "remote", "children",
}
SWANCTL_CHILD_KEYS = {
    "local_ts", "remote_ts", "esp_proposals", "start_action", "rekey_time",
}


def _keys_anywhere(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _keys_anywhere(value)
    elif isinstance(node, list):
        for item in node:
            yield from _keys_anywhere(item)


@pytest.mark.parametrize("variant", VARIANTS)
def test_configmap_holds_a_working_espline_yaml(variant: str) -> None:
    config = _espline_yaml(variant)
    assert set(config) == {"controller", "dataplane", "connections"}
    controller = config["controller"]
    assert controller["vici_socket"] == "/run/espline/vici.sock"
    assert controller["metrics_listen"] == "0.0.0.0:9469"
    assert controller["secrets_file"] == "/etc/espline/secrets/secrets.yaml"
    dataplane = config["dataplane"]
    assert dataplane["inside"]["mode"] == "tun"
    assert dataplane["outside"]["mode"] == "af_packet" and dataplane["outside"]["interface"]
    assert "cpus" not in dataplane, "the CPU manager picks the cores: use the affinity set"
    (connection,) = config["connections"].values()
    assert set(connection) == SWANCTL_CONNECTION_KEYS
    assert connection["version"] == 2
    assert connection["local"]["auth"] == connection["remote"]["auth"] == "psk"
    (child,) = connection["children"].values()
    assert set(child) == SWANCTL_CHILD_KEYS


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_key_material_in_the_configmap(variant: str) -> None:
    configmap_text = (VARIANTS[variant] / "configmap.yaml").read_text(encoding="utf-8")
    config = _espline_yaml(variant)
    assert "secrets" not in config and "static_sas" not in config
    assert not {"secret", "key", "psk", "enc_key", "integ_key"} & set(_keys_anywhere(config))
    secrets = yaml.safe_load(
        _one(K8S / "secret.example.yaml", "Secret")["stringData"]["secrets.yaml"])["secrets"]
    for entry in secrets.values():
        assert entry["secret"] not in configmap_text


def test_secret_matches_the_connection_ids() -> None:
    secret = _one(K8S / "secret.example.yaml", "Secret")
    assert secret["type"] == "Opaque"
    assert set(secret["stringData"]) == {"secrets.yaml"}
    content = yaml.safe_load(secret["stringData"]["secrets.yaml"])
    assert set(content) == {"secrets"}
    ids = {value for entry in content["secrets"].values()
           for key, value in entry.items() if key.startswith("id")}
    for variant in VARIANTS:
        for connection in _espline_yaml(variant)["connections"].values():
            assert {connection["local"]["id"], connection["remote"]["id"]} <= ids


@pytest.mark.parametrize("variant", VARIANTS)
def test_espline_loads_the_configmap_and_the_secret(variant: str, tmp_path: Path) -> None:
    """The two files as `espline run` reads them, on the pod's CPUs: the PSK that the
    connection's identities find is the Secret's."""
    from controller.config import load_config
    from controller.connections import PskStore
    from controller.run import with_secrets_file

    config = _espline_yaml(variant)
    secrets_yaml = _one(K8S / "secret.example.yaml", "Secret")["stringData"]["secrets.yaml"]
    (tmp_path / "secrets.yaml").write_text(secrets_yaml, encoding="utf-8")
    config["controller"]["secrets_file"] = str(tmp_path / "secrets.yaml")
    (tmp_path / "espline.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    cores = int(_cpu_cores(_espline_container(_daemonset(variant))["resources"]["limits"]["cpu"]))
    cfg = with_secrets_file(load_config(tmp_path / "espline.yaml", allowed_cpus=range(cores)))
    assert cfg.dataplane.workers == config["dataplane"]["workers"]
    assert cfg.controller.vici_socket == config["controller"]["vici_socket"]
    assert cfg.shared_keys and not cfg.secrets, "the keys come from the Secret only"
    (secret,) = yaml.safe_load(secrets_yaml)["secrets"].values()
    psks = PskStore(cfg.shared_keys)
    for conn in cfg.conns.values():
        assert psks.lookup(conn.local.id, conn.remote.id) == secret["secret"].encode()


# --- the checksum that rolls the pods ---------------------------------------------------------


def test_checksum_annotations_are_up_to_date() -> None:
    stale = render.render(K8S, write=False)
    assert stale == [], "run: python3 k8s/render.py"
    for variant, folder in VARIANTS.items():
        annotation = _daemonset(variant)["spec"]["template"]["metadata"]["annotations"]
        configmap = _one(folder / "configmap.yaml", "ConfigMap")
        assert annotation["checksum/config"] == render.config_checksum(configmap)
        assert re.fullmatch(r"[0-9a-f]{64}", annotation["checksum/config"])


def test_checksum_follows_the_content_only() -> None:
    configmap = _one(K8S / "configmap.yaml", "ConfigMap")
    before = render.config_checksum(configmap)
    changed = copy.deepcopy(configmap)
    changed["data"]["espline.yaml"] = changed["data"]["espline.yaml"].replace(
        "workers: 3", "workers: 2")
    assert changed != configmap
    assert render.config_checksum(changed) != before
    relabelled = copy.deepcopy(configmap)
    relabelled["metadata"]["labels"]["team"] = "net"
    assert render.config_checksum(relabelled) == before


def test_a_config_change_rolls_the_pods(tmp_path: Path) -> None:
    copy_dir = tmp_path / "k8s"
    shutil.copytree(K8S, copy_dir, ignore=shutil.ignore_patterns("__pycache__"))
    configmap_path = copy_dir / "configmap.yaml"
    daemonset_path = copy_dir / "daemonset.yaml"
    old_daemonset = daemonset_path.read_text(encoding="utf-8")
    old = _one(daemonset_path, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    # A comment is not a change of content: nothing rolls.
    configmap_path.write_text("# reviewed\n" + configmap_path.read_text(encoding="utf-8"),
                              encoding="utf-8")
    assert render.render(copy_dir, write=False) == []
    configmap_path.write_text(
        configmap_path.read_text(encoding="utf-8").replace("rekey_time: 1h", "rekey_time: 2h"),
        encoding="utf-8")
    assert render.main(["--check", "--dir", str(copy_dir)]) == 1
    assert render.main(["--dir", str(copy_dir)]) == 0
    assert render.main(["--check", "--dir", str(copy_dir)]) == 0
    new_daemonset = daemonset_path.read_text(encoding="utf-8")
    new = _one(daemonset_path, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert new["checksum/config"] != old["checksum/config"]
    assert new["checksum/config"] == render.config_checksum(_one(configmap_path, "ConfigMap"))
    # Only the annotation's line changed: comments and layout survive the rewrite.
    changed = [(a, b) for a, b in zip(old_daemonset.splitlines(), new_daemonset.splitlines(),
                                      strict=True) if a != b]
    assert len(changed) == 1 and "checksum/config" in changed[0][1]
    # The Multus variant has its own ConfigMap: untouched, still current.
    assert (copy_dir / "multus" / "daemonset.yaml").read_text(encoding="utf-8") == (
        (K8S / "multus" / "daemonset.yaml").read_text(encoding="utf-8"))


def test_render_refuses_a_daemonset_that_mounts_another_configmap(tmp_path: Path) -> None:
    copy_dir = tmp_path / "k8s"
    shutil.copytree(K8S, copy_dir, ignore=shutil.ignore_patterns("__pycache__"))
    path = copy_dir / "daemonset.yaml"
    path.write_text(path.read_text(encoding="utf-8").replace(
        "name: espline-config", "name: espline-config-old"), encoding="utf-8")
    with pytest.raises(render.RenderError, match="espline-config-old"):
        render.render(copy_dir, write=False)


# --- kustomize ---------------------------------------------------------------------------------


def _kustomize_files(folder: Path) -> set[Path]:
    """The manifest files a kustomization reaches, following folder resources."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8"))
    files: set[Path] = set()
    for resource in spec["resources"]:
        path = (folder / resource).resolve()
        files |= _kustomize_files(path) if path.is_dir() else {path}
    return files


def test_kustomizations_apply_everything_but_the_example_secret() -> None:
    default, multus = _kustomize_files(K8S), _kustomize_files(K8S / "multus")
    every = {p.resolve() for p in _manifest_files()}
    assert default | multus == every - {(K8S / "secret.example.yaml").resolve()}
    for files in (default, multus):
        kinds = [doc["kind"] for path in files for doc in _docs(path)]
        assert kinds.count("DaemonSet") == kinds.count("ConfigMap") == 1
        assert "Secret" not in kinds


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("variant", VARIANTS)
def test_kubectl_kustomize_builds(variant: str) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(VARIANTS[variant])], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    expected = [doc for path in _kustomize_files(VARIANTS[variant]) for doc in _docs(path)]
    assert sorted(d["kind"] for d in docs) == sorted(d["kind"] for d in expected)
    (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet"]
    assert _espline_container(daemonset)["image"] == "registry.example.com/espline:0.1.0"
    assert daemonset["spec"]["template"]["metadata"]["annotations"]["checksum/config"] == (
        _daemonset(variant)["spec"]["template"]["metadata"]["annotations"]["checksum/config"])


# --- the image ---------------------------------------------------------------------------------


def _dockerfile() -> list[str]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_builds_espline_on_slim_bookworm() -> None:
    lines = _dockerfile()
    bases = [line.split()[1] for line in lines if line.upper().startswith("FROM ")]
    assert bases and all(b == "python:3.11-slim-bookworm" for b in bases)
    runs = " ".join(line for line in lines if line.upper().startswith("RUN "))
    assert re.search(r"apt-get install[^&]*\biproute2\b", runs)
    assert re.search(r"\bpip (install|wheel)\b[^&]*\s\.(\s|$)", runs), "pip installs the package"
    last_from = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    final_stage = lines[last_from:]
    entrypoints = [line for line in final_stage if line.startswith("ENTRYPOINT")]
    assert entrypoints and json.loads(entrypoints[-1].split(None, 1)[1]) == ["espline"]
    users = [line.split()[1] for line in final_stage if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, "non-root by default"


def test_docker_context_holds_what_pip_install_needs() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]
                ["include"]}
    needed = {"pyproject.toml", pyproject["project"]["readme"], *packages}
    copied = set()
    for line in _dockerfile():
        if line.startswith("COPY ") and "--from" not in line:
            *sources, _ = line.split()[1:]
            copied |= {s.rstrip("/") for s in sources}
    assert needed <= copied, needed - copied
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text(encoding="utf-8")
                .splitlines() if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", "an allow-list"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert copied <= allowed, copied - allowed
    assert not allowed & {".venv", ".git", "tests", "k8s"}
    for name in copied:
        assert (ROOT / name).exists(), name
