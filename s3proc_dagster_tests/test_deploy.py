"""deploy/: what can be checked without a cluster.

- The instance the Dagster Helm chart renders from `deploy/values.yaml` (run launcher, run
  coordinator, concurrency, run monitoring and retries, logs) is accepted by Dagster's own
  instance schema, its `K8sRunLauncher` part by dagster-k8s's config schema and its run
  coordinator by `QueuedRunCoordinator`'s, and matches what `instance_config` gives one
  machine. The rendering is ours (`chart_instance`, mirroring the chart's instance
  templates for the keys we set), so it refuses any key it does not know how the chart renders.
- The values use only keys the chart defines (`CHART_KEYS`, the part of the chart's
  values schema we use, transcribed); with DAGSTER_CHART_DIR set to an unpacked chart
  (`helm pull dagster/dagster --version 1.13.27 --untar`) they are also validated, merged
  over the chart's defaults, against the chart's own `values.schema.json`.
- `deploy/Dockerfile`'s install lines run in a clean venv standing in for the image, from
  this checkout; its CMD answers `--help` and the module it serves loads.
- `deploy/networkpolicy.yaml` selects the code location's pods and admits only the
  webserver, the daemon and run pods to the code server's port: checked against the
  labels the chart's templates give them (transcribed; read in the chart's templates when
  DAGSTER_CHART_DIR is set) and the labels dagster-k8s itself builds for a run pod.
  Whether a cluster enforces it (its network plugin) cannot be checked here.
- Every pod that runs our code gets every setting `settings.py` cannot do without, and the
  ones a cluster needs (MongoDB, the S3 incoming prefix); the values themselves pass the
  settings' validation.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster_k8s import K8sRunLauncher
from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job
from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict
from kubernetes import client as k8s
from pydantic import ValidationError

from s3proc_dagster.runs.instance import instance_config
from s3proc_dagster.settings import _GROUPS, load_configuration

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RELEASE = "s3proc"  # the README's `helm upgrade --install s3proc ... --namespace s3proc`
NAMESPACE = "s3proc"
CHART_DAGSTER_HOME = "/opt/dagster/dagster_home"  # the chart's global.dagsterHome default


def load_values() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "values.yaml").read_text())


def code_location(values: dict[str, Any]) -> dict[str, Any]:
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    return deployment


def secrets() -> dict[str, dict[str, str]]:
    """The example Secrets by name: their keys (and placeholder values)."""
    docs = [d for d in yaml.safe_load_all((DEPLOY / "secret.example.yaml").read_text()) if d]
    return {d["metadata"]["name"]: d["stringData"] for d in docs if d["kind"] == "Secret"}


# --- the instance the chart renders -----------------------------------------------------

#: runLauncher.config.k8sRunLauncher key -> K8sRunLauncher config key, as the chart's
#: `_run-launcher.tpl` renders them (only when set).
K8S_LAUNCHER_KEYS = {
    "kubeconfigFile": "kubeconfig_file",
    "envVars": "env_vars",
    "volumeMounts": "volume_mounts",
    "volumes": "volumes",
    "labels": "labels",
    "resources": "resources",
    "schedulerName": "scheduler_name",
    "securityContext": "security_context",
}
RUN_K8S_CONFIG_KEYS = {
    "containerConfig": "container_config",
    "podSpecConfig": "pod_spec_config",
    "podTemplateSpecMetadata": "pod_template_spec_metadata",
    "jobSpecConfig": "job_spec_config",
    "jobMetadata": "job_metadata",
}


def render_k8s_run_launcher(values: dict[str, Any]) -> dict[str, Any]:
    chart = values["runLauncher"]["config"]["k8sRunLauncher"]
    handled = {"loadInclusterConfig", "jobNamespace", "imagePullPolicy", "image", "envConfigMaps", "envSecrets"}
    handled |= {"failPodOnRunFailure", "runK8sConfig"} | set(K8S_LAUNCHER_KEYS)
    unknown = set(chart) - handled
    assert not unknown, f"runLauncher.config.k8sRunLauncher keys the chart does not render: {unknown}"
    config: dict[str, Any] = {
        "load_incluster_config": chart["loadInclusterConfig"],
        "job_namespace": chart.get("jobNamespace") or NAMESPACE,
        "image_pull_policy": chart["imagePullPolicy"],
        "service_account_name": f"{RELEASE}-dagster",
        "dagster_home": values.get("global", {}).get("dagsterHome", CHART_DAGSTER_HOME),
        "instance_config_map": f"{RELEASE}-dagster-instance",
        "postgres_password_secret": values["global"]["postgresqlSecretName"],
    }
    if "image" in chart:
        config["job_image"] = f"{chart['image']['repository']}:{chart['image']['tag']}"
    for key, name in (("envConfigMaps", "env_config_maps"), ("envSecrets", "env_secrets")):
        if chart.get(key):
            config[name] = [ref["name"] for ref in chart[key] if "name" in ref]
    for key, name in K8S_LAUNCHER_KEYS.items():
        if chart.get(key):
            config[name] = chart[key]
    if chart.get("failPodOnRunFailure"):
        config["fail_pod_on_run_failure"] = True
    if chart.get("runK8sConfig"):
        unknown = set(chart["runK8sConfig"]) - set(RUN_K8S_CONFIG_KEYS)
        assert not unknown, f"runK8sConfig keys the chart does not render: {unknown}"
        config["run_k8s_config"] = {
            name: chart["runK8sConfig"][key]
            for key, name in RUN_K8S_CONFIG_KEYS.items()
            if chart["runK8sConfig"].get(key)
        }
    return config


def render_run_coordinator(values: dict[str, Any]) -> dict[str, Any]:
    """`_run-coordinator.tpl` (1.13): with `concurrency.enabled`, the run limits are left out
    unless set here too, which `render_concurrency` refuses, as the chart does."""
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["enabled"] and coordinator["type"] == "QueuedRunCoordinator"
    queued = coordinator["config"]["queuedRunCoordinator"]
    concurrency_enabled = values.get("concurrency", {}).get("enabled", False)
    config: dict[str, Any] = {}
    if any(v not in (None, "", [], {}, False, 0) for v in queued.values()):
        if not concurrency_enabled or queued.get("maxConcurrentRuns") is not None:
            config["max_concurrent_runs"] = (
                -1 if queued.get("maxConcurrentRuns") is None else queued["maxConcurrentRuns"]
            )
        if queued.get("tagConcurrencyLimits"):
            config["tag_concurrency_limits"] = queued["tagConcurrencyLimits"]
        for key, name in (
            ("dequeueIntervalSeconds", "dequeue_interval_seconds"),
            ("dequeueUseThreads", "dequeue_use_threads"),
            ("dequeueNumWorkers", "dequeue_num_workers"),
        ):
            if queued.get(key):
                config[name] = queued[key]
        if queued.get("blockOpConcurrencyLimitedRuns"):
            block = queued["blockOpConcurrencyLimitedRuns"]
            config["block_op_concurrency_limited_runs"] = {
                "enabled": block["enabled"],
                "op_concurrency_slot_buffer": block["opConcurrencySlotBuffer"],
            }
    return {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator", "config": config}


def render_concurrency(values: dict[str, Any]) -> dict[str, Any] | None:
    """`_concurrency.tpl`, with the chart's own refusals of a limit set in both places."""
    concurrency = values.get("concurrency", {})
    if not concurrency.get("enabled"):
        return None
    pools, runs = concurrency.get("pools", {}), concurrency.get("runs", {})
    queued = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert runs.get("maxConcurrentRuns") is None or queued.get("maxConcurrentRuns") is None, (
        "Cannot set both concurrency.runs.maxConcurrentRuns and queuedRunCoordinator.maxConcurrentRuns"
    )
    assert not (runs.get("tagConcurrencyLimits") and queued.get("tagConcurrencyLimits")), (
        "Cannot set both concurrency.runs.tagConcurrencyLimits and queuedRunCoordinator.tagConcurrencyLimits"
    )
    rendered: dict[str, Any] = {}
    pool_keys = {"defaultLimit": "default_limit", "granularity": "granularity"}
    pool_keys["opGranularityRunBuffer"] = "op_granularity_run_buffer"
    if any(pools.get(key) is not None for key in pool_keys):
        rendered["pools"] = {name: pools[key] for key, name in pool_keys.items() if pools.get(key) is not None}
    if runs.get("maxConcurrentRuns") is not None or runs.get("tagConcurrencyLimits"):
        rendered["runs"] = {}
        if runs.get("maxConcurrentRuns") is not None:
            rendered["runs"]["max_concurrent_runs"] = runs["maxConcurrentRuns"]
        if runs.get("tagConcurrencyLimits"):
            rendered["runs"]["tag_concurrency_limits"] = runs["tagConcurrencyLimits"]
    return rendered


