"""`longtrain launch ray`: the training loop under Ray Train's TorchTrainer, locally or as a Ray job.

    longtrain launch ray RECIPE [overrides] [--num-workers N] [--gpus-per-worker G]   # a local Ray on 127.0.0.1
    longtrain launch ray RECIPE [overrides] --address http://HEAD:8265                # a job on a running cluster
    longtrain launch ray --status JOB --address ...   |   longtrain launch ray --stop JOB --address ...

Every Ray worker runs trainer.loop.train in the process group Ray made (gloo on CPU, nccl on GPU), so
metrics and checkpoints land in the run directory exactly as under torchrun; they also go to Ray
(ray.train.report; for a checkpoint, its manifest and path, not a copy of the weights). When a worker dies,
FailureConfig(max_failures) restarts the group and each restart resumes from the newest complete
checkpoint of our own manifest ('auto'): Ray's registered checkpoint can be one report behind. The
driver settles the run directory once before any worker starts (refuses an earlier run's outputs, or
clears them under --overwrite), so every attempt of the group may resume 'auto'.
With --address the resolved recipe is shipped as the job's working directory and the job runs this
same command with --in-job on the cluster; run.dir must then be a path every node sees.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from longtrain.trainer.config import LaunchConfig, Recipe, load_recipe, save_recipe
from longtrain.trainer.errors import LongtrainError

# Ray Train patches print() in workers and every line then shows up twice in the driver's log.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "PYTHONUNBUFFERED": "1"}


def _first_line(error: BaseException | str) -> str:
    """One line for a log or an error message; for a traceback, its last line (the exception itself)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return (lines[-1] if lines[0].startswith("Traceback") else lines[0])[:300]


