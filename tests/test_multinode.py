"""Two "nodes" on one machine through DeepSpeed's own multi-node path: one
``deepspeed --hostfile H --no_ssh --node_rank i --master_addr 127.0.0.1`` launcher per node, 2 CPU
ranks each, tiny model, ZeRO-3, TP 2 x DP 2, fp32.

Each node runs in its own UTS namespace (``unshare --uts``) with its own host name, and has its own
TMPDIR (its "local disk"); the run directory is shared. Checked, in as few launches as possible:

* node-level identity: the start-up log lists both nodes by host name, TP groups inside them;
* a configuration whose TP groups would span nodes is refused before any compute;
* the losses of the 2-node job equal a single-node 4-rank run's (same seeds, same data; to the
  rounding of per-rank KL backend choices, see the tolerance below), across a stop and an exact
  resume on the same layout;
* killing one node's launcher ends the other node's ranks promptly, with a clear message and a
  checkpoint (the trainer's LauncherWatch + agreed stop), not after the collective time-out;
* that checkpoint resumes on one node of 2 ranks (a lost node: DP 2 -> 1, TP 2): fp32 masters,
  Adam moments and step bit for bit, the data position re-dealt;
* node-local state exists once per node: the KL backend selection cache in each node's TMPDIR,
  no CUDA JIT build on CPU ranks, and DeepSpeed's CPU shared-memory all-reduce buffers only when
  every rank is on one node (named by MASTER_ADDR, MASTER_PORT and global rank).
"""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from distributed_utils import find_free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(REPO, "launchers", "pretrain.py")
FIXTURE = os.path.join(REPO, "tests", "fixtures", "faulty_pretrain.py")
NODES = ("rils-node-a", "rils-node-b")
HANG_GUARD = 900  # seconds per launch on a loaded 2-core machine: a hang guard, not a speed limit


def _uts_namespaces() -> bool:
    """Whether each node can get its own host name (root and a kernel / sandbox that allows it)."""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--uts", "hostname", "rils-probe"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from rils_scale.data.scenes import write_scenes_dataset
    root = tmp_path_factory.mktemp("multinode")
    write_scenes_dataset(root / "scenes", num_train=64, num_heldout=8, shard_size=16)
    subprocess.run([os.environ.get("PYTHON", "python"), os.path.join(REPO, "launchers", "train_tokenizer.py"),
                    "--input", str(root / "scenes" / "train"), "--vocab-size", "128", "--output", str(root / "tok")],
                   check=True, capture_output=True)
    return {"train": str(root / "scenes" / "train"), "tokenizer": str(root / "tok.model")}


def _args(data, out, *extra):
    return ["--ds_config", os.path.join(REPO, "ds_configs", "zero3.json"), "--precision", "fp32", "--model", "tiny",
            "--train-data", data["train"], "--tokenizer", data["tokenizer"], "--output-dir", str(out),
            "--tensor-parallel", "2", "--micro-batch-size", "4", "--num-workers", "0", "--shuffle-buffer", "8",
            "--warmup-steps", "2", "--max-steps", "5", "--log-every", "1", "--seed", "5", "--save-every", "100",
            "--collective-timeout-s", "300", *extra]


def _env(tmpdir, extra=None):
    os.makedirs(tmpdir, exist_ok=True)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmpdir), **(extra or {})}


def _start_node(index, hostfile, port, args, tmpdir, log, script=PRETRAIN, uts=True, env=None):
    """One node's launcher, in its own session (and UTS namespace with its own host name)."""
    cmd = ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(index), "--master_addr",
           "127.0.0.1", "--master_port", str(port), script, *args]
    if uts:  # unshare execs sh, sh execs deepspeed: the Popen pid is the launcher's
        cmd = ["unshare", "--uts", "sh", "-c", f'hostname {NODES[index]} && exec "$@"', "sh", *cmd]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(tmpdir, env), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _run_nodes(procs, logs):
    for p in procs:
        p.wait(timeout=HANG_GUARD)
    return [p.returncode for p in procs], [open(log).read() for log in logs]


