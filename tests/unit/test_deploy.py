"""Offline checks of what ships beside the code: image, Kubernetes base, dashboard, alerts, IAM.

Docker, Kubernetes, Grafana, Prometheus and IAM do not run in CI, so each file is checked the
next best way: valid for its consumer (hadolint, the Kubernetes schemas bundled with
kubernetes-validate) and in agreement with the gateway itself — paths it serves, settings it
reads, metric names it exports, route files it accepts. A rename on either side fails here
instead of in a cluster.
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

from gateway.cli import build_parser
from gateway.ops.http import HealthServer
from gateway.ops.metrics import METRIC_NAMES
from gateway.routefile.loader import load_routes_text
from gateway.settings.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
IAM = ROOT / "deploy" / "iam"
SPOOL_DIR = "/var/spool/mqtt-kinesis-gateway"
POD_NAME = "mqtt-kinesis-gateway-0"  # what the StatefulSet calls its first replica
KUBERNETES_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())  # oldest we claim, newest
RATE_FUNCTIONS = re.compile(r"\b(?:rate|irate|increase)\(\s*$")
METRIC = re.compile(r"\bmqtt_kinesis_gateway_[A-Za-z0-9_]+")


# --------------------------------------------------------------------------- helpers

def _served(path: str) -> bool:
    """Whether the gateway's HTTP listener answers ``path`` (asked without opening a socket)."""
    status, _, _ = HealthServer("127.0.0.1", 0, render_metrics=lambda: b"").answer(path)
    return status != 404


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _resource(kind: str, path: Path | None = None) -> dict[str, Any]:
    found = [d for p in ([path] if path else _manifests()) for d in _docs(p) if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _pod() -> dict[str, Any]:
    return _resource("StatefulSet")["spec"]["template"]


def _container() -> dict[str, Any]:
    (container,) = [c for c in _pod()["spec"]["containers"] if c["name"] == "gateway"]
    return container


def _env() -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _container()["env"]}


