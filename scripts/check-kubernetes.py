"""Checks deploy/kubernetes without a cluster: every overlay renders with `kubectl kustomize`;
every rendered object validates against the Kubernetes schemas (kubernetes-validate, strict:
unknown fields fail) and KEDA's against deploy/kubernetes/schemas/keda.schema.json; and the
objects agree with each other and with the binary (queue names, concurrency, stop deadlines,
probes, security). Then it breaks a copy of each check's input once and expects a failure, so
that no check passes vacuously. Run by scripts/test.sh with the tools' virtual environment."""

import copy
import json
import pathlib
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
VERSION = "1.32.0"
KEDA = json.loads((KUBERNETES / "schemas" / "keda.schema.json").read_text())


def render(overlay):
    result = subprocess.run(
        ["kubectl", "kustomize", str(KUBERNETES / "overlays" / overlay)], capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.exit(f"kubectl kustomize overlays/{overlay} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def schema_errors(obj):
    """Why the object does not validate (empty when it does)."""
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if obj.get("apiVersion", "").startswith("keda.sh/"):
        errors = sorted(jsonschema.Draft202012Validator(KEDA).iter_errors(obj), key=str)
        return [f"{name}: {error.message} at {list(error.absolute_path)}" for error in errors]
    try:
        kubernetes_validate.validate(obj, VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{name}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{name}: no Kubernetes {VERSION} schema for it"]
    return []


def env_of(container, config_maps):
    """A container's environment as it would start: env values and its ConfigMaps' keys (Secret
    keys are named with the value None)."""
    env = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value")
    return env


def pod_specs(objects):
    for obj in objects:
        kind = obj["kind"]
        if kind in ("Deployment", "Job"):
            yield obj, obj["spec"]["template"]["spec"]
        elif kind == "CronJob":
            yield obj, obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def consistency_errors(objects):
    errors = []
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    auths = {o["metadata"]["name"] for o in objects if o["kind"] == "TriggerAuthentication"}
    workers = {}
    for obj, pod in pod_specs(objects):
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        for container in pod["containers"]:
            if container.get("image", "").split("/")[-1].split(":")[0] != "sluice":
                continue
            security = container.get("securityContext", {})
            if not pod.get("securityContext", {}).get("runAsNonRoot"):
                errors.append(f"{name}: the pod must run as non-root")
            if not security.get("readOnlyRootFilesystem") or security.get("allowPrivilegeEscalation", True):
                errors.append(f"{name}: read-only root filesystem without privilege escalation expected")
            resources = container.get("resources", {})
            if not resources.get("requests") or not resources.get("limits"):
                errors.append(f"{name}: resource requests and limits expected")
            env = env_of(container, config_maps)
            role = container.get("args", [None])[0]
            if obj["kind"] == "Deployment":
                listen = env.get("SLUICE_LISTEN")
                if not listen:
                    errors.append(f"{name}: a long-running role must serve its probes (SLUICE_LISTEN)")
                    continue
                port = int(listen.rsplit(":", 1)[1])
                ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
                for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                    get = container.get(probe, {}).get("httpGet", {})
                    probe_port = ports.get(get.get("port"), get.get("port"))
                    if get.get("path") != path or probe_port != port:
                        errors.append(f"{name}: {probe} must GET {path} on port {port}")
            if role == "worker":
                gateway, deadline = env.get("SLUICE_GATEWAY"), env.get("SLUICE_STOP_DEADLINE")
                grace = pod.get("terminationGracePeriodSeconds", 30)
                if deadline is None or grace <= int(deadline):
                    errors.append(
                        f"{name}: terminationGracePeriodSeconds ({grace}) must exceed SLUICE_STOP_DEADLINE ({deadline})"
                    )
                workers[obj["metadata"]["name"]] = (gateway, env)
    for obj in objects:
        if obj["kind"] != "ScaledObject":
            continue
        name = f"ScaledObject/{obj['metadata']['name']}"
        target = obj["spec"]["scaleTargetRef"]["name"]
        if target not in deployments or target not in workers:
            errors.append(f"{name}: scales {target}, which is no worker Deployment")
            continue
        gateway, env = workers[target]
        for trigger in obj["spec"]["triggers"]:
            auth = trigger.get("authenticationRef", {}).get("name")
            if auth is not None and auth not in auths:
                errors.append(f"{name}: authenticationRef {auth} is not rendered")
            if trigger["type"] == "rabbitmq":
                queue = f"{env.get('SLUICE_QUEUE_PREFIX', 'sluice')}.tasks.{gateway}"
                if trigger["metadata"].get("queueName") != queue:
                    errors.append(f"{name}: queueName {trigger['metadata'].get('queueName')} is not {queue}")
                if trigger["metadata"].get("value") != env.get("SLUICE_CONCURRENCY"):
                    errors.append(f"{name}: the queue target must equal the worker's SLUICE_CONCURRENCY")
    return errors


def check(overlay, objects):
    errors = [error for obj in objects for error in schema_errors(obj)] + consistency_errors(objects)
    kinds = {obj["kind"] for obj in objects}
    expected = {"Deployment", "Job", "CronJob", "ConfigMap", "ServiceAccount", "PodDisruptionBudget"}
    if overlay == "prod":
        expected |= {"ScaledObject", "TriggerAuthentication"}
    if overlay == "dev":
        expected |= {"Secret", "Service"}
    errors += [f"overlays/{overlay} renders no {kind}" for kind in sorted(expected - kinds)]
    return errors


def must_fail(what, objects, overlay):
    if not check(overlay, objects):
        sys.exit(f"the checks did not notice {what}")


def main():
    failed = False
    for overlay in ("dev", "prod"):
        objects = render(overlay)
        errors = check(overlay, objects)
        for error in errors:
            print(f"overlays/{overlay}: {error}", file=sys.stderr)
        failed |= bool(errors)
        print(f"overlays/{overlay}: {len(objects)} objects rendered and valid" if not errors else "")
        if overlay != "prod":
            continue
        # Each check must be able to fail: break a copy once per check.
        def broken(change):
            copied = copy.deepcopy(objects)
            for obj in copied:
                change(obj)
            return copied

        def misspell(obj):
            if obj["kind"] == "ScaledObject":
                obj["spec"]["pollingIntervall"] = 5
        must_fail("a misspelt KEDA field", broken(misspell), overlay)

        def unknown_field(obj):
            if obj["kind"] == "Deployment":
                obj["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
        must_fail("a misspelt Kubernetes field", broken(unknown_field), overlay)

        def short_grace(obj):
            if obj["kind"] == "Deployment" and "worker" in obj["metadata"]["name"]:
                obj["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 60
        must_fail("a grace period shorter than the stop deadline", broken(short_grace), overlay)

        def wrong_queue(obj):
            if obj["kind"] == "ScaledObject":
                obj["spec"]["triggers"][0]["metadata"]["queueName"] = "sluice.tasks.other"
        must_fail("a ScaledObject on another queue", broken(wrong_queue), overlay)

        def root(obj):
            if obj["kind"] == "Deployment":
                obj["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = False
        must_fail("a pod running as root", broken(root), overlay)
        print("overlays/prod: every check fails on a broken copy")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
