"""Batch prediction of whole runs on Dask (issue 15): run layout, exactly-once writes,
resumability, worker faults, Slurm job scripts, and evaluate-run.

The fast tests need no cluster. The slow ones share one real LocalCluster of two worker
processes (started once, ~5 s on 2 cores) and kill one of its workers mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from livestain.inference import runsets
from livestain.inference.batch import execute, plan_prediction
from livestain.inference.checkpoint import load_checkpoint
from livestain.inference.runsets import PredictionSet, find_runs, input_channel, run_stacks
from livestain.stackio import read_stack, write_stack

distributed = pytest.importorskip("distributed")

VOXEL = (1.0, 0.325, 0.325)


def make_run(out: Path, n_t: int = 3, n_p: int = 2, shape: tuple[int, int, int] = (8, 64, 64),
             channel: str = "Brightfield", live: bool = False, seed: int = 0) -> Path:
    """A run in the daemon's layout (livestain.store.TiffStore), without a microscope."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"run_id": f"sim-{out.name}", "livestain": "0.1.0",
                                              "policies": {"stream_channels": [channel]}}))
    rng = np.random.default_rng(seed)
    seq = 0
    for t in range(n_t):
        for p in range(n_p):
            zz, yy, xx = np.indices(shape)
            cells = np.sin(xx / 5.0 + p) * np.cos(yy / 7.0 + t) * np.exp(-((zz - shape[0] / 2) ** 2) / 8)
            stack = (1000 + 200 * cells + rng.normal(0, 20, shape)).astype(np.uint16)
            info = {"kind": "stack", "run_id": f"sim-{out.name}", "seq": seq, "t": t, "p": p,
                    "channel": channel, "voxel_size_um": list(VOXEL)}
            write_stack(out / f"p{p:03d}" / f"t{t:04d}_{channel.lower()}.ome.tif", stack, voxel_size_um=VOXEL,
                        info=info, channel_names=[channel])
            if live:
                write_stack(out / f"p{p:03d}" / f"t{t:04d}_prediction.ome.tif",
                            np.zeros((3, *shape), np.float32), voxel_size_um=VOXEL,
                            info={"kind": "prediction", "structures": ["dna", "membrane", "mitochondria"]},
                            channel_names=["dna", "membrane", "mitochondria"])
            seq += 1
    return out


@pytest.fixture(scope="module", autouse=True)
def _environment_restored():
    """Dask's nanny sets OMP_NUM_THREADS=1 and MALLOC_TRIM_THRESHOLD_ in this very process
    (os.environ) before it spawns a worker; later tests' subprocesses must not inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(None)


def set_files(pset: PredictionSet) -> list[Path]:
    """Every file in the set's position folders (predictions, failures, leftovers)."""
    return sorted(f for f in pset.folder.glob("p*/*") if f.is_file())


# ---------------------------------------------------------------- no cluster