def chart_instance(values: dict[str, Any]) -> dict[str, Any]:
    """The parts of the dagster.yaml the chart writes that these values decide (the
    chart's storage block is PostgreSQL whatever we say, and not ours to check)."""
    daemon = values["dagsterDaemon"]
    instance: dict[str, Any] = {
        "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": render_k8s_run_launcher(values)},
        "run_coordinator": render_run_coordinator(values),
    }
    monitoring = daemon.get("runMonitoring", {})
    if monitoring.get("enabled"):
        instance["run_monitoring"] = {
            "enabled": True,
            "start_timeout_seconds": monitoring["startTimeoutSeconds"],
            "poll_interval_seconds": monitoring["pollIntervalSeconds"],
            "free_slots_after_run_end_seconds": monitoring["freeSlotsAfterRunEndSeconds"],
        }
    if daemon.get("runRetries", {}).get("enabled"):
        instance["run_retries"] = {"enabled": True, "max_retries": daemon["runRetries"].get("maxRetries")}
    logs = values.get("pythonLogs", {})
    if logs:
        instance["python_logs"] = {"python_log_level": logs["pythonLogLevel"]}
        instance["python_logs"]["managed_python_loggers"] = logs["managedPythonLoggers"]
    instance["telemetry"] = {"enabled": values["telemetry"]["enabled"]}
    concurrency = render_concurrency(values)
    if concurrency is not None:
        instance["concurrency"] = concurrency
    extra = values.get("additionalInstanceConfig") or {}
    duplicated = set(extra) & set(instance)
    assert not duplicated, f"additionalInstanceConfig repeats keys the chart writes (a YAML duplicate): {duplicated}"
    return instance | extra