def _single_node(ranks, port, args, tmpdir, log, script=PRETRAIN, env=None):
    cmd = ["deepspeed", "--master_port", str(port), "--num_gpus", str(ranks), script, *args]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(tmpdir, env), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _rows(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _shm_buffers(port):
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_")
                  and f"_{port}_" in n)


def _mapped_shm_buffers(pid, port):
    """DeepSpeed's shm buffers of this launch mapped by the processes below ``pid``. Their names
    are unlinked once every rank has mapped them (parallel/cpu_comm.py), so a live run shows them
    as mappings only (``... (deleted)`` in /proc/PID/maps)."""
    names = set()
    for child in _descendants(pid):
        try:
            with open(f"/proc/{child}/maps") as f:
                for line in f:
                    at = line.find("/dev/shm/deepspeed_allreduce_buffer_")
                    name = os.path.basename(line[at:].split()[0]) if at >= 0 else ""
                    if f"_{port}_" in name:
                        names.add(name)
        except OSError:
            pass
    return sorted(names)


def _wait_rows(out, n, procs, logs):
    deadline = time.time() + HANG_GUARD
    while len(_rows(out)) < n:
        for p, log in zip(procs, logs):
            assert p.poll() is None, open(log).read()[-4000:]
        assert time.time() < deadline, "no step within the hang guard"
        time.sleep(0.2)


def _descendants(pid):
    import psutil
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_all(procs):
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_node_layout_refusal_message():
    from rils_scale.parallel.topology import node_identity
    from rils_scale.parallel.validate import validate_node_layout
    assert node_identity({"CROSS_RANK": "1"}, "gpu7") == "gpu7#1"
    assert node_identity({"SLURM_NODEID": "0"}, "gpu7") == "gpu7#0"
    assert node_identity({}, "gpu7") == "gpu7"
    validate_node_layout(["a", "a", "b", "b"], 2)
    validate_node_layout(["a", "a", "a", "b"], 1)
    with pytest.raises(ValueError, match=r"ranks 0-3 on a \+ b.*ranks per node here: 2"):
        validate_node_layout(["a", "a", "b", "b"], 4)
    with pytest.raises(ValueError, match=r"ranks 2-3 on a \+ b.*ranks per node here: 1, 3"):
        validate_node_layout(["a", "a", "a", "b"], 2)  # uneven nodes
    with pytest.raises(ValueError, match=r"ranks 0-1 on a \+ b, 2-3 on a \+ b.*a: ranks 0, 2; b: ranks 1, 3"):
        validate_node_layout(["a", "b", "a", "b"], 2)  # round-robin placement (srun -m cyclic)


def test_slurm_variables_become_deepspeed_variables():
    from rils_scale.train.launch_env import adopt_slurm_env, tasks_per_node
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1] and tasks_per_node("8") == [8]
    with pytest.raises(ValueError):
        tasks_per_node("2(x")
    task = {"SLURM_PROCID": "5", "SLURM_NTASKS": "7", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
            "SLURM_STEP_ID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_JOB_ID": "20007"}
    env = dict(task)
    assert adopt_slurm_env(env) == {"RANK": "5", "WORLD_SIZE": "7", "LOCAL_RANK": "1", "LOCAL_SIZE": "2",
                                    "MASTER_PORT": "20007"}
    env = dict(task, RANK="0", MASTER_PORT="1234")  # a launcher's own variables win
    assert adopt_slurm_env(env) == {"WORLD_SIZE": "7", "LOCAL_RANK": "1", "LOCAL_SIZE": "2"} and env["RANK"] == "0"
    batch_shell = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "3"}  # no step: not a task
    assert adopt_slurm_env(batch_shell) == {} and "RANK" not in batch_shell