def _port_number(port: int | str) -> int:
    """A probe or Service port, resolving a named port against the container's ports."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in _container()["ports"] if p["name"] == port]
    return number


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    logical, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            word, _, rest = pending.strip().partition(" ")
            logical.append((word.upper(), rest.strip()))
        pending = ""
    return logical


def _runtime_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def _image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in _runtime_stage():
        if word == "ENV":
            env.update(token.split("=", 1) for token in shlex.split(rest))  # type: ignore[misc]
    return env


def _image_instruction(word: str) -> str:
    (rest,) = [r for w, r in _runtime_stage() if w == word]
    return rest


def _routes_table() -> Any:
    key = posixpath.basename(_env()["GATEWAY_ROUTES"])
    text = _resource("ConfigMap", K8S / "configmap-routes.yaml")["data"][key]
    result = load_routes_text(text, "deploy/kubernetes/configmap-routes.yaml")
    assert result.ok, "\n".join(f.format_text() for f in result.findings)
    return result.table


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _default_settings() -> Any:
    return load_settings({"MQTT_HOST": "broker.invalid", "GATEWAY_ROUTES": "/nowhere/routes.yaml"})


# --------------------------------------------------------------------------- container image

def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint")
    assert hadolint, "hadolint not found: install the test extra (pip install -e '.[test]')"
    run = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def test_runtime_stage_copies_only_the_venv_onto_the_same_pinned_slim_base() -> None:
    bases = [rest.split()[0] for word, rest in _dockerfile() if word == "FROM"]
    assert len(bases) >= 2 and len(set(bases)) == 1, bases  # venv symlinks need the same python
    assert re.fullmatch(r"python:3\.\d+-slim(-[a-z]+)?", bases[0]), bases[0]
    runtime = _runtime_stage()
    assert [r for w, r in runtime if w == "COPY"] == [
        "--from=builder /opt/venv /opt/venv",
        f"--from=builder --chown={_image_instruction('USER')} {SPOOL_DIR} {SPOOL_DIR}"]  # empty, the user's
    assert not [r for w, r in runtime if w == "RUN"], "the runtime stage must not build anything"


def test_entrypoint_is_the_console_script_in_exec_form_as_a_numeric_user() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert json.loads(_image_instruction("ENTRYPOINT")) == ["mqtt-kinesis-gateway"]
    assert "mqtt-kinesis-gateway" in scripts
    assert json.loads(_image_instruction("CMD")) == ["run"]
    assert build_parser().parse_args(["run"]).command == "run"
    assert _container()["args"] == ["run"]
    assert re.fullmatch(r"\d+(:\d+)?", _image_instruction("USER"))


def test_dockerignore_sends_only_what_the_dockerfile_copies() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    assert patterns[0] == "*", "allowlist: exclude everything, then re-include"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for word, rest in _dockerfile():
        if word == "COPY" and not rest.startswith("--from"):
            copied.update(s.rstrip("/") for s in rest.split()[:-1])
    assert allowed == copied
    assert not {".env", ".git", ".venv", "tests", "bench"} & allowed


def test_image_spools_to_a_volume_the_gateway_user_owns() -> None:
    env = _image_env()
    assert env["GATEWAY_SPOOL_DIR"] == SPOOL_DIR
    assert json.loads(_image_instruction("VOLUME")) == [SPOOL_DIR]
    builder = _dockerfile()[: max(i for i, (w, _) in enumerate(_dockerfile()) if w == "FROM")]
    assert any(w == "RUN" and f"mkdir -p {SPOOL_DIR}" in r for w, r in builder)


def test_image_environment_is_accepted_by_the_settings_loader() -> None:
    env = _image_env()
    settings = load_settings({**env, "MQTT_HOST": "broker.invalid"})
    assert env["PYTHONUNBUFFERED"] == "1"
    assert settings.logging.format == "json"
    assert settings.routes_file == env["GATEWAY_ROUTES"] == _env()["GATEWAY_ROUTES"]
    assert settings.http.port == int(_image_instruction("EXPOSE")) == _default_settings().http.port


# --------------------------------------------------------------------------- Kubernetes

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", _manifests(), ids=lambda p: p.name)
def test_manifest_validates_against_bundled_kubernetes_schemas(manifest: Path,
                                                                 version: str) -> None:
    for doc in _docs(manifest):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{manifest.name}: {doc['kind']} {where}: {exc.message}")


def test_kustomization_lists_every_manifest_except_examples() -> None:
    kustomization = _docs(K8S / "kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    expected = {p.name for p in _manifests() if not p.name.endswith(".example.yaml")}
    assert set(listed) == expected


def test_kustomize_image_tag_is_the_project_version() -> None:
    (image,) = _docs(K8S / "kustomization.yaml")[0]["images"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert image["name"] == _container()["image"]
    assert image["newTag"] == version


def test_replicas_share_the_load_with_stable_client_ids() -> None:
    statefulset, service = _resource("StatefulSet"), _resource("Service")
    assert _env()["MQTT_CLIENT_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert _env()["MQTT_SHARE_GROUP"]
    assert int(_env()["MQTT_SESSION_EXPIRY_S"]) > 0  # 0 ends the session with the connection
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"


def test_probes_and_scrape_use_paths_the_gateway_serves() -> None:
    container, annotations = _container(), _pod()["metadata"]["annotations"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert all(map(_served, ("/healthz", "/readyz", "/metrics")))
    assert not _served("/no-such-path")


def test_probe_service_and_scrape_ports_are_the_gateway_http_port() -> None:
    container, annotations = _container(), _pod()["metadata"]["annotations"]
    (service_port,) = _resource("Service")["spec"]["ports"]
    ports = {
        "default HTTP_PORT": _default_settings().http.port,
        "container env HTTP_PORT": int(_env()["HTTP_PORT"]),
        "image env HTTP_PORT": int(_image_env()["HTTP_PORT"]),
        "liveness": _port_number(container["livenessProbe"]["httpGet"]["port"]),
        "readiness": _port_number(container["readinessProbe"]["httpGet"]["port"]),
        "scrape annotation": int(annotations["prometheus.io/port"]),
        "service targetPort": _port_number(service_port["targetPort"]),
    }
    assert set(ports.values()) == {8081}, ports
    assert service_port["name"] == "http"


def test_routes_configmap_is_mounted_as_the_directory_gateway_routes_points_into() -> None:
    routes = _env()["GATEWAY_ROUTES"]
    mounts = _container()["volumeMounts"]
    (mount,) = [m for m in mounts if m["mountPath"] == posixpath.dirname(routes)]
    assert "subPath" not in mount and "subPathExpr" not in mount  # a subPath mount never updates
    (volume,) = [v for v in _pod()["spec"]["volumes"] if v["name"] == mount["name"]]
    configmap = _resource("ConfigMap", K8S / "configmap-routes.yaml")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert "items" not in volume["configMap"]
    assert posixpath.basename(routes) in configmap["data"]
    assert _image_env()["GATEWAY_ROUTES"] == routes
    assert _env()["GATEWAY_RELOAD"] == "inotify"


def test_each_replica_spools_to_its_own_claim_larger_than_the_spool_cap() -> None:
    statefulset = _resource("StatefulSet")
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    (mount,) = [m for m in _container()["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert _env()["GATEWAY_SPOOL_DIR"] == mount["mountPath"] == _image_env()["GATEWAY_SPOOL_DIR"]
    assert not mount.get("readOnly") and "subPath" not in mount
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    size = claim["spec"]["resources"]["requests"]["storage"]
    units = {"Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    assert int(size[:-2]) * units[size[-2:]] > int(_env()["GATEWAY_SPOOL_MAX_BYTES"])
    # a claim outlives scale-down and deletion: what a spool holds waits for its replica
    assert set(statefulset["spec"]["persistentVolumeClaimRetentionPolicy"].values()) == {"Retain"}
    assert "Scale-down" in (K8S / "statefulset.yaml").read_text()


def test_grace_period_outlasts_the_shutdown_drain() -> None:
    grace = _pod()["spec"]["terminationGracePeriodSeconds"]
    drain = float(_env()["GATEWAY_SHUTDOWN_TIMEOUT_S"])
    assert grace >= drain + 5, "leave the gateway time to exit after its drain deadline"


def test_pod_meets_the_restricted_pod_security_standard() -> None:
    pod, container = _pod()["spec"], _container()["securityContext"]
    uid = int(_image_instruction("USER").split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == container["runAsUser"] == uid
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]
    assert container["readOnlyRootFilesystem"] is True
    assert pod["enableServiceLinks"] is False  # else a Service "mqtt" injects MQTT_PORT=tcp://...


def test_every_secret_path_names_a_key_of_a_mounted_secret() -> None:
    mounts = {m["mountPath"]: m["name"] for m in _container()["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod()["spec"]["volumes"]}
    examples = {d["metadata"]["name"]: d for d in _docs(K8S / "secret.example.yaml")}
    text = (K8S / "statefulset.yaml").read_text()  # commented-out TLS variables count too
    paths = set(re.findall(r"value: (/var/run/secrets/\S+)", text))
    assert len(paths) >= 5
    for path in paths:
        secret = volumes[mounts[posixpath.dirname(path)]]["secret"]
        assert posixpath.basename(path) in examples[secret["secretName"]]["stringData"], path


def test_manifest_environment_is_accepted_by_the_settings_loader(tmp_path: Path) -> None:
    env, secrets = {}, {}
    for document in _docs(K8S / "secret.example.yaml"):
        secrets.update(document["stringData"])
    for name, value in _env().items():
        if isinstance(value, dict):
            value = {"metadata.name": POD_NAME}[value["fieldRef"]["fieldPath"]]
        if name.endswith("_FILE"):  # the mounted secret, with the example's content
            local = tmp_path / posixpath.basename(value)
            local.write_text(secrets[local.name] + "\n")
            value = str(local)
        env[name] = value
    settings = load_settings(env)
    assert settings.mqtt.client_id == POD_NAME
    assert settings.mqtt.share_group == env["MQTT_SHARE_GROUP"]
    assert settings.mqtt.username == "gateway" and settings.mqtt.password == "change-me"
    assert settings.shutdown_timeout_s < _pod()["spec"]["terminationGracePeriodSeconds"]
    assert settings.reload.mode == "inotify"
    assert settings.routes_file == env["GATEWAY_ROUTES"]


def test_routes_configmap_passes_the_gateway_loader() -> None:
    table = _routes_table()
    assert table.routes


# --------------------------------------------------------------------------- IAM

def _statements(path: Path) -> list[dict[str, Any]]:
    policy = _json(path)
    assert policy["Version"] == "2012-10-17"
    return policy["Statement"]


def _streams_of(statement: dict[str, Any]) -> set[str]:
    arns = statement["Resource"]
    assert all(re.fullmatch(r"arn:aws[a-z-]*:kinesis:[a-z0-9-]+:\d{12}:stream/[\w.-]+", a)
               for a in arns), arns
    return {arn.rsplit("/", 1)[1] for arn in arns}


def test_iam_policy_grants_only_put_and_the_stream_check_on_exactly_the_routed_streams() -> None:
    table = _routes_table()
    routed = {r.stream.rsplit("/", 1)[-1] for r in table.routes}
    routed |= {r.dead_letter.target.rsplit("/", 1)[-1]
               for r in table.routes if r.dead_letter and r.dead_letter.kind == "kinesis"}
    statements = {s["Sid"]: s for s in _statements(IAM / "policy.json")}
    assert set(statements) == {"WriteRoutedStreams", "CheckRoutedStreams"}
    write, check = statements["WriteRoutedStreams"], statements["CheckRoutedStreams"]
    assert write["Effect"] == check["Effect"] == "Allow"
    assert sorted(write["Action"]) == ["kinesis:PutRecord", "kinesis:PutRecords"]
    # the sink checks every stream of the route table at start-up and after each reload (readiness)
    assert check["Action"] == ["kinesis:DescribeStreamSummary"]
    assert _streams_of(write) == _streams_of(check) == routed


def test_optional_iam_statements_stay_within_the_routed_streams() -> None:
    base = {s["Sid"]: s for s in _statements(IAM / "policy.json")}["WriteRoutedStreams"]
    optional = {s["Sid"]: s for s in _statements(IAM / "policy-optional.json")}
    for sid, statement in optional.items():
        assert "*" not in json.dumps(statement["Action"]) + json.dumps(statement["Resource"]), sid
    assert set(optional) == {"ShardMapForAggregatedStreams", "EncryptWithCustomerManagedKey"}
    assert optional["ShardMapForAggregatedStreams"]["Action"] == ["kinesis:ListShards"]
    assert _streams_of(optional["ShardMapForAggregatedStreams"]) <= _streams_of(base)


def test_trust_policies_admit_only_the_gateway() -> None:
    (irsa,) = _statements(IAM / "trust-policy-irsa.json")
    account = _resource("ServiceAccount")["metadata"]["name"]
    assert irsa["Action"] == "sts:AssumeRoleWithWebIdentity"
    conditions = irsa["Condition"]["StringEquals"]
    subjects = [v for k, v in conditions.items() if k.endswith(":sub")]
    assert [s.rsplit(":", 1)[1] for s in subjects] == [account]
    assert [v for k, v in conditions.items() if k.endswith(":aud")] == ["sts.amazonaws.com"]
    (assume,) = _statements(IAM / "trust-policy-assume-role.json")
    assert assume["Action"] == "sts:AssumeRole"
    pattern = assume["Condition"]["StringLike"]["sts:RoleSessionName"]
    assert fnmatch.fnmatchcase(_default_settings().aws.session_name, pattern)


# --------------------------------------------------------------------------- dashboard and alerts

def _dashboard_queries() -> list[str]:
    dashboard = _json(DASHBOARD)
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _assert_exported_and_rated_right(expr: str) -> None:
    """Every name is exported; counters and histogram samples appear only inside rate()."""
    for match in METRIC.finditer(expr):
        name = match.group()
        assert name in METRIC_NAMES, f"{name} is not exported by the gateway: {expr}"
        cumulative = name.endswith(("_total", "_bucket", "_sum", "_count"))
        rated = bool(RATE_FUNCTIONS.search(expr[: match.start()]))
        want = "needs" if cumulative else "must not be in"
        assert cumulative == rated, f"{name} {want} rate()/increase(): {expr}"


def test_dashboard_queries_only_metrics_the_gateway_exports() -> None:
    queries = _dashboard_queries()
    assert len(queries) >= 15
    for expr in queries:
        _assert_exported_and_rated_right(expr)
    variables = _json(DASHBOARD)["templating"]["list"]
    for name in METRIC.findall(json.dumps(variables)):
        assert name in METRIC_NAMES, name


SPOOL_METRICS = ("spool_records", "spool_bytes", "spool_capacity_bytes", "spool_oldest_record_age_seconds",
                 "spool_dropped_total", "spool_commits_total", "spool_commit_duration_seconds_bucket",
                 "spool_unavailable", "spool_damaged_total")


def test_dashboard_shows_every_spool_metric() -> None:
    shown = {m for expr in _dashboard_queries() for m in METRIC.findall(expr)}
    missing = {f"mqtt_kinesis_gateway_{m}" for m in SPOOL_METRICS} - shown
    assert not missing, f"no dashboard panel shows {sorted(missing)}"


def test_dashboard_takes_its_datasource_from_a_variable() -> None:
    dashboard = _json(DASHBOARD)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    expected = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == expected, panel["title"]
            assert all(t["datasource"] == expected for t in panel["targets"]), panel["title"]


def test_alert_rules_query_only_metrics_the_gateway_exports() -> None:
    for rule in _alert_rules():
        _assert_exported_and_rated_right(rule["expr"])


def test_alert_rules_are_complete_and_uniquely_named() -> None:
    rules = _alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    assert {f"MqttKinesisGateway{n}" for n in (
        "ReloadFailing", "BacklogNearCapacity", "DeadLettersRising", "BrokerDisconnected",
        "NoRecordsPutWhileMessagesArrive", "RecordsDropped", "SpoolFilling", "SpoolNotDraining",
        "SpoolUnavailable", "SpoolDropping")} <= set(names)
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0m")), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