def test_the_chart_instance_passes_dagsters_own_instance_validation(tmp_path: Path) -> None:
    """Dagster's loader validates the whole dagster.yaml, including its refusal of run limits
    both under `concurrency` and in the run coordinator (dagster-io/dagster#31086)."""
    instance = chart_instance(load_values())
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(instance))
    loaded, _custom_class = dagster_instance_config(str(tmp_path))
    assert loaded["run_launcher"]["class"] == "K8sRunLauncher"
    assert "max_concurrent_runs" not in loaded["run_coordinator"]["config"]
    assert loaded["run_retries"]["retry_on_asset_or_op_failure"] is False


def test_k8s_run_launcher_config_validates_against_dagster_k8s_schema() -> None:
    config = chart_instance(load_values())["run_launcher"]["config"]
    result = process_config(K8sRunLauncher.config_type(), config)
    assert result.success, [e.message for e in result.errors or []]
    assert result.value["load_incluster_config"] is True
    assert result.value["job_namespace"] == NAMESPACE
    # the Kubernetes objects inside it parse as the API's models (a typo is refused)
    container = k8s_snake_case_dict(k8s.V1Container, {"name": "run", **config["run_k8s_config"]["container_config"]})
    assert k8s_model_from_dict(k8s.V1Container, container).resources.requests["memory"]


def test_k8s_run_launcher_validation_refuses_an_unknown_key() -> None:
    """The check above can fail: dagster-k8s's schema is strict."""
    config = chart_instance(load_values())["run_launcher"]["config"] | {"job_namepsace": "typo"}
    assert not process_config(K8sRunLauncher.config_type(), config).success


def test_run_coordinator_config_validates_against_queued_run_coordinator_schema() -> None:
    config = chart_instance(load_values())["run_coordinator"]["config"]
    result = process_config(QueuedRunCoordinator.config_type(), config)
    assert result.success, [e.message for e in result.errors or []]
    assert result.value["dequeue_use_threads"] is True


def test_run_queue_pools_and_retries_are_the_ones_instance_config_gives_one_machine(tmp_path: Path) -> None:
    values = load_values()
    max_concurrency = int(code_location(values)["env"]["MAX_CONCURRENCY"])
    expected = instance_config(max_concurrency, tmp_path)
    rendered = chart_instance(values)
    assert rendered["concurrency"] == expected["concurrency"]
    assert rendered["concurrency"]["runs"]["max_concurrent_runs"] == max_concurrency
    expected_dequeue = {k: v for k, v in expected["run_coordinator"]["config"].items() if k.startswith("dequeue_")}
    assert rendered["run_coordinator"]["config"] == expected_dequeue
    assert rendered["run_retries"] == expected["run_retries"]
    assert rendered["sensors"] == expected["sensors"]  # the watch sensors' ticks wait in threads
    assert rendered["python_logs"]["managed_python_loggers"] == expected["python_logs"]["managed_python_loggers"]
    assert rendered["run_monitoring"]["free_slots_after_run_end_seconds"] == 30


def test_the_upload_pool_is_limited_by_the_default_pool_limit() -> None:
    """`s3_uploads` has no limit of its own in dagster.yaml: it takes `pools.default_limit`."""
    from s3proc_dagster.defs.files.ops import UPLOAD_POOL

    assert UPLOAD_POOL == "s3_uploads"
    assert chart_instance(load_values())["concurrency"]["pools"]["default_limit"] >= 2


# --- the chart's keys ------------------------------------------------------------------