def test_runs_are_found_in_the_daemons_layout_and_in_archives(tmp_path, model) -> None:
    a = make_run(tmp_path / "archive" / "2026" / "run-a", n_t=2, n_p=1, live=True)
    b = make_run(tmp_path / "archive" / "run-b", n_t=1, n_p=2)
    assert find_runs([a]) == [a.resolve()]
    assert find_runs([tmp_path / "archive"]) == sorted([a.resolve(), b.resolve()])
    assert find_runs([a, tmp_path / "archive"]) == sorted([a.resolve(), b.resolve()])  # no repeats
    # the live predictions are not a channel; stacks in time order, then position
    assert runsets.run_channels(a) == {"brightfield": 2}
    assert [(r.t, r.p) for r in run_stacks(b, "brightfield")] == [(0, 0), (0, 1)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no livestain run"):
        find_runs([tmp_path / "empty"])
    with pytest.raises(ValueError, match="--channel"):
        input_channel(a, "dna")
    # a plan of both runs writes one set per run, named after the model
    plan = plan_prediction(find_runs([tmp_path / "archive"]), model)
    assert (plan.total, plan.todo, plan.set_names) == (4, 4, [model.name])


def test_prediction_sets_are_invisible_to_the_training_reader(tmp_path, model) -> None:
    """inference.dataset reads p???/t*_<channel> files as channels: a set must not add any."""
    from livestain.inference.dataset import field_files

    run = make_run(tmp_path / "run", n_t=1, n_p=1)
    pset = PredictionSet(run, model.name)
    ref = run_stacks(run, "brightfield")[0]
    pset.claim(ref, np.zeros((3, 8, 64, 64), np.float32), voxel_size_um=VOXEL, info={}, channel_names="abc")
    assert field_files(run) == [("p000/t0000", {"brightfield": ref.path})]


def test_a_stack_is_claimed_once_and_the_first_write_stands(tmp_path) -> None:
    run = make_run(tmp_path / "run", n_t=1, n_p=1)
    ref = run_stacks(run, "brightfield")[0]
    pset = PredictionSet(run, "m@0123")
    pset.record_failure(ref, "RuntimeError: out of memory")
    assert pset.failures()[0]["reason"] == "RuntimeError: out of memory"
    first, second = np.ones((2, 8, 64, 64), np.float32), np.zeros((2, 8, 64, 64), np.float32)
    assert pset.claim(ref, first, voxel_size_um=VOXEL, info={"n": 1}, channel_names=["a", "b"]) is True
    assert pset.claim(ref, second, voxel_size_um=VOXEL, info={"n": 2}, channel_names=["a", "b"]) is False
    array, info = read_stack(pset.path_for(ref))
    assert info["n"] == 1 and array.max() == 1.0 and len(info["claim"]) == 8
    assert pset.failures() == []  # a stack predicted after all is no longer a failure
    assert set_files(pset) == [pset.path_for(ref)]  # no temporary file left behind
    # a write cut short (a killed worker) leaves temporaries that the next call removes
    (pset.path_for(ref).parent / ".t0001.ome.tif.abcd1234.tmp.partial").write_bytes(b"half")
    assert pset.clean_leftovers() == 1 and set_files(pset) == [pset.path_for(ref)]


def test_a_set_is_only_ever_written_with_its_own_settings(tmp_path, model) -> None:
    run = make_run(tmp_path / "run", n_t=1, n_p=1)
    plan = plan_prediction([run], model)
    rp = plan.runs[0]
    rp.pset.open(rp.spec)
    exact = plan_prediction([run], model, exact=True, structures=["dna"])
    assert exact.set_names == [f"{model.name}+exact+dna"]
    with pytest.raises(ValueError, match="precision: 'fast' there, 'exact' now"):
        plan_prediction([run], model, exact=True, set_name=rp.pset.name)
    with pytest.raises(ValueError, match="does not predict nucleoli"):
        plan_prediction([run], model, structures=["nucleoli"])
    for bad in ("live", "../x", ".hidden", "a b"):
        with pytest.raises(ValueError, match="not usable"):
            PredictionSet(run, bad)
    with PredictionSet(run, rp.pset.name).writing():
        with pytest.raises(ValueError, match="another livestain predict-run"):
            with PredictionSet(run, rp.pset.name).writing():
                pass


def test_local_gpu_workers_are_pinned_one_gpu_each() -> None:
    from livestain.inference.cluster import local_worker_specs

    specs = local_worker_specs(3, n_gpus=2)
    assert [s["options"]["env"] for s in specs.values()] == [
        {"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}, {"CUDA_VISIBLE_DEVICES": "0"}]
    assert all(s["options"]["nthreads"] == 1 for s in specs.values())
    assert [s["options"]["env"] for s in local_worker_specs(2, n_gpus=0).values()] == [{}, {}]


def test_slurm_job_script_has_the_resources_asked_for(tmp_path, capsys) -> None:
    pytest.importorskip("dask_jobqueue")
    from livestain.cli import main
    from livestain.inference.cluster import slurm_settings

    config = tmp_path / "slurm.yaml"
    config.write_text("cores: 8\nmemory: 32GB\nqueue: cpu\njob-script-prologue: ['source /etc/profile']\n")
    settings = slurm_settings({"queue": "gpu", "gpus": 1, "prologue": ["module load cuda"]}, config)
    assert settings["queue"] == "gpu" and settings["cores"] == 8  # options win over the file
    with pytest.raises(ValueError, match="at most one GPU"):
        slurm_settings({"gpus": 2})
    with pytest.raises(ValueError, match="YAML mapping"):
        (tmp_path / "bad.yaml").write_text("- a list\n")
        slurm_settings({}, tmp_path / "bad.yaml")
    rc = main(["predict-run", str(tmp_path), "--scheduler", "slurm", "--slurm-config", str(config),
               "--slurm-queue", "gpu", "--slurm-account", "lab42", "--slurm-walltime", "02:00:00",
               "--slurm-gpus", "1", "--slurm-prologue", "module load cuda", "--print-job-script"])
    script = capsys.readouterr().out
    assert rc == 0
    for line in ("#SBATCH -p gpu", "#SBATCH -A lab42", "#SBATCH -t 02:00:00", "#SBATCH --gres=gpu:1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=30G", "source /etc/profile", "module load cuda",
                 f"{sys.executable} -m distributed.cli.dask_worker", "--nthreads 8"):
        assert line in script, f"{line!r} not in the job script:\n{script}"


def test_against_names_structures_and_channels() -> None:
    from livestain.inference.runeval import parse_against

    assert parse_against("dna") == (("dna", "dna"),)
    assert parse_against("dna=Hoechst, membrane") == (("dna", "hoechst"), ("membrane", "membrane"))
    for bad in ("dna,dna", "=x", "dna,"):
        with pytest.raises(ValueError):
            parse_against(bad)


# ---------------------------------------------------------------- on a real cluster


@pytest.fixture(scope="module")
def cluster():
    """A real LocalCluster of two single-threaded worker processes, shared by the slow tests."""
    from distributed import Client, LocalCluster

    from livestain.inference.cluster import quiet_dask_logs

    quiet_dask_logs()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as lc, Client(lc) as client:
        client.wait_for_workers(2, timeout=120)
        yield client


def _wait_for_workers(client, n: int = 2, timeout: float = 120) -> None:
    """After a kill the nanny restarts the worker; later tests want both back."""
    client.wait_for_workers(n, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_worker_killed_mid_run_loses_no_stack_and_duplicates_none(tmp_path, model, cluster) -> None:
    run = make_run(tmp_path / "run", n_t=10, n_p=2, shape=(16, 128, 128))
    plan = plan_prediction([run], model)
    assert plan.todo == 20
    killed: dict[str, int] = {}

    def kill_one_busy_worker(result, report) -> None:
        if killed or report.finished < 4:
            return
        busy = [w for w, keys in cluster.processing().items() if keys]
        pids = cluster.run(os.getpid)
        victim = busy[0] if busy else next(iter(pids))
        os.kill(pids[victim], signal.SIGKILL)
        killed[victim] = pids[victim]

    report = execute(cluster, plan, torch_threads=1, on_result=kill_one_busy_worker)
    assert killed, "the run ended before a worker could be killed"
    assert killed.popitem()[1] not in cluster.run(os.getpid).values()  # it really died
    pset = plan.runs[0].pset
    files = set_files(pset)
    expected = [pset.path_for(ref) for ref in plan.runs[0].stacks]
    assert files == sorted(expected)  # every stack once; no failure, no duplicate, no leftover
    claims = set()
    for path in files:
        array, info = read_stack(path)
        assert array.shape == (3, 16, 128, 128) and array.dtype == np.float32
        assert path.name == f"t{info['t']:04d}.ome.tif" and path.parent.name == f"p{info['p']:03d}"
        assert info["model"] == model.name and info["source_seq"] == 2 * info["t"] + info["p"]
        assert info["source_path"] == f"p{info['p']:03d}/t{info['t']:04d}_brightfield.ome.tif"
        claims.add(info["claim"])
    assert len(claims) == 20
    assert report.failed == 0 and report.finished == 20 and report.written + sum(r.existed for r in report.runs) == 20
    # a second call does nothing: nothing to plan, nothing touched
    stamps = {p: p.stat().st_mtime_ns for p in files}
    again = plan_prediction([run], model)
    assert again.todo == 0
    assert execute(cluster, again).finished == 0
    assert {p: p.stat().st_mtime_ns for p in set_files(pset)} == stamps
    _wait_for_workers(cluster)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_failed_stack_is_recorded_the_rest_go_on_and_the_next_call_retries_it(tmp_path, model, cluster) -> None:
    _wait_for_workers(cluster)
    run = make_run(tmp_path / "run", n_t=3, n_p=2)
    broken = run / "p001" / "t0001_brightfield.ome.tif"
    broken.write_bytes(b"not a tiff at all")
    plan = plan_prediction([run], model, structures=["dna"])
    # a stack written by a task whose worker died before it reported: found, not rewritten
    pset, first = plan.runs[0].pset, plan.runs[0].todo[0]
    pset.open(plan.runs[0].spec)
    pset.claim(first, np.zeros((1, 8, 64, 64), np.float32), voxel_size_um=VOXEL, info={"early": True},
               channel_names=["dna"])
    report = execute(cluster, plan, torch_threads=1)
    tally = report.runs[0]
    assert (tally.written, tally.existed, tally.failed) == (4, 1, 1)
    assert read_stack(pset.path_for(first))[1]["early"] is True
    (failure,) = report.failures
    assert (failure["t"], failure["p"]) == (1, 1) and str(broken) in failure["reason"]
    assert read_stack(pset.path_for(plan.runs[0].todo[1]))[0].shape == (1, 8, 64, 64)  # dna only
    # the next call retries only the failed stack; once it is readable it is predicted
    again = plan_prediction([run], model, structures=["dna"])
    assert [(r.t, r.p) for r in again.runs[0].todo] == [(1, 1)]
    make_run(tmp_path / "fixed", n_t=2, n_p=2)
    os.replace(tmp_path / "fixed" / "p001" / "t0001_brightfield.ome.tif", broken)
    report = execute(cluster, again, torch_threads=1)
    assert (report.written, report.failed, pset.failures()) == (1, 0, [])
    # the model is unloaded from the workers when a call ends (a shared cluster keeps no leftovers)
    plugins = cluster.run(lambda dask_worker: list(dask_worker.plugins))
    assert not [p for names in plugins.values() for p in names if p.startswith("livestain-model")]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_an_interrupted_call_is_continued_by_the_next(tmp_path, model, cluster) -> None:
    _wait_for_workers(cluster)
    run = make_run(tmp_path / "run", n_t=6, n_p=2)

    def interrupt(result, report) -> None:
        if report.finished == 3:
            raise KeyboardInterrupt  # what Ctrl-C does in the console's progress callback

    first = execute(cluster, plan_prediction([run], model), torch_threads=1, on_result=interrupt)
    assert first.interrupted and 3 <= first.finished < 12
    time.sleep(1.0)  # a cancelled task already running on a worker may still finish its stack
    rest = plan_prediction([run], model)
    assert 0 < rest.todo <= 12 - first.written
    second = execute(cluster, rest, torch_threads=1)
    assert not second.interrupted and second.failed == 0
    pset = rest.runs[0].pset
    assert set_files(pset) == sorted(pset.path_for(ref) for ref in rest.runs[0].stacks)
    assert plan_prediction([run], model).todo == 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_model_file_that_differs_on_the_workers_is_refused(tmp_path, model, cluster) -> None:
    """The set's name promises a model fingerprint; workers loading another file would break it."""
    from livestain.inference.checkpoint import save_checkpoint

    _wait_for_workers(cluster)
    run = make_run(tmp_path / "run", n_t=1, n_p=2)
    path = save_checkpoint(tmp_path / "m.safetensors", model.net, model.meta)
    plan = plan_prediction([run], load_checkpoint(path))
    model.meta.extra["retrained"] = True  # the file changes between planning and the workers' load
    save_checkpoint(path, model.net, model.meta)
    model.meta.extra.pop("retrained")
    with pytest.raises(ValueError, match="did not load on any worker.*give the workers the same model file"):
        execute(cluster, plan, torch_threads=1)
    assert set_files(plan.runs[0].pset) == []


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_evaluate_run_scores_a_set_per_time_point_on_the_cluster(tmp_path, model, cluster, capsys) -> None:
    from livestain.cli import main

    _wait_for_workers(cluster)
    address = cluster.scheduler.address
    run = make_run(tmp_path / "run", n_t=2, n_p=2, live=True)
    assert main(["predict-run", str(run), "--scheduler", address, "--structures", "dna,membrane"]) == 0
    pset = PredictionSet(run, f"{model.name}+dna,membrane")
    # paired mode: real fluorescence beside the brightfield; t0 matches the prediction
    # (up to scale and offset), t1 is unrelated noise
    rng = np.random.default_rng(1)
    for ref in run_stacks(run, "brightfield"):
        pred, _ = read_stack(pset.path_for(ref))
        truth = 300 + 50 * pred[0] if ref.t == 0 else rng.normal(300, 50, pred[0].shape)
        write_stack(run / f"p{ref.p:03d}" / f"t{ref.t:04d}_dna.ome.tif", truth.astype(np.uint16),
                    voxel_size_um=VOXEL, info={"kind": "stack", "channel": "DNA"})
    capsys.readouterr()
    out = tmp_path / "scores.json"
    assert main(["evaluate-run", str(run), "--against", "dna", "--scheduler", address, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "pearson" in table and "dna" in table and pset.name in table
    (report,) = json.loads(out.read_text())["runs"]
    assert report["set"] == pset.name and report["stacks"] == 4 and report["failed"] == []
    assert report["time_points"]["0"]["positions"] == 2
    assert report["time_points"]["0"]["mean"]["dna"]["pearson"] > 0.99
    assert abs(report["time_points"]["1"]["mean"]["dna"]["pearson"]) < 0.2
    # the live predictions are a set too; a channel the run lacks is a clear error
    assert main(["evaluate-run", str(run), "--against", "dna", "--set", "live", "--scheduler", address]) == 0
    assert main(["evaluate-run", str(run), "--against", "tubulin", "--scheduler", address]) == 2
    assert "no tubulin stacks" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_predict_run_on_a_local_cluster_then_nothing_to_do(tmp_path, capsys, model, monkeypatch) -> None:
    """The CLI's own LocalCluster, end to end; the second call starts no cluster at all."""
    from livestain.cli import main

    run = make_run(tmp_path / "run", n_t=2, n_p=2)
    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    assert main(["predict-run", str(run), "--workers", "1", "--device", "cpu", "--dashboard", "127.0.0.1:0"]) == 0
    assert "MALLOC_TRIM_THRESHOLD_" not in os.environ  # the nanny's settings did not stay in this process
    out = capsys.readouterr().out
    assert "cluster: 1 CPU worker" in out and "dashboard: http://127.0.0.1:" in out
    assert "4 to do" in out and "stacks/s" in out
    pset = PredictionSet(run, model.name)
    assert len(set_files(pset)) == 4
    assert json.loads((pset.folder / "set.json").read_text())["spec"]["model"] == model.name
    import livestain.inference.cluster as cluster

    def no_cluster(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a call with nothing to do started a cluster")

    monkeypatch.setattr(cluster, "connect", no_cluster)
    assert main(["predict-run", str(run)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["predict-run", str(run), "--set", "live"]) == 2


def make_zarr_run(out: Path, n_t: int = 2, plate: bool = True, shape: tuple[int, int, int] = (8, 64, 64)) -> Path:
    """A Zarr run as the daemon writes one (store + journal), here a 2-well plate."""
    import useq

    from livestain.acquisition.journal import Journal
    from livestain.plate import PlateLayout
    from livestain.store import open_store

    out.mkdir(parents=True, exist_ok=True)
    run_id = f"sim-{out.name}"
    (out / "run.json").write_text(json.dumps({"run_id": run_id, "livestain": "0.1.0", "storage": "zarr",
                                              "policies": {"stream_channels": ["Brightfield"]}}))
    layout = None
    if plate:
        wells = useq.WellPlatePlan(plate=96, a1_center_xy=(0, 0), selected_wells=([0, 1], [0, 2]))
        layout = PlateLayout.from_sequence(useq.MDASequence(stage_positions=wells))
    store = open_store(out, "zarr", timepoints=n_t, plate=layout)
    journal = Journal(out)
    rng = np.random.default_rng(0)
    seq = 100  # not t * n_p + p: the seq must come from the journal, not be guessed
    for t in range(n_t):
        for p in range(2):
            info = {"kind": "stack", "run_id": run_id, "seq": seq, "t": t, "p": p, "channel": "Brightfield",
                    "voxel_size_um": list(VOXEL)}
            stack = (1000 + rng.normal(0, 20, shape)).astype(np.uint16)
            ref = store.write_raw(t, p, "Brightfield", stack, voxel_size_um=VOXEL, info=info)
            journal.stack_written(seq, t, p, "Brightfield", Path(ref), 0, info=info)
            seq += 1
    journal.close()
    return out


def test_a_zarr_plate_runs_stacks_carry_their_journal_seq_and_find_their_siblings(tmp_path) -> None:
    run = make_zarr_run(tmp_path / "run")
    refs = run_stacks(run, "brightfield")
    assert [(r.t, r.p, r.seq, r.run_id) for r in refs] == [(0, 0, 100, "sim-run"), (0, 1, 101, "sim-run"),
                                                           (1, 0, 102, "sim-run"), (1, 1, 103, "sim-run")]
    assert str(refs[3].path).endswith("raw.ome.zarr/B/3/0#t=1&c=Brightfield")
    assert str(runsets.live_prediction_path(refs[3])).endswith("prediction.ome.zarr/B/3/0#t=1")
    assert str(runsets.channel_path(refs[3], "dna")).endswith("raw.ome.zarr/B/3/0#t=1&c=dna")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_predict_run_on_a_zarr_plate_run_records_each_stacks_journal_seq(tmp_path, model, cluster) -> None:
    run = make_zarr_run(tmp_path / "run")
    plan = plan_prediction([run], model)
    assert plan.todo == 4
    report = execute(cluster, plan, torch_threads=1)
    assert report.failed == 0 and report.finished == 4
    pset = plan.runs[0].pset
    seqs = {}
    for ref in plan.runs[0].stacks:
        _, info = read_stack(pset.path_for(ref))
        seqs[(info["t"], info["p"])] = (info["source_seq"], info["run_id"])
    assert seqs == {(0, 0): (100, "sim-run"), (0, 1): (101, "sim-run"), (1, 0): (102, "sim-run"),
                    (1, 1): (103, "sim-run")}