@pytest.mark.slow
def test_two_nodes_match_one_node_stop_resume_and_lose_a_node(data, tmp_path):
    uts = _uts_namespaces()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{n} slots=2\n" for n in NODES))
    node_tmp = [tmp_path / f"tmp_{n}" for n in NODES]
    procs = []
    try:
        # 0. TP groups that would span nodes (1 rank per node, TP 2): refused before any compute.
        # 1. Reference: one node, 4 ranks, the same configuration. (Both at once: independent.)
        one_slot = tmp_path / "hostfile_1slot"
        one_slot.write_text("".join(f"{n} slots=1\n" for n in NODES))
        bad, ref = tmp_path / "bad", tmp_path / "ref"
        logs = [tmp_path / f"bad_{i}.log" for i in range(2)] + [tmp_path / "ref.log"]
        bad_port, ref_port = find_free_port(), find_free_port()
        procs = [_start_node(i, one_slot, bad_port, _args(data, bad), node_tmp[i], logs[i], uts=uts) for i in range(2)]
        procs.append(_single_node(4, ref_port, _args(data, ref), tmp_path / "tmp_ref", logs[2]))
        codes, texts = _run_nodes(procs, logs)
        assert codes[0] != 0 and codes[1] != 0, texts[:2]
        for text in texts[:2]:
            assert "tensor-parallel groups would span nodes: ranks 0-1" in text, text[-3000:]
        assert "[rils_scale] model tiny" not in texts[0] and not os.path.exists(bad / "metrics.jsonl")
        assert codes[2] == 0, texts[2][-4000:]
        reference = _rows(ref)
        assert [r["step"] for r in reference] == [1, 2, 3, 4, 5]
        assert _shm_buffers(ref_port) == []  # one node: created (LOCAL_SIZE == WORLD_SIZE), unlinked once mapped

        # 2. Two nodes; after the first step node B's launcher is killed.
        run = tmp_path / "run"
        port = find_free_port()
        logs = [tmp_path / f"run_{n}.log" for n in NODES]
        procs = [_start_node(i, hostfile, port, _args(data, run), node_tmp[i], logs[i], uts=uts) for i in range(2)]
        _wait_rows(run, 1, procs, logs)
        assert _shm_buffers(port) == []  # two nodes: DeepSpeed's shm all-reduce is off (LOCAL_SIZE != WORLD_SIZE)
        b_tree = _descendants(procs[1].pid)  # its deepspeed.launcher.launch and ranks 2, 3
        os.kill(procs[1].pid, signal.SIGKILL)
        killed_at = time.time()
        procs[0].wait(timeout=HANG_GUARD)
        a_took = time.time() - killed_at
        print(f"node A's launcher exited {a_took:.1f} s after node B's launcher was killed")
        deadline = time.time() + HANG_GUARD
        while any(_alive(p) for p in b_tree) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in b_tree), "node B's ranks outlived their launcher"
        a_log = open(logs[0]).read()
        assert procs[0].returncode == 0, a_log[-4000:]
        stop = [line for line in a_log.splitlines() if "[rils_scale] stopped at step" in line]
        assert len(stop) == 1 and stop[0].endswith("launcher exited on another rank"), a_log[-4000:]
        stopped = int(stop[0].split("stopped at step ")[1].split(":")[0])
        assert 1 <= stopped < 5
        # Generous: the agreed stop is one step + LauncherWatch's 1 s poll + a checkpoint, far below
        # the 300 s collective time-out it must not wait for.
        assert a_took < 240, a_took
        names = "rils-node-a#0 ranks 0-1, rils-node-b#1 ranks 2-3" if uts else "ranks 0-1"
        assert "2 nodes:" in a_log and names in a_log, a_log[-4000:]
        tag = run / "checkpoints" / f"global_step{stopped}"
        assert (tag / "rils_complete.json").exists()
        assert sorted(p.name for p in tag.glob("loader_state_dp*.json")) == ["loader_state_dp0.json",
                                                                             "loader_state_dp1.json"]
        lost = tmp_path / "lost"
        shutil.copytree(run, lost)  # a copy of the run directory as the lost node left it

        # 3. Both nodes again: exact resume on the same layout; all 5 steps equal the 1-node run.
        logs = [tmp_path / f"resume_{n}.log" for n in NODES]
        port = find_free_port()
        procs = [_start_node(i, hostfile, port, _args(data, run, "--resume"), node_tmp[i], logs[i], uts=uts)
                 for i in range(2)]
        codes, texts = _run_nodes(procs, logs)
        assert codes == [0, 0], texts[0][-4000:] + texts[1][-4000:]
        assert f"resumed from {tag} at step {stopped}" in texts[0] and "data resume: exact" in texts[0]
        rows = _rows(run)
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
        # fp32, the same seeds, data and world size, the same gloo reductions. Not bitwise: the KL
        # backend (`--kl-backend auto`, kept so that the node-local selection cache is exercised) is
        # chosen per rank by timing, and the ranks of the two runs pick `streaming` or
        # `streaming_chunked` independently; the two differ in fp32 summation order (~1e-7 per call),
        # which a few steps of Adam amplify to <= 1e-5 relative (measured: 9.3e-6 on recon_loss at step 5,
        # 7e-7 on the loss). A layout bug (data dealt wrongly, a TP group or DP gather over the wrong
        # ranks) moves the losses by 1e-2 or more. Hence rel 1e-4.
        for a, b in zip(reference, rows):
            for key in ("loss", "clip_loss", "recon_loss", "lr"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key, a[key], b[key])

        # Node-local state, once per node: each node's TMPDIR holds its own KL selection cache; CPU
        # ranks build no CUDA extension; nothing of the kind lands in the shared run directory.
        for t in node_tmp:
            cache = list(t.rglob("kl_selection.json"))
            assert len(cache) == 1 and json.loads(cache[0].read_text()), list(t.rglob("*"))
            assert not list(t.rglob("kernels"))
        assert not list(run.rglob("kl_selection.json"))

        # 4. The lost node: resume that checkpoint on one node of 2 ranks (TP 2, DP 2 -> 1), global
        # batch kept with --grad-accum 2. The engine's state right after the resume is dumped.
        dump = tmp_path / "dump"
        port = find_free_port()
        procs = [_single_node(2, port, _args(data, lost, "--resume", "--grad-accum", "2"), node_tmp[0],
                              tmp_path / "lost.log", script=FIXTURE, env={"RILS_TEST_DUMP_AFTER_RESUME": str(dump)})]
        _wait_rows(lost, stopped + 1, procs, [tmp_path / "lost.log"])
        one_node_buffers = _mapped_shm_buffers(procs[0].pid, port)
        named_buffers = _shm_buffers(port)
        codes, texts = _run_nodes(procs, [tmp_path / "lost.log"])
        log = texts[0]
        assert codes == [0], log[-4000:]
        assert one_node_buffers == [f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{r}" for r in (0, 1)]
        assert named_buffers == [] and _shm_buffers(port) == []  # unlinked once mapped: nothing to leak
        assert f"elastic resume: global_step{stopped} was written by DP 2 x TP 2, this run is DP 1 x TP 2" in log, log[-4000:]
        assert "data resume: redeal" in log and "global batch 8" in log
        from rils_scale.checkpoint.consolidate import OPTIMIZER_KINDS, open_checkpoint
        source, loaded = open_checkpoint(str(tag)), open_checkpoint(str(dump), tag="resumed")
        assert (loaded.tp_size, loaded.dp_size) == (2, 1)
        assert loaded.optimizer_step() == source.optimizer_step() == stopped
        for kind in ("fp32",) + OPTIMIZER_KINDS:
            expected = dict(source.iter_full_tensors(kind=kind))
            for name, value in loaded.iter_full_tensors(kind=kind):
                assert torch.equal(value, expected[name]), (kind, name)
        rows = _rows(lost)
        assert [r["step"] for r in rows] == list(range(1, 6))
        assert all(r["loss"] == r["loss"] for r in rows[stopped:])  # finite training on one node
    finally:
        _kill_all(procs)