def _obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_STR, _INT, _BOOL, _OBJ = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"type": "object"}
_NULL_INT = {"type": ["integer", "null"]}
_ARRAY_OBJ = {"type": "array", "items": _OBJ}
_REFS = {"type": "array", "items": _obj({"name": _STR, "optional": _BOOL}, ("name",))}
_IMAGE = _obj(
    {
        "repository": _STR,
        "tag": {"type": ["string", "integer", "null"]},
        "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    },
    ("repository", "pullPolicy"),
)
_TAG_LIMIT = _obj({"key": _STR, "value": {"type": ["string", "object", "null"]}, "limit": _INT}, ("key", "limit"))
_K8S = dict.fromkeys(
    ("nodeSelector", "affinity", "podSecurityContext", "securityContext", "resources", "annotations", "labels"), _OBJ
)
_K8S |= dict.fromkeys(("livenessProbe", "readinessProbe", "startupProbe"), _OBJ)
_K8S |= {"tolerations": _ARRAY_OBJ, "volumeMounts": _ARRAY_OBJ, "volumes": _ARRAY_OBJ, "schedulerName": _STR}

#: The part of the chart's values schema (dagster/dagster 1.13, helm/dagster/values.schema.json
#: and its `concurrency` section) that these values use, transcribed; strict where the chart
#: would silently ignore a misspelt key.
CHART_KEYS = _obj(
    {
        "global": _obj({"postgresqlSecretName": _STR, "dagsterHome": _STR, "serviceAccountName": _STR}),
        "generatePostgresqlPasswordSecret": _BOOL,
        "postgresql": _obj(
            {
                "enabled": _BOOL,
                "postgresqlHost": _STR,
                "postgresqlUsername": _STR,
                "postgresqlPassword": _STR,
                "postgresqlDatabase": _STR,
                "postgresqlParams": _OBJ,
                "postgresqlScheme": _STR,
                "service": _obj({"port": _INT}, ("port",)),
            }
        ),
        "dagster-user-deployments": _obj(
            {
                "enabled": _BOOL,
                "enableSubchart": _BOOL,
                "imagePullSecrets": _REFS,
                "deployments": {
                    "type": "array",
                    "items": _obj(
                        {
                            "name": _STR,
                            "image": _IMAGE,
                            "dagsterApiGrpcArgs": {"type": "array", "items": _STR},
                            "codeServerArgs": {"type": "array", "items": _STR},
                            "includeConfigInLaunchedRuns": _obj({"enabled": _BOOL}, ("enabled",)),
                            "deploymentNamespace": _STR,
                            "port": _INT,
                            "env": {"anyOf": [{"type": "object", "additionalProperties": _STR}, _ARRAY_OBJ]},
                            "envConfigMaps": _REFS,
                            "envSecrets": _REFS,
                            "initContainers": _ARRAY_OBJ,
                            "sidecarContainers": _ARRAY_OBJ,
                            **_K8S,
                        },
                        ("name", "image", "port"),
                    ),
                },
            }
        ),
        "runLauncher": _obj(
            {
                "type": {"const": "K8sRunLauncher"},
                "config": _obj(
                    {
                        "k8sRunLauncher": _obj(
                            {
                                "image": _IMAGE,
                                "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                                "jobNamespace": {"type": ["string", "null"]},
                                "loadInclusterConfig": _BOOL,
                                "kubeconfigFile": {"type": ["string", "null"]},
                                "envConfigMaps": _REFS,
                                "envSecrets": _REFS,
                                "envVars": {"type": "array", "items": _STR},
                                "volumeMounts": _ARRAY_OBJ,
                                "volumes": _ARRAY_OBJ,
                                "labels": _OBJ,
                                "failPodOnRunFailure": {"type": ["boolean", "null"]},
                                "resources": _OBJ,
                                "schedulerName": {"type": ["string", "null"]},
                                "securityContext": _OBJ,
                                "runK8sConfig": _obj(dict.fromkeys(RUN_K8S_CONFIG_KEYS, _OBJ)),
                            },
                            ("imagePullPolicy", "loadInclusterConfig", "envConfigMaps", "envSecrets", "envVars"),
                        )
                    },
                    ("k8sRunLauncher",),
                ),
            },
            ("type", "config"),
        ),
        "concurrency": _obj(
            {
                "enabled": _BOOL,
                "pools": _obj(
                    {
                        "defaultLimit": _NULL_INT,
                        "granularity": {"enum": ["run", "op", None]},
                        "opGranularityRunBuffer": _NULL_INT,
                    }
                ),
                "runs": _obj(
                    {"maxConcurrentRuns": _NULL_INT, "tagConcurrencyLimits": {"type": "array", "items": _TAG_LIMIT}}
                ),
            }
        ),
        "dagsterDaemon": _obj(
            {
                "enabled": _BOOL,
                "runCoordinator": _obj(
                    {
                        "enabled": _BOOL,
                        "type": {"const": "QueuedRunCoordinator"},
                        "config": _obj(
                            {
                                "queuedRunCoordinator": _obj(
                                    {
                                        "maxConcurrentRuns": _NULL_INT,
                                        "tagConcurrencyLimits": {"type": ["array", "null"], "items": _TAG_LIMIT},
                                        "dequeueIntervalSeconds": _NULL_INT,
                                        "dequeueNumWorkers": _NULL_INT,
                                        "dequeueUseThreads": {"type": ["boolean", "null"]},
                                        "blockOpConcurrencyLimitedRuns": {"type": ["object", "null"]},
                                    }
                                )
                            }
                        ),
                    },
                    ("enabled", "type", "config"),
                ),
                "runMonitoring": _obj(
                    {
                        "enabled": _BOOL,
                        "startTimeoutSeconds": _INT,
                        "cancelTimeoutSeconds": _INT,
                        "maxResumeRunAttempts": _INT,
                        "pollIntervalSeconds": _INT,
                        "freeSlotsAfterRunEndSeconds": _INT,
                    }
                ),
                "runRetries": _obj({"enabled": _BOOL, "maxRetries": _INT}),
            }
        ),
        "pythonLogs": _obj(
            {
                "pythonLogLevel": {
                    "enum": ["CRITICAL", "FATAL", "ERROR", "WARN", "WARNING", "INFO", "DEBUG", "NOTSET"]
                },
                "managedPythonLoggers": {"type": "array", "items": _STR},
                "dagsterHandlerConfig": _OBJ,
            }
        ),
        "telemetry": _obj({"enabled": _BOOL}, ("enabled",)),
        "additionalInstanceConfig": _OBJ,
    }
)


def test_the_values_use_only_keys_the_chart_defines() -> None:
    jsonschema.validate(load_values(), CHART_KEYS)


def test_a_misspelt_chart_key_is_caught() -> None:
    values = load_values()
    values["concurrency"]["runs"]["maxConcurentRuns"] = values["concurrency"]["runs"].pop("maxConcurrentRuns")
    with pytest.raises(jsonschema.ValidationError, match="maxConcurentRuns"):
        jsonschema.validate(values, CHART_KEYS)


def _merge(defaults: Any, override: Any) -> Any:
    """Helm's coalescing: maps merge, a null deletes the default, anything else replaces."""
    if not (isinstance(defaults, dict) and isinstance(override, dict)):
        return override
    merged = dict(defaults)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = _merge(defaults.get(key), value)
    return merged


@pytest.mark.skipif(
    not os.environ.get("DAGSTER_CHART_DIR"),
    reason="set DAGSTER_CHART_DIR to `helm pull dagster/dagster --version 1.13.27 --untar`'s folder",
)
def test_the_values_validate_against_the_charts_own_schema() -> None:
    from referencing import Registry
    from referencing.jsonschema import DRAFT7

    chart = Path(os.environ["DAGSTER_CHART_DIR"])
    merged = _merge(yaml.safe_load((chart / "values.yaml").read_text()), load_values())
    schema = json.loads((chart / "values.schema.json").read_text())

    class Anything(dict):
        """Any path into it is an empty schema, which anything satisfies."""

        def __missing__(self, _key: str) -> Anything:
            return Anything()

    # the schema's Kubernetes objects $ref kubernetesjsonschema.dev, out of reach: anything goes
    registry = Registry(retrieve=lambda _uri: DRAFT7.create_resource(Anything()))
    jsonschema.Draft7Validator(schema, registry=registry).validate(merged)


# --- the pods' environment ---------------------------------------------------------------


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, arguments = whole.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def _env_pairs(arguments: str) -> list[tuple[str, str]]:
    return [tuple(word.split("=", 1)) for word in shlex.split(arguments)]  # type: ignore[misc]


def image_env() -> dict[str, str]:
    """The ENV the image gives every container (names and unexpanded values)."""
    instructions = parse_dockerfile((DEPLOY / "Dockerfile").read_text())
    return {k: v for keyword, args in instructions if keyword == "ENV" for k, v in _env_pairs(args)}


def _secret_keys(refs: list[dict[str, str]]) -> dict[str, str]:
    examples = secrets()
    missing = [ref["name"] for ref in refs if ref["name"] not in examples]
    assert not missing, f"envSecrets name Secrets deploy/secret.example.yaml does not show: {missing}"
    return {key: value for ref in refs for key, value in examples[ref["name"]].items()}


def pod_envs(values: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The environment of each kind of pod that runs our code, by where it comes from:
    the image's ENV, the deployment's `env` and the Secrets' keys; run pods get the code
    location's through includeConfigInLaunchedRuns, plus the run launcher's own."""
    location = code_location(values)
    assert not location.get("envConfigMaps"), "a ConfigMap's keys cannot be checked here: use `env`"
    env = location.get("env", {})
    assert isinstance(env, dict), "`env` as a map, so its settings can be checked"
    code_server = image_env() | env | _secret_keys(location.get("envSecrets", []))
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert not launcher.get("envConfigMaps"), "a ConfigMap's keys cannot be checked here"
    run = dict(image_env())
    if location.get("includeConfigInLaunchedRuns", {}).get("enabled", True):
        run |= env | _secret_keys(location.get("envSecrets", []))
    run |= _secret_keys(launcher.get("envSecrets", []))
    run |= {item.split("=", 1)[0]: item.partition("=")[2] for item in launcher.get("envVars", [])}
    return {"code server": code_server, "run pod": run}


def required_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Every setting the model cannot do without: no default, or a default that fails its
    own validation (an empty secret, a watch directory that is not there), found by
    loading each group with nothing set, in an empty directory."""
    variables = {f"{prefix}{name}".upper() for cls, prefix in _GROUPS.values() for name in cls.model_fields}
    for variable in variables | {"NODE_ENV"}:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)
    required: set[str] = set()
    for cls, prefix in _GROUPS.values():
        required |= {f"{prefix}{n}".upper() for n, f in cls.model_fields.items() if f.is_required()}
        try:
            cls(_env_file=None)  # type: ignore[call-arg]
        except ValidationError as exc:
            required |= {f"{prefix}{e['loc'][0]}".upper() for e in exc.errors()}
    return required


#: What a cluster needs beyond what the settings model requires: one progress store that
#: every pod shares (SQLite would be one file per pod), a watched source every pod sees, and
#: step outputs every pod reads (DEPLOYMENT=shared: in S3, not in one pod's DAGSTER_HOME).
CLUSTER_SETTINGS = {"MONGODB_URI", "S3_INCOMING_PREFIX", "S3_BUCKET", "DEPLOYMENT"}


def test_required_settings_are_found_from_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A required setting added to settings.py shows up here, and so in the test below."""
    assert {"S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY", "WATCH_PATH"} <= required_settings(tmp_path, monkeypatch)


def test_every_pod_gets_every_required_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    required = required_settings(tmp_path, monkeypatch) | CLUSTER_SETTINGS
    for pod, env in pod_envs(load_values()).items():
        missing = sorted(required - {k for k, v in env.items() if v})
        assert not missing, f"the {pod} lacks {missing}"


def test_the_pods_settings_pass_the_settings_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The values' values, as the pod would load them: /data paths under tmp_path."""
    for cls, prefix in _GROUPS.values():
        for name in cls.model_fields:
            monkeypatch.delenv(f"{prefix}{name}".upper(), raising=False)
    env = pod_envs(load_values())["run pod"]
    settings = {k: v.replace("/data/", f"{tmp_path}/data/") for k, v in env.items() if not k.startswith("DAGSTER_")}
    (tmp_path / "data" / "incoming").mkdir(parents=True)
    config = load_configuration(env_file=None, overrides=settings)
    assert config.processing.uses_mongodb and config.processing.shared
    assert config.s3.incoming_prefix == "incoming"
    assert config.processing.max_concurrency == load_values()["concurrency"]["runs"]["maxConcurrentRuns"]
    assert config.logging.pretty is False


def test_the_example_secrets_hold_placeholders_only() -> None:
    for name, data in secrets().items():
        for key, value in data.items():
            assert re.fullmatch(r"<[^>]*>", value), f"{name}.{key} looks like a real value: {value!r}"


# --- who may reach the code server ----------------------------------------------------------

#: The chart's pod template labels, transcribed from dagster/dagster 1.13: every pod gets
#: `dagster.selectorLabels` (`app.kubernetes.io/name`: the (sub)chart's name,
#: `app.kubernetes.io/instance`: the release) and a `component`; the user deployment also
#: its `deployment` name (templates/deployment-daemon.yaml,
#: templates/helpers/_deployment-webserver.tpl,
#: charts/dagster-user-deployments/templates/deployment-user.yaml).
#: `test_the_chart_templates_label_the_pods_so` checks them against an unpacked chart.
CHART_NAME, USER_DEPLOYMENTS_CHART_NAME = "dagster", "dagster-user-deployments"


def load_network_policy() -> dict[str, Any]:
    (policy,) = [d for d in yaml.safe_load_all((DEPLOY / "networkpolicy.yaml").read_text()) if d]
    return policy


def run_pod_labels(location_name: str) -> dict[str, str]:
    """A run pod's labels, built by dagster-k8s's own job constructor with the labels its
    K8sRunLauncher adds (`_launch_k8s_job_with_args`: the job, the run id and the code
    location, which the chart's workspace names after the deployment)."""
    config = DagsterK8sJobConfig(
        job_image="registry.example.com/s3proc-dagster:0.1.0",
        dagster_home=CHART_DAGSTER_HOME,
        image_pull_policy="IfNotPresent",
        service_account_name=f"{RELEASE}-dagster",
        instance_config_map=f"{RELEASE}-dagster-instance",
    )
    job = construct_dagster_k8s_job(
        config,
        args=["dagster", "api", "execute_run", "{}"],
        job_name="dagster-run-0",
        pod_name="dagster-run-0",
        component="run_worker",
        user_defined_k8s_config=UserDefinedDagsterK8sConfig(),
        labels={"dagster/job": "process_file_job", "dagster/run-id": "0", "dagster/code-location": location_name},
    )
    return job.spec.template.metadata.labels


def pod_labels(values: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The labels of each kind of pod in the release's namespace, with some that have no
    business on port 4000: another release's webserver, another location's run pod, a stranger."""
    location = code_location(values)
    chart = {"app.kubernetes.io/name": CHART_NAME, "app.kubernetes.io/instance": RELEASE}
    user_deployment = {"app.kubernetes.io/name": USER_DEPLOYMENTS_CHART_NAME, "app.kubernetes.io/instance": RELEASE}
    return {
        "code server": {**user_deployment, "component": "user-deployments", "deployment": location["name"]}
        | location.get("labels", {}),
        "webserver": {**chart, "component": "dagster-webserver"},
        "daemon": {**chart, "component": "dagster-daemon", "deployment": "daemon"},
        "run pod": run_pod_labels(location["name"]),
        "another release's webserver": {
            **chart,
            "app.kubernetes.io/instance": "other",
            "component": "dagster-webserver",
        },
        "another location's run pod": run_pod_labels("other-location"),
        "a stranger": {"app": "debug-shell"},
    }


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes' label selector: every matchLabels pair and matchExpressions requirement
    holds (so an empty selector selects every pod)."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for requirement in selector.get("matchExpressions", []):
        key, operator, allowed = requirement["key"], requirement["operator"], requirement.get("values", [])
        holds = {
            "In": labels.get(key) in allowed,
            "NotIn": key not in labels or labels[key] not in allowed,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not holds:
            return False
    return True


def _port_matches(rule_port: dict[str, Any], port: int) -> bool:
    if rule_port.get("protocol", "TCP") != "TCP":
        return False
    number = rule_port.get("port")
    if number is None or isinstance(number, str):  # every port; a named port: assume the worst
        return True
    return number <= port <= rule_port.get("endPort", number)


def admits(policy: dict[str, Any], source: dict[str, str], port: int) -> bool:
    """May a pod of the policy's namespace labelled `source` open `port` on the pods it
    selects? NetworkPolicy's rules: any rule admits; a rule without `ports` admits every
    port, without `from` every source; a peer with a namespaceSelector or an ipBlock
    reaches beyond this namespace's pods and counts here as admitting anyone."""
    spec = policy["spec"]
    if "Ingress" not in spec.get("policyTypes", ["Ingress"]):
        return True
    for rule in spec.get("ingress") or []:
        if rule.get("ports") and not any(_port_matches(p, port) for p in rule["ports"]):
            continue
        peers = rule.get("from")
        if not peers or any(set(p) != {"podSelector"} for p in peers):
            return True
        if any(selects(p["podSelector"], source) for p in peers):
            return True
    return False


def test_the_network_policy_is_a_kubernetes_network_policy() -> None:
    policy = load_network_policy()
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    # as the API's model: a misspelt key is refused (k8s_snake_case_dict raises on it)
    model = k8s_model_from_dict(k8s.V1NetworkPolicy, k8s_snake_case_dict(k8s.V1NetworkPolicy, policy))
    assert model.spec.policy_types == ["Ingress"]


def test_the_network_policy_selects_the_code_location_pods_and_no_other() -> None:
    selector = load_network_policy()["spec"]["podSelector"]
    selected = {name for name, labels in pod_labels(load_values()).items() if selects(selector, labels)}
    assert selected == {"code server"}


def test_only_the_webserver_daemon_and_run_pods_reach_the_code_servers_port() -> None:
    values = load_values()
    port = code_location(values)["port"]
    cmd = json.loads(dict(parse_dockerfile((DEPLOY / "Dockerfile").read_text()))["CMD"])
    assert cmd[cmd.index("-p") + 1] == str(port), "the image's own CMD serves the same port"
    policy, pods = load_network_policy(), pod_labels(values)
    assert {name for name, labels in pods.items() if admits(policy, labels, port)} == {
        "webserver",
        "daemon",
        "run pod",
    }
    assert not any(admits(policy, pods[name], port + 1) for name in ("webserver", "daemon", "run pod"))


def test_the_admission_check_sees_an_open_rule() -> None:
    """The check above can fail: a rule that admits everyone is seen as doing so."""
    stranger = pod_labels(load_values())["a stranger"]
    port = code_location(load_values())["port"]
    policy = load_network_policy()
    assert not admits(policy, stranger, port)
    for open_rule in ({}, {"from": [{"podSelector": {}}]}, {"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}):
        widened = copy.deepcopy(policy)
        widened["spec"]["ingress"].append(open_rule)
        assert admits(widened, stranger, port), open_rule


def test_run_pods_are_labelled_by_the_launcher_as_the_policy_expects() -> None:
    """`run_pod_labels` transcribes what K8sRunLauncher adds; this dagster-k8s still adds it."""
    source = inspect.getsource(K8sRunLauncher._launch_k8s_job_with_args)
    assert 'labels["dagster/code-location"]' in source and 'component="run_worker"' in source
    labels = run_pod_labels(code_location(load_values())["name"])
    assert labels["app.kubernetes.io/component"] == "run_worker"
    assert labels["dagster/code-location"] == "s3proc-dagster"


@pytest.mark.skipif(
    not os.environ.get("DAGSTER_CHART_DIR"),
    reason="set DAGSTER_CHART_DIR to `helm pull dagster/dagster --version 1.13.27 --untar`'s folder",
)
def test_the_chart_templates_label_the_pods_so() -> None:
    """Without `helm template`, the label lines the transcription relies on, read in the
    chart's own templates: the chart names, the selector labels and each pod's component."""
    chart = Path(os.environ["DAGSTER_CHART_DIR"])
    sub = chart / "charts" / USER_DEPLOYMENTS_CHART_NAME
    assert yaml.safe_load((chart / "Chart.yaml").read_text())["name"] == CHART_NAME
    assert yaml.safe_load((sub / "Chart.yaml").read_text())["name"] == USER_DEPLOYMENTS_CHART_NAME
    for root in (chart, sub):
        helpers = "".join(p.read_text() for p in (root / "templates").rglob("_helpers.tpl"))
        assert 'app.kubernetes.io/name: {{ include "dagster.name" . }}' in helpers
        assert "app.kubernetes.io/instance: {{ .Release.Name }}" in helpers
        assert "default .Chart.Name .Values.nameOverride" in helpers
    values = load_values()
    assert "nameOverride" not in values and "nameOverride" not in values["dagster-user-deployments"]

    def pod_template(path: Path) -> str:
        return path.read_text().split("  template:", 1)[1]

    daemon = pod_template(chart / "templates" / "deployment-daemon.yaml")
    assert "component: dagster-daemon" in daemon
    webserver = pod_template(chart / "templates" / "helpers" / "_deployment-webserver.tpl")
    assert 'component: {{ include "dagster.webserver.componentName" . }}' in webserver
    helpers = (chart / "templates" / "helpers" / "_helpers.tpl").read_text()
    assert "dagster-webserver {{- if .webserverReadOnly -}} -read-only" in helpers
    user = pod_template(sub / "templates" / "deployment-user.yaml")
    assert "component: user-deployments" in user and "deployment: {{ $deployment.name }}" in user
    workspace = (chart / "templates" / "configmap-workspace.yaml").read_text()
    assert "location_name: {{ $deployment.name }}" in workspace


# --- the image -----------------------------------------------------------------------------

#: Image paths the sandbox maps into a temporary directory.
IMAGE_ROOTS = ("/opt/", "/data")


def build_in_sandbox(tmp_path: Path) -> tuple[dict[str, str], Path, list[str]]:
    """Run the Dockerfile's install lines in `tmp_path/image`, which stands for the image's `/`.

    WORKDIR, COPY and ENV paths under /opt and /data are mapped there, ARG defaults are in
    the environment, and `python` is a plain interpreter like the base image's. RUN lines
    that set up the system (a user, directories owned by it) need root on a real image and
    are not run. Returns the image's environment, its WORKDIR and its CMD.
    """
    root = tmp_path / "image"
    base_bin = tmp_path / "base-bin"
    base_bin.mkdir()
    (base_bin / "python").symlink_to(getattr(sys, "_base_executable", sys.executable))

    def mapped(value: str) -> str:
        return ":".join(str(root / p.lstrip("/")) if p.startswith(IMAGE_ROOTS) else p for p in value.split(":"))

    env = {"PATH": f"{base_bin}:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path))}
    env |= {
        k: v
        for k, v in os.environ.items()
        if k.startswith(("PIP_", "UV_", "SSL_", "REQUESTS_", "S3PROC_TEST_")) or "proxy" in k.lower()
    }
    workdir, installs, cmd = root, 0, []
    for keyword, args in parse_dockerfile((DEPLOY / "Dockerfile").read_text()):
        if keyword == "FROM":
            assert args == "python:3.11-slim"
            assert sys.version_info[:2] == (3, 11), "the sandbox's python stands for the image's 3.11"
        elif keyword == "ARG":
            name, _, default = args.partition("=")
            env[name] = default
        elif keyword == "ENV":
            for name, value in _env_pairs(args):
                env[name] = mapped(re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value))
        elif keyword == "WORKDIR":
            workdir = Path(mapped(args))
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, destination = shlex.split(args)
            target = Path(mapped(destination)) if destination.startswith("/") else workdir / destination
            for source in sources:
                if (ROOT / source).is_dir():
                    shutil.copytree(
                        ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True
                    )
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy(ROOT / source, target)
        elif keyword == "RUN":
            command = re.sub(r"^(--\S+\s+)+", "", args)  # BuildKit's --mount: the sandbox uses the user's cache
            if re.search(r"\bpip install\b|-m venv\b", command):
                installs += 1
                done = subprocess.run(
                    ["/bin/sh", "-c", command], cwd=workdir, env=env, capture_output=True, text=True, timeout=900
                )
                assert done.returncode == 0, f"RUN {command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            else:
                assert set(re.findall(r"(?:^|&&)\s*(\w+)", command)) <= {"useradd", "mkdir", "chown"}, command
        elif keyword == "CMD":
            cmd = json.loads(args)
    assert installs == 2 and cmd
    return env, workdir, cmd


# No fixture of ours, but a server all the same: its install lines ask the package index
# (PyPI, by pip and uv) for ~100 wheels, which is also why it is not in the fast loop.
@pytest.mark.servers
def test_the_dockerfile_installs_and_serves_the_code_location(tmp_path: Path) -> None:
    """The image's install lines, run in a clean venv from this checkout; then its CMD.

    The slowest test of the file: a venv, ~100 wheels from uv's cache, their bytecode
    compiled, three Dagster processes. Measured: 340 s on this shared 2-core machine at a
    load average of 16; apart, at a lighter load, the venv took 3 s, installing uv 10 s and
    the project 17 s.
    """
    env, workdir, cmd = build_in_sandbox(tmp_path)

    python = Path(env["VIRTUAL_ENV"]) / "bin" / "python"
    assert python.parent == Path(shutil.which("python", path=env["PATH"]) or "").parent
    probe = "import dagster, dagster_k8s, dagster_postgres, s3proc_dagster.settings as s; print(dagster.__version__, s.DEFAULT_RULES_DIR.is_dir(), s.__file__)"
    done = subprocess.run([python, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    version, rules_found, settings_file = done.stdout.split()
    assert version == env["DAGSTER_VERSION"], "the image's Dagster is the chart's version"
    assert rules_found == "True" and Path(settings_file).is_relative_to(workdir), "dbt_like_sql/ beside the package"

    assert cmd[:3] == ["dagster", "code-server", "start"]
    done = subprocess.run([*cmd[:3], "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert all(option in done.stdout for option in cmd[3:] if option.startswith("-"))

    module = cmd[cmd.index("-m") + 1]
    Path(env["DAGSTER_HOME"]).mkdir(parents=True)  # made by the RUN line that needs root
    pod_env = {k: v for k, v in pod_envs(load_values())["code server"].items() if k not in env}
    done = subprocess.run(
        ["dagster", "definitions", "validate", "-m", module],
        cwd=workdir,
        env=env | pod_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "Validation successful" in done.stdout + done.stderr
