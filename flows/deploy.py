"""The `nightly` deployment (`mixer-label deploy`): served here, or registered on a work pool.

The deployment is defined once, in `prefect.yaml` at the repo root (name, entrypoint,
parameters, cron and time zone); flags override it for one deploy. With no flags the command
serves the deployment against the API in PREFECT_API_URL until stopped (one machine, no work
pool); with `--work-pool NAME` it registers it on a work pool of type process (created if
missing), where `prefect worker start --pool NAME` picks up its runs.
"""

from __future__ import annotations

import os
import zoneinfo
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = ROOT / "prefect.yaml"
# Parameters naming local paths are made absolute: a worker runs flows in another directory.
_PATH_PARAMETERS = ("input_uri", "output_uri", "model")


class DeployError(Exception):
    """The deployment cannot be served or registered; the message names what to fix."""


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment from prefect.yaml, with what `mixer-label deploy` needs of it."""

    name: str
    entrypoint: str
    cron: str | None
    timezone: str | None = None
    description: str | None = None
    tags: tuple[str, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)
    concurrency_limit: int | None = None
    work_pool: str | None = None
    work_queue: str | None = None

    def with_overrides(
        self,
        parameters: dict[str, Any] | None = None,
        cron: str | None = None,
        timezone: str | None = None,
        work_pool: str | None = None,
    ) -> DeploymentSpec:
        """A copy with parameters merged in and any schedule or pool given replaced."""
        return replace(
            self,
            parameters={**self.parameters, **(parameters or {})},
            cron=cron or self.cron,
            timezone=timezone or self.timezone,
            work_pool=work_pool or self.work_pool,
        )

    def schedules(self) -> list[Any]:
        from prefect.schedules import Cron

        return [Cron(self.cron, timezone=self.timezone)] if self.cron else []


def load_spec(name: str = "nightly", path: Path = PREFECT_YAML) -> DeploymentSpec:
    """The deployment `name` from a prefect.yaml; errors name the file and the missing part."""
    import yaml

    try:
        document = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise DeployError(f"{path}: no such file (the deployment is defined there)") from None
    deployments = {d.get("name"): d for d in document.get("deployments") or []}
    if name not in deployments:
        raise DeployError(f"{path}: no deployment named {name!r} (have {sorted(deployments)})")
    raw = deployments[name]
    if not raw.get("entrypoint"):
        raise DeployError(f"{path}: deployment {name!r} has no entrypoint")
    crons = [s for s in raw.get("schedules") or [] if s.get("cron")]
    schedule = crons[0] if crons else {}
    pool = raw.get("work_pool") or {}
    return DeploymentSpec(
        name=name,
        entrypoint=raw["entrypoint"],
        cron=schedule.get("cron"),
        timezone=schedule.get("timezone"),
        description=raw.get("description"),
        tags=tuple(raw.get("tags") or ()),
        parameters=dict(raw.get("parameters") or {}),
        concurrency_limit=raw.get("concurrency_limit"),
        work_pool=pool.get("name"),
        work_queue=pool.get("work_queue_name"),
    )


def absolute_paths(parameters: dict[str, Any], cwd: Path | None = None) -> dict[str, Any]:
    """Local relative paths in the URI parameters made absolute; URIs and presets untouched."""
    cwd = cwd or Path.cwd()
    out = dict(parameters)
    for key in _PATH_PARAMETERS:
        value = out.get(key)
        if not isinstance(value, str) or not value or "://" in value:
            continue
        path = Path(value).expanduser()
        # A model may be a preset name ("B/16"): only a path that exists is one.
        if key != "model" or (cwd / path).exists():
            out[key] = str((cwd / path).resolve())
    return out


def check_spec(spec: DeploymentSpec) -> None:
    """Fail early, with a one-line reason, on unknown parameters, a bad cron or time zone."""
    from prefect.utilities.callables import parameter_schema

    from flows.labeling import label_images

    known = set(parameter_schema(label_images).properties)
    unknown = sorted(set(spec.parameters) - known)
    if unknown:
        raise DeployError(
            f"unknown parameter(s) {', '.join(unknown)}; the flow takes {', '.join(sorted(known))}"
        )
    if spec.timezone:
        try:
            zoneinfo.ZoneInfo(spec.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise DeployError(f"unknown time zone {spec.timezone!r}") from None
    try:
        spec.schedules()
    except ValueError as err:
        raise DeployError(f"bad cron {spec.cron!r}: {err}") from None


def require_api() -> str:
    """The API URL, checked to answer; serving against Prefect's ephemeral API would be useless."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise DeployError(
            "PREFECT_API_URL is not set; start a server (`prefect server start`) and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise DeployError(f"the Prefect API at {url} does not answer: {failure}")
    return url


def runner_deployment(spec: DeploymentSpec, module_entrypoint: bool = False) -> Any:
    """The spec as a Prefect RunnerDeployment of `label_images`."""
    from prefect.deployments.runner import EntrypointType

    from flows.labeling import label_images

    return label_images.to_deployment(
        name=spec.name,
        schedules=spec.schedules(),
        parameters=spec.parameters,
        description=spec.description,
        tags=list(spec.tags),
        concurrency_limit=spec.concurrency_limit,
        work_pool_name=spec.work_pool if module_entrypoint else None,
        work_queue_name=spec.work_queue if module_entrypoint else None,
        # A worker imports the installed package instead of needing this checkout's path.
        entrypoint_type=EntrypointType.MODULE_PATH
        if module_entrypoint
        else EntrypointType.FILE_PATH,
    )


def serve(spec: DeploymentSpec, limit: int | None = None) -> None:
    """Serve the deployment from this process until interrupted; runs start as subprocesses."""
    from prefect import serve as prefect_serve

    # Served runs load flows/labeling.py relative to the working directory.
    os.chdir(ROOT)
    prefect_serve(runner_deployment(spec), limit=limit)


def ensure_process_pool(name: str) -> None:
    """Create the work pool `name` of type process unless it exists; refuse another type."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type="process",
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                )
            )
            return
    if pool.type != "process":
        raise DeployError(f"work pool {name!r} has type {pool.type!r}, not 'process'")


def register(spec: DeploymentSpec) -> Any:
    """Register the deployment on its process work pool; returns the deployment id."""
    from prefect import deploy as prefect_deploy

    if not spec.work_pool:
        raise DeployError("no work pool: pass --work-pool NAME")
    ensure_process_pool(spec.work_pool)
    ids = prefect_deploy(
        runner_deployment(spec, module_entrypoint=True),
        work_pool_name=spec.work_pool,
        print_next_steps_message=False,
        ignore_warnings=True,
    )
    return ids[0]
