"""The sbatch scripts vpool writes, and what it reads back from `scontrol`."""

from __future__ import annotations

import subprocess

from vpool.catalog.catalog import load_catalog
from vpool.config import LaunchSettings, ModelSpec
from vpool.controller.job_spec import resolve
from vpool.controller.jobs import _with_worker_ids, worker_argv
from vpool.controller.slurm import ScriptPart, SlurmResources, parse_scontrol, render_script
from vpool.launch import LaunchRequest

PY = "/opt/venv/bin/python"


def _part(name: str, resources: SlurmResources) -> ScriptPart:
    model = ModelSpec(
        name=name, model=f"/weights/{name}", tensor_parallel_size=2, engine_args={"enforce_eager": True}
    )
    return ScriptPart(
        name, resources, worker_argv(PY, model, "http://ctl:8001", "/cache"), f"/logs/x/{name}.%j/worker.log"
    )


def _bash_ok(script: str) -> None:
    subprocess.run(["bash", "-n"], input=script.encode(), check=True)


def test_a_one_node_job_asks_for_its_resources_and_execs_the_worker_so_scancel_reaches_it() -> None:
    resources = SlurmResources(
        partition="a100",
        qos="normal",
        time="08:00:00",
        gpus_per_node=2,
        cpus_per_task=16,
        mem="64G",
        account="lab",
    )
    script = _with_worker_ids(render_script("vpool-m", [_part("m", resources)], PY), ["m"])
    _bash_ok(script)
    for directive in ("--job-name=vpool-m", "--partition=a100", "--qos=normal", "--time=08:00:00",
                      "--gpus-per-node=2", "--cpus-per-task=16", "--mem=64G", "--account=lab", "--nodes=1",
                      "--output=/logs/x/m.%j/worker.log"):  # fmt: skip
        assert f"#SBATCH {directive}" in script, directive
    lines = script.splitlines()
    assert lines[-1].startswith(f"exec {PY} -m vpool.cli worker --model /weights/m --served-name m")
    assert "--tensor-parallel-size 2" in lines[-1] and "--engine-arg enforce_eager=true" in lines[-1]
    assert 'export VPOOL_WORKER_ID="m-${SLURM_JOB_ID}"' in lines
    assert "ray" not in script


def test_a_job_over_several_nodes_starts_a_ray_cluster_first() -> None:
    script = render_script("vpool-big", [_part("big", SlurmResources(num_nodes=2, gpus_per_node=8))], PY)
    _bash_ok(script)
    assert "#SBATCH --nodes=2" in script
    head = script.index("start --head")
    assert script.index("start --address=") > head
    assert script.index("exec ") > script.index('export RAY_ADDRESS="$head_ip:6379"')


def test_a_launch_over_several_nodes_runs_its_worker_on_vllms_ray_executor_and_one_node_does_not() -> None:
    catalog = lambda: load_catalog([], environ={})  # noqa: E731
    scripts = {}
    for nodes in (1, 2):
        request = LaunchRequest.model_validate(
            {"model": "Meta-Llama-3.1-70B-Instruct", "launcher": "slurm",
             "overrides": {"num_nodes": nodes, "tensor_parallel_size": 4, "pipeline_parallel_size": 2}}
        )  # fmt: skip
        spec = resolve(request, catalog, LaunchSettings())
        argv = worker_argv(PY, spec.model, "http://ctl:8001", "/cache")
        part = ScriptPart("big", spec.resources, argv, "/logs/x/big.%j/worker.log")
        scripts[nodes] = _with_worker_ids(render_script("vpool-big", [part], PY), ["big"])
        _bash_ok(scripts[nodes])
    exec_line = scripts[2].splitlines()[-1]
    assert exec_line.startswith("exec ") and "--distributed-executor-backend ray" in exec_line
    assert "--tensor-parallel-size 4 --pipeline-parallel-size 2" in exec_line
    # The worker joins the cluster the script started: RAY_ADDRESS is set before it runs.
    assert scripts[2].index('export RAY_ADDRESS="$head_ip:6379"') < scripts[2].index(exec_line)
    assert "--distributed-executor-backend" not in scripts[1] and "ray" not in scripts[1]


def test_a_batch_is_one_heterogeneous_job_with_a_worker_per_component() -> None:
    parts = [_part("a", SlurmResources(cpus_per_task=1)), _part("b", SlurmResources(cpus_per_task=2))]
    script = _with_worker_ids(render_script("vpool-a+b", parts, PY), ["a", "b"])
    _bash_ok(script)
    assert script.count("#SBATCH hetjob") == 1
    assert (
        script.index("#SBATCH --cpus-per-task=1")
        < script.index("#SBATCH hetjob")
        < script.index("#SBATCH --cpus-per-task=2")
    )
    assert 'VPOOL_WORKER_ID="a-${SLURM_JOB_ID}-c0" srun --overlap --het-group=0' in script
    assert 'VPOOL_WORKER_ID="b-${SLURM_JOB_ID}-c1" srun --overlap --het-group=1' in script
    assert script.rstrip().endswith("wait")
    # Each component logs under the leader's id (srun's %j would give the component's own).
    line = next(li for li in script.splitlines() if "--het-group=1" in li)
    output = line.split("--output=", 1)[1].split(" ", 1)[0]
    expanded = subprocess.run(
        ["bash", "-c", f"printf %s {output}"], env={"SLURM_JOB_ID": "42"}, capture_output=True, text=True
    ).stdout
    assert expanded == "/logs/x/b.42/worker.log"


def test_scontrol_lines_give_state_reason_and_exit_code_per_job_and_component() -> None:
    text = (
        "JobId=41 JobName=vpool-m JobState=PENDING Reason=Resources ExitCode=0:0 NodeList=(null)\n"
        "JobId=42 JobName=vpool-a+b HetJobId=42 HetJobOffset=0 JobState=RUNNING Reason=None "
        "ExitCode=0:0 NodeList=n1\n"
        "JobId=43 JobName=vpool-a+b HetJobId=42 HetJobOffset=1 JobState=FAILED "
        "Reason=NonZeroExitCode ExitCode=1:0\n"
    )
    jobs = parse_scontrol(text)
    assert set(jobs) == {"41", "42+0", "42+1"}
    assert (jobs["41"].state, jobs["41"].reason, jobs["41"].ended) == ("PENDING", "Resources", False)
    assert jobs["42+0"].nodes == "n1" and not jobs["42+0"].ended and jobs["42+0"].reason is None
    assert (jobs["42+1"].state, jobs["42+1"].exit_code, jobs["42+1"].ended) == ("FAILED", "1:0", True)