def _failure_reason(error: BaseException) -> str:
    """Ray's TrainingFailedError holds per-rank failures; name the first rank and its exception."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        rank, cause = min(failures.items())
        return f"worker rank {rank}: {_first_line(cause)}"
    return _first_line(error)


# ---- inside the workers and the controller ----

class _ReportToRay:
    """trainer.loop's on_step: metrics on every rank (the same calls: report is collective), rank 0's checkpoints.

    Ray gets a pointer to each checkpoint (its manifest and path), not a copy of the weights: the
    checkpoint already lies complete in the run directory, and resumes read it from there.
    """

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self, step: int, metrics: dict, checkpoint: Path | None) -> None:
        import ray.train

        if not metrics and checkpoint is None:
            return
        values = {"step": step, **{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}}
        if checkpoint is None or self.rank != 0:
            ray.train.report(values)
            return
        with tempfile.TemporaryDirectory(prefix="longtrain-pointer-", ignore_cleanup_errors=True) as pointer:
            shutil.copy(Path(checkpoint) / "manifest.json", pointer)
            (Path(pointer) / "longtrain_checkpoint.txt").write_text(f"{checkpoint}\n")
            ray.train.report(values, checkpoint=ray.train.Checkpoint.from_directory(pointer),
                             checkpoint_dir_name=Path(checkpoint).name)


def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker: one rank of trainer.loop.train."""
    import ray.train

    from longtrain.trainer.config import recipe_from_dict
    from longtrain.trainer.loop import train

    recipe = recipe_from_dict(config["recipe"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    print(f"longtrain: ray worker rank {rank}/{context.get_world_size()} pid {os.getpid()} "
          f"node {context.get_node_rank()}", flush=True)
    # After a restart, our manifest, not Ray's bookkeeping (which can be one report behind), says where
    # to continue; the loop logs the step it resumed from.
    resume = "auto" if ray.train.get_checkpoint() is not None else config["resume"]
    train(recipe, resume=resume, on_step=_ReportToRay(rank))


def _describe_failure(error: BaseException) -> str:
    """'died (pid 17435, node 10.0.0.5): The actor died unexpectedly ...' or 'failed: RuntimeError: ...'."""
    text = str(error)
    if "actor died" in text or "died unexpectedly" in text:
        pid, ip = re.search(r"\bpid[:=] ?(\d+)", text), re.search(r"\bip[:=] ?'?([\w.:-]+)", text)
        where = ", ".join(f"{k} {m.group(1)}" for k, m in (("pid", pid), ("node", ip)) if m)
        return f"died ({where or 'process gone'})"
    return f"failed: {_first_line(error)}"


def _newest_manifest_step(checkpoints: Path) -> int | None:
    """The step of the newest checkpoint with a manifest (not verified: the resuming ranks do that)."""
    from longtrain.trainer.checkpoint import STEP_DIR

    steps = [int(m.group(1)) for p in checkpoints.glob("step_*")
             if (m := STEP_DIR.match(p.name)) and (p / "manifest.json").exists()]
    return max(steps, default=None)


def _failure_log_callback(checkpoints: Path):
    """A Ray Train UserCallback (it runs in the controller) that names each failed worker in the log."""
    import ray.train

    class WorkerFailureLog(ray.train.UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            step = _newest_manifest_step(checkpoints)
            for rank, error in sorted(worker_exceptions.items()):
                print(f"longtrain: ray worker rank {rank} {_describe_failure(error)}; newest complete checkpoint: "
                      f"{'step ' + str(step) if step is not None else 'none (a restart begins at step 0)'}", flush=True)

    return WorkerFailureLog()


# ---- the driver: a local Ray instance, or the job on a cluster ----

def check_resources(launch: LaunchConfig, available: dict, where: str) -> None:
    """Fail in one line when the cluster cannot hold the workers at all (Ray would wait for them forever)."""
    for resource, per_worker in (("CPU", launch.cpus_per_worker), ("GPU", launch.gpus_per_worker)):
        need, have = launch.num_workers * per_worker, available.get(resource, 0.0)
        if need > have:
            raise LongtrainError(f"{where} has {have:g} {resource} in all; launch.num_workers={launch.num_workers} x "
                                 f"{per_worker:g} {resource} per worker needs {need:g}: lower --num-workers or "
                                 f"--{resource.lower()}s-per-worker, or add nodes")


def settle_run_dir(recipe: Recipe, resume: str | None, overwrite: bool) -> str:
    """Check the recipe and the run dir before Ray starts, and under --overwrite clear the earlier run's
    outputs; returns the workers' resume.

    --overwrite is applied here, once, not passed to the workers: a group restarted after a failure
    must neither clear this run's checkpoints nor be refused by them. Afterwards the run dir holds only
    what this run writes, so the workers resume 'auto': nothing at first, the newest after a restart."""
    from longtrain.trainer.loop import preflight
    from longtrain.trainer.run_dir import claim

    resume_from = preflight(recipe, resume, world=recipe.launch.num_workers)
    claim(recipe, resume, resume_from, overwrite=overwrite)
    return resume if resume not in (None, "", "none") else "auto"


def fit(recipe: Recipe, resume: str, where: str) -> None:
    """Run TorchTrainer on the connected Ray cluster; raises LongtrainError when training fails for good.
    resume: the workers' (settle_run_dir)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from longtrain.trainer.data.shards import prepare

    launch = recipe.launch
    check_resources(launch, ray.cluster_resources(), where)
    if recipe.data.task == "text":  # tokenizer and shards before any worker: a bad corpus fails here
        recipe.run_dir.mkdir(parents=True, exist_ok=True)
        prepare(recipe.data, recipe.run_dir / "data", seed=recipe.run.seed)
    use_gpu = launch.gpus_per_worker > 0
    per_worker = {"CPU": launch.cpus_per_worker, **({"GPU": launch.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"recipe": recipe.model_dump(mode="json"), "resume": resume},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=launch.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            # A fresh name per launch: Ray would otherwise treat an old run's records as this run's restart.
            name=time.strftime("ray-%Y%m%d-%H%M%S"), storage_path=str(recipe.run_dir / "ray"),
            failure_config=FailureConfig(max_failures=launch.max_failures),
            callbacks=[_failure_log_callback(recipe.run_dir / "checkpoints")]))
    print(f"longtrain: {launch.num_workers} Ray workers x {per_worker} on {where}; run dir {recipe.run_dir}",
          flush=True)
    try:
        result = trainer.fit()
    except Exception as e:  # TrainingFailedError and friends carry worker tracebacks; one line is enough here
        raise LongtrainError(f"training failed under Ray (launch.max_failures={launch.max_failures}): "
                             f"{_failure_reason(e)}") from None
    if getattr(result, "error", None) is not None:
        raise LongtrainError(f"training failed under Ray (launch.max_failures={launch.max_failures}): "
                             f"{_failure_reason(result.error)}")
    metrics = result.metrics or {}
    step, loss = metrics.get("step", float("nan")), metrics.get("loss", float("nan"))
    print(f"longtrain: Ray's last report: step {step:g}, loss {loss:.4f}; Ray's latest checkpoint: "
          f"{result.checkpoint.path if result.checkpoint else 'none'}", flush=True)


def _auth_env() -> None:
    """Ray clients do not follow a cluster into token auth: state the mode outright on both sides."""
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token" if (Path.home() / ".ray" / "auth_token").exists() else "disabled"


def _loopback_env() -> None:
    """Keep a local instance on 127.0.0.1. Ray replaces a node address of 127.0.0.1 by the machine's
    external one (ray._private.services.resolve_ip_for_localhost), and its processes then listen and
    talk there, unless multi-node clusters are off: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the default
    on macOS and Windows and honoured on Linux too. Ray reads it when imported, so this runs first;
    GCS, raylet and workers inherit it."""
    if "ray" in sys.modules and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ:
        print("longtrain: warning: ray was imported before the local instance was configured; it may listen "
              "on the machine's external address", file=sys.stderr)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def run_local(recipe: Recipe, resume: str | None, overwrite: bool, dashboard_host: str) -> None:
    from longtrain.trainer.engine import loopback_socket_env

    resume = settle_run_dir(recipe, resume, overwrite)
    _auth_env()
    _loopback_env()
    import ray

    # The dashboard also serves the state API, which Ray Train's placement-group cleaner polls.
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host=dashboard_host,
             runtime_env={"env_vars": {**WORKER_ENV, **loopback_socket_env()}},
             log_to_driver=True, logging_level="WARNING")
    try:
        fit(recipe, resume, "the local Ray instance")
    finally:
        ray.shutdown()


def run_in_job(recipe: Recipe, resume: str | None, overwrite: bool) -> None:
    import ray

    resume = settle_run_dir(recipe, resume, overwrite)
    ray.init(log_to_driver=True, logging_level="WARNING")  # RAY_ADDRESS is set by the job supervisor
    try:
        fit(recipe, resume, f"the Ray cluster at {ray.get_runtime_context().gcs_address}")
    finally:
        ray.shutdown()


# ---- the client: Ray Jobs ----

def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, ValueError, RuntimeError, depending on what is wrong
        raise LongtrainError(f"cannot reach a Ray cluster at --address {address or '(RAY_ADDRESS or local)'}: "
                             f"{_first_line(e)} (give its dashboard, http://HEAD:8265, or GCS, HEAD:6379)") from None


async def _stream_logs(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def submit(recipe: Recipe, resume: str | None, overwrite: bool, address: str) -> int:
    """Submit the recipe as a Ray job, stream its log until it ends; the exit status follows the job's."""
    from ray.job_submission import JobStatus

    client = _client(address)
    with tempfile.TemporaryDirectory(prefix="longtrain-job-") as job_dir:
        save_recipe(recipe, Path(job_dir) / "recipe.yaml")
        entrypoint = "python -m longtrain.launch.cli launch ray recipe.yaml --in-job"
        if resume:
            entrypoint += f" --resume {shlex.quote(resume)}"
        if overwrite:
            entrypoint += " --overwrite"
        try:
            job_id = client.submit_job(entrypoint=entrypoint,
                                       runtime_env={"working_dir": job_dir, "env_vars": WORKER_ENV},
                                       metadata={"longtrain_recipe": recipe.name, "run_dir": str(recipe.run_dir)})
        except Exception as e:
            raise LongtrainError(f"Ray refused the job at {address}: {_first_line(e)}") from None
    print(f"longtrain: submitted Ray job {job_id} to {address} (stop it with: longtrain launch ray --stop {job_id} "
          f"--address {address})", flush=True)
    try:
        asyncio.run(_stream_logs(client, job_id))
    except KeyboardInterrupt:
        print(f"longtrain: stopped following; job {job_id} keeps running (--status / --stop {job_id})", file=sys.stderr)
        return 130
    status = client.get_job_status(job_id)
    while not status.is_terminal():  # the log stream can close a moment before the status settles
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    if status == JobStatus.SUCCEEDED:
        return 0
    errors = [line for line in client.get_job_logs(job_id).splitlines() if line.startswith("longtrain: error:")]
    if errors:
        reason = errors[-1].removeprefix("longtrain: error: ")
    else:
        reason = _first_line(client.get_job_info(job_id).message or status.value)
    raise LongtrainError(f"Ray job {job_id} {status.value.lower()}: {reason}")


def job_status(address: str | None, job_id: str) -> int:
    client = _client(address)
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as e:  # the Jobs API answers an unknown id with an HTTP error
        raise LongtrainError(f"no Ray job {job_id!r} at {address or 'the default cluster'}: {_first_line(e)}") from None
    print(f"{job_id}: {info.status.value}" + (f" ({_first_line(info.message)})" if info.message else ""))
    return 0


def job_stop(address: str | None, job_id: str) -> int:
    client = _client(address)
    try:
        stopped = client.stop_job(job_id)
    except RuntimeError as e:
        raise LongtrainError(f"no Ray job {job_id!r} at {address or 'the default cluster'}: {_first_line(e)}") from None
    print(f"{job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


# ---- the command ----

def resolve(args) -> Recipe:
    """The recipe with the launch flags folded in and run.dir made absolute; checked before Ray starts."""
    from pydantic import ValidationError

    from longtrain.launch.cli import _split_recipe
    from longtrain.trainer.parallel.plan import check_layout

    recipe_path, overrides = _split_recipe(args.recipe, args.overrides)
    recipe = load_recipe(recipe_path, overrides)
    launch = recipe.launch
    for flag in ("num_workers", "cpus_per_worker", "gpus_per_worker", "max_failures"):
        if getattr(args, flag) is not None:
            try:
                setattr(launch, flag, getattr(args, flag))
            except ValidationError as e:
                message = e.errors()[0]["msg"]
                raise LongtrainError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: {message}") from None
    p = recipe.parallel
    if launch.num_workers is None:
        launch.num_workers = p.tp * p.pp * p.cp * (p.dp or 1)
    recipe.run.dir = str(recipe.run_dir.resolve())
    try:
        check_layout(recipe, launch.num_workers)
    except LongtrainError as e:
        raise LongtrainError(f"--num-workers {launch.num_workers} (launch.num_workers): {e}") from None
    return recipe


def cmd_launch_ray(args) -> int:
    if args.status or args.stop:
        return job_status(args.address, args.status) if args.status else job_stop(args.address, args.stop)
    recipe = resolve(args)
    if args.address and not args.in_job:
        return submit(recipe, args.resume, args.overwrite, args.address)
    if args.in_job:
        run_in_job(recipe, args.resume, args.overwrite)
    else:
        run_local(recipe, args.resume, args.overwrite, args.dashboard_host)
    return 0


def add_parser(sub) -> None:
    launch = sub.add_parser("launch", help="run a recipe on a cluster manager (ray)")
    managers = launch.add_subparsers(dest="manager", required=True)
    p = managers.add_parser("ray", help="Ray Train workers, on a local Ray instance or as a job on a cluster")
    p.add_argument("recipe", nargs="?", help="YAML recipe (default: the packaged quickstart.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--address", default=None,
                   help="a running cluster, as for `ray job submit`: its dashboard (http://HEAD:8265), its GCS "
                        "(HEAD:6379) or 'auto'; without it a local Ray instance is started on 127.0.0.1")
    p.add_argument("--num-workers", type=int, default=None, help="training processes (default: launch.num_workers)")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs per worker (default: launch.cpus_per_worker)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per worker; 0 trains on CPU with gloo (default: launch.gpus_per_worker)")
    p.add_argument("--max-failures", type=int, default=None,
                   help="worker-group restarts before giving up (default: launch.max_failures)")
    p.add_argument("--resume", default=None, help="'auto' or a checkpoint path, as for `longtrain train`")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run dir that holds an earlier run's outputs, as for `longtrain train`")
    p.add_argument("--dashboard-host", default="127.0.0.1",
                   help="local instance only: the address Ray's dashboard listens on (default: 127.0.0.1)")
    p.add_argument("--status", metavar="JOB", default=None, help="print a submitted job's status")
    p.add_argument("--stop", metavar="JOB", default=None, help="stop a submitted job")
    p.add_argument("--in-job", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_launch_ray)
