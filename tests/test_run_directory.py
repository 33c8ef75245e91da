"""One writer per run directory, the run's tokenizer and model, metrics rules, roll back.

Units (no process group): the lock (a second holder refused and named, released by SIGKILL,
not kept by forked children, a requeued job waits for its earlier run), the fresh-start rule
and --start-over, metrics.jsonl trimming, which tag --resume loads (latest), roll back and
pruning of abandoned tags, skip windows, the tokenizer and model checks. Then one slow test
drives the real launcher (2 CPU ranks, ZeRO-3, fp32, tiny) through the whole life of a run
directory: two jobs, a SIGKILL and resume, two roll backs, --start-over and a skip window
that later resumes keep.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from distributed_utils import find_free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "faulty_pretrain.py")

_HOLDER = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[2])
from rils_scale.train.run_lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
child = os.fork()
if child == 0:  # a forked worker: must not keep the lock once its parent is gone
    time.sleep(120)
    os._exit(0)
print(json.dumps({"pid": os.getpid(), "child": child}), flush=True)
time.sleep(120)
"""


def _start_holder(directory, env=None):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(directory), REPO], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    return proc, json.loads(proc.stdout.readline())


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_run_lock_names_the_holder_is_freed_by_sigkill_and_not_kept_by_forked_children(tmp_path, monkeypatch):
    from rils_scale.train.run_lock import RunDirBusy, RunLock
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    holder, pids = _start_holder(tmp_path)
    try:
        with pytest.raises(RunDirBusy) as err:
            # another job id (none): refused at once, no waiting
            monkeypatch.setattr(time, "sleep", lambda s: pytest.fail("waited for another job's lock"))
            RunLock(str(tmp_path)).acquire()
        monkeypatch.undo()
        assert f"pid {pids['pid']} on host" in str(err.value) and "is in use by another job" in str(err.value)
        assert err.value.holder["pid"] == pids["pid"] and "-c" in err.value.holder["command"]
        os.kill(pids["pid"], signal.SIGKILL)  # the holder dies; its forked child lives on
        holder.wait()
        os.kill(pids["child"], 0)  # still alive
        lock = RunLock(str(tmp_path)).acquire()
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        _kill(pids["pid"])
        _kill(pids["child"])


def test_a_requeued_job_waits_for_its_earlier_run(tmp_path, monkeypatch):
    """Slurm keeps the job id across a requeue: the new run waits for the old one to let go."""
    from rils_scale.train import run_lock
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    holder, pids = _start_holder(tmp_path, {"SLURM_JOB_ID": "4242"})
    waits, real_sleep = [], time.sleep

    def sleep(seconds):  # the first wait: the earlier run ends now
        waits.append(seconds)
        if len(waits) == 1:
            os.kill(pids["pid"], signal.SIGKILL)
            holder.wait()
        real_sleep(seconds)
    monkeypatch.setattr(run_lock.time, "sleep", sleep)
    try:
        lock = run_lock.RunLock(str(tmp_path)).acquire(same_job_wait_s=300, poll_s=0.05)
        assert waits  # it did wait instead of refusing
        record = json.loads((tmp_path / ".lock").read_text())
        assert (record["job_id"], record["pid"]) == ("4242", os.getpid())
        lock.release()
    finally:
        _kill(pids["pid"])
        _kill(pids["child"])
        holder.wait()


def _cfg(out, **kw):
    from rils_scale.train.config import TrainConfig
    return TrainConfig(output_dir=str(out), **kw)


def _tree(root):
    """relative path -> sha256 of every file under root."""
    out = {}
    for base, _, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def _complete(directory, tag, **info):
    from rils_scale.checkpoint.integrity import mark_complete
    os.makedirs(os.path.join(directory, tag), exist_ok=True)
    with open(os.path.join(directory, tag, "f.pt"), "wb") as f:
        f.write(tag.encode())
    mark_complete(os.path.join(directory, tag), {"tag": tag, **info})


def test_fresh_start_into_a_run_is_refused_or_moved_aside_never_deleted(tmp_path):
    from rils_scale.train.run_dir import PREVIOUS_RUNS, check_run_options, claim
    out = tmp_path / "run"
    lock = claim(_cfg(out), True)  # a new directory: fine, locked
    assert (out / ".lock").exists()
    lock.release()
    _complete(str(out / "checkpoints"), "global_step2")
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (out / "config.json").write_text("{}")
    (out / "notes.txt").write_text("the user's own file")
    with pytest.raises(SystemExit) as err:
        claim(_cfg(out), True)
    message = str(err.value)
    assert "holds a previous run" in message and "global_step2" in message and "metrics.jsonl (2 rows)" in message
    assert "--resume" in message and "--start-over" in message
    claim(_cfg(out, resume=True), True).release()  # continuing it is fine
    before = _tree(out)
    claim(_cfg(out, start_over=True), True).release()
    moved = os.listdir(out / PREVIOUS_RUNS)
    assert len(moved) == 1
    after = _tree(out / PREVIOUS_RUNS / moved[0])
    assert after == {k: v for k, v in before.items() if k != ".lock"}  # everything, byte for byte
    assert sorted(os.listdir(out)) == [".lock", PREVIOUS_RUNS]
    claim(_cfg(out), True).release()  # now a fresh start is allowed
    with pytest.raises(SystemExit, match="cannot be combined"):
        check_run_options(_cfg(out, start_over=True, resume=True))
    cfg = _cfg(out, resume_from="4")
    check_run_options(cfg)
    assert cfg.resume
    with pytest.raises(SystemExit, match="is not START:END"):
        check_run_options(_cfg(out, skip_batches="4-6"))


def test_metrics_rows_after_the_resumed_step_move_aside_nothing_lost(tmp_path):
    from rils_scale.train.metrics import DISCARDED, METRICS, MetricsLogger, trim_metrics
    rows = [{"step": s, "loss": 10.0 - s} for s in range(1, 7)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    text = text.replace(json.dumps(rows[3]), json.dumps(rows[3]) + "\n" + json.dumps({"event": "skip_batches",
                                                                                      "step": 5, "start": 4, "end": 6}))
    (tmp_path / METRICS).write_text(text + '{"step": 7, "lo')  # killed mid-row
    assert trim_metrics(str(tmp_path), 4) == 4
    kept = [json.loads(x) for x in (tmp_path / METRICS).read_text().splitlines()]
    gone = [json.loads(x) for x in (tmp_path / DISCARDED).read_text().splitlines()]
    assert kept == rows[:4]
    assert gone == [{"event": "skip_batches", "step": 5, "start": 4, "end": 6}, rows[4], rows[5],
                    {"unparseable": '{"step": 7, "lo'}]
    assert trim_metrics(str(tmp_path), 4) == 0  # idempotent
    logger = MetricsLogger(str(tmp_path), True, 8, start_step=4)
    logger.log(5, {"loss": 1.5})
    logger.close()
    steps = [json.loads(x)["step"] for x in (tmp_path / METRICS).read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # appended, never truncated, no step twice
    assert len((tmp_path / DISCARDED).read_text().splitlines()) == 4


def test_resume_tag_follows_latest_and_resume_from(tmp_path, monkeypatch):
    from rils_scale.checkpoint import integrity as it
    from rils_scale.train.rollback import choose_resume_tag
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    d = str(tmp_path)
    assert choose_resume_tag(d) == (None, "no checkpoint", [])
    for s in (2, 4, 6):
        _complete(d, f"global_step{s}")
    os.makedirs(os.path.join(d, "global_step8"))  # a save killed midway
    it.write_latest(d, "global_step6")
    assert choose_resume_tag(d)[0::2] == ("global_step6", [])  # debris is no roll back
    it.write_latest(d, "global_step8")  # latest is written before the marker: may name debris
    assert choose_resume_tag(d)[0] == "global_step6"
    it.write_latest(d, "global_step4")  # edited by a user, as DeepSpeed users do: honoured, a roll back
    assert choose_resume_tag(d) == ("global_step4", "latest", ["global_step6", "global_step8"])
    assert choose_resume_tag(d, "2")[0::2] == ("global_step2", ["global_step4", "global_step6", "global_step8"])
    assert choose_resume_tag(d, "global_step6")[0::2] == ("global_step6", [])
    with pytest.raises(ValueError, match="global_step5 is not there; complete tags: global_step2, global_step4"):
        choose_resume_tag(d, "5")
    with pytest.raises(ValueError, match="incomplete"):
        choose_resume_tag(d, "8")
    # A requeued job repeats its command: its own roll back to 2 is not done twice.
    it.write_latest(d, "global_step6")
    with open(os.path.join(d, "global_step6", it.COMPLETE_MARKER)) as f:
        marker = json.load(f)
    marker["rollbacks"] = [{"to": "global_step2", "job_id": "77"}]
    with open(os.path.join(d, "global_step6", it.COMPLETE_MARKER), "w") as f:
        json.dump(marker, f)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    tag, why, newer = choose_resume_tag(d, "2")
    assert (tag, newer) == ("global_step6", []) and "already carried out by this job" in why
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job asking for it: rolls back
    assert choose_resume_tag(d, "2")[0] == "global_step2"


def test_roll_back_moves_newer_tags_aside_kept_until_pruning(tmp_path):
    from rils_scale.checkpoint import integrity as it
    d = str(tmp_path)
    for s in (2, 4, 6, 8):
        _complete(d, f"global_step{s}")
    it.write_latest(d, "global_step8")
    old = {t: _tree(os.path.join(d, t)) for t in ("global_step6", "global_step8")}
    moved = it.abandon_tags_after(d, "global_step4", {"job_id": ""})
    assert os.path.dirname(moved) == os.path.join(d, it.ABANDONED)
    assert it.list_tags(d) == ["global_step2", "global_step4"] and it.read_latest(d) == "global_step4"
    assert {t: _tree(os.path.join(moved, t)) for t in it.list_tags(moved)} == old  # nothing lost
    assert json.load(open(os.path.join(moved, it.ROLLBACK_RECORD)))["tags"] == ["global_step6", "global_step8"]
    group = os.path.basename(moved)
    # The new lineage saves 6, 8, 10, 12 with --keep-checkpoints 2: an abandoned tag goes once two
    # live tags are newer than it (when it would have gone had it stayed in the lineage).
    expected = {6: ["global_step2"], 8: ["global_step4"], 10: ["global_step6", f"abandoned/{group}/global_step6"],
                12: ["global_step8", f"abandoned/{group}/global_step8"]}
    for s, deleted in expected.items():
        _complete(d, f"global_step{s}")
        it.write_latest(d, f"global_step{s}")
        assert it.prune(d, 2) == deleted, s
    assert not os.path.exists(moved)  # the group went with its last tag
    assert it.prune(d, 0) == []


def test_skip_windows_parse_combine_and_drop_exactly():
    from rils_scale.train.rollback import SkippingBatches, combine_windows, parse_skip_batches
    assert parse_skip_batches("10:12, 4:6,5:8") == [(4, 8), (10, 12)]
    assert parse_skip_batches("") == []
    for bad in ("4", "6:4", "a:b", "4:4", "-1:3"):
        with pytest.raises(ValueError):
            parse_skip_batches(bad)
    assert combine_windows([[2, 4]], [(2, 4), (8, 9)], 6, "ckpt") == [(2, 4), (8, 9)]  # recorded: fine
    with pytest.raises(SystemExit, match="batches before 6 were already trained on"):
        combine_windows([], [(5, 7)], 6, "ckpt")
    seen = []
    batches = ({"i": i, "skipped": {"corrupt_image": i % 2}} for i in range(100))
    it = SkippingBatches(batches, [(2, 4), (5, 6), (9, 12)], 0, on_skip=lambda a, b, s: seen.append((a, b, s)))
    assert [next(it)["i"] for _ in range(6)] == [0, 1, 4, 6, 7, 8]
    assert next(it)["i"] == 12 and it.position == 13
    assert seen == [(2, 4, {"corrupt_image": 1}), (5, 6, {"corrupt_image": 1}), (9, 12, {"corrupt_image": 2})]
    # A resume at 10 inside a recorded window drops the rest of it only; past windows do nothing.
    it = SkippingBatches(({"i": i} for i in range(10, 20)), [(2, 4), (9, 12)], 10)
    assert next(it)["i"] == 12


def _tokenizer_files(tmp_path):
    """Two SentencePiece models of the same vocabulary size trained on different text."""
    import sentencepiece as spm
    paths = []
    for name, words in (("a", "red square blue circle green triangle"), ("b", "small dog large cat tiny bird")):
        text = tmp_path / f"{name}.txt"
        text.write_text("\n".join(f"{w} {v}" for w in words.split() for v in words.split()))
        spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / name), vocab_size=40,
                                       model_type="bpe", pad_id=0, unk_id=1, bos_id=2, eos_id=3)
        paths.append(str(tmp_path / f"{name}.model"))
    return paths


def test_resume_refuses_another_tokenizer_or_model_naming_the_difference(tmp_path):
    from rils_scale.models import get_config
    from rils_scale.train.preflight import PreflightError
    from rils_scale.train.resume_checks import check_resume
    from rils_scale.train.run_dir import file_sha256, install_run_tokenizer, resolve_tokenizer
    tok_a, tok_b = _tokenizer_files(tmp_path)
    da, db = file_sha256(tok_a), file_sha256(tok_b)
    model = get_config("tiny")
    model.text.vocab_size = 40
    run = tmp_path / "run"
    os.makedirs(run)
    assert install_run_tokenizer(str(run), tok_a, da) is None
    _complete(str(run / "checkpoints"), "global_step4", step=4, tokenizer_sha256=da, model_config=model.to_dict())

    cfg = _cfg(run, resume=True)
    resolve_tokenizer(cfg)  # --resume without --tokenizer: the run's own copy
    assert cfg.tokenizer == str(run / "tokenizer.model")
    assert check_resume(cfg, cfg.tokenizer, da, 40, model.to_dict(), False).tag == "global_step4"
    with pytest.raises(PreflightError) as err:
        check_resume(_cfg(run, resume=True, tokenizer=tok_b), tok_b, db, 40, model.to_dict(), False)
    message = str(err.value)
    assert f"tokenizer {tok_b} (sha256 {db})" in message and f"(sha256 {da}, recorded in" in message
    assert "rils_complete.json" in message and "resume without --tokenizer" in message
    # The run's copy is never overwritten; one replaced by hand is named as such.
    assert "left as it is" in install_run_tokenizer(str(run), tok_b, db)
    assert file_sha256(str(run / "tokenizer.model")) == da
    os.replace(tok_b, run / "tokenizer.model")
    with pytest.raises(PreflightError, match="the run's copy was replaced"):
        check_resume(cfg, cfg.tokenizer, db, 40, model.to_dict(), False)
    os.replace(run / "tokenizer.model", tok_b)
    install_run_tokenizer(str(run), tok_a, da)

    small = get_config("small")
    small.text.vocab_size = 40
    with pytest.raises(PreflightError) as err:
        check_resume(_cfg(run, resume=True, model="small"), tok_a, da, 40, small.to_dict(), False)
    message = str(err.value)
    assert "--model small" in message and "preset 'tiny'" in message
    assert f"vision.width: checkpoint {model.vision.width}, this run {small.vision.width}" in message
    changed = get_config("tiny", mask_ratio=0.5)
    changed.text.vocab_size = 40
    check_resume(_cfg(run, resume=True), tok_a, da, 40, changed.to_dict(), False)  # allowed: no parameter
    # --resume-from a tag that is not there: refused with the complete ones listed.
    with pytest.raises(PreflightError, match="complete tags: global_step4"):
        check_resume(_cfg(run, resume=True, resume_from="3"), tok_a, da, 40, model.to_dict(), False)


# ------------------------------------------------------------------ the real launcher, end to end
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from rils_scale.data.scenes import write_scenes_dataset
    root = tmp_path_factory.mktemp("rundir")
    write_scenes_dataset(root / "shapes", num_train=64, num_heldout=8, shard_size=32)
    for name, kind in (("tok", "bpe"), ("other_tok", "unigram")):  # same vocabulary size, other pieces
        subprocess.run([sys.executable, os.path.join(REPO, "launchers", "train_tokenizer.py"), "--input",
                        str(root / "shapes" / "train"), "--vocab-size", "128", "--model-type", kind,
                        "--output", str(root / name)], check=True, capture_output=True)
    return {"train": str(root / "shapes" / "train"), "tokenizer": str(root / "tok.model"),
            "other_tokenizer": str(root / "other_tok.model")}


def _command(data, out, port, *extra):
    tokenizer = [] if "--no-tokenizer" in extra else ["--tokenizer", data["tokenizer"]]
    return ["deepspeed", "--master_port", str(port), "--num_gpus", "2", FIXTURE,
            "--ds_config", os.path.join(REPO, "ds_configs", "zero3.json"), "--precision", "fp32", "--model", "tiny",
            "--train-data", data["train"], *tokenizer, "--output-dir", str(out), "--micro-batch-size", "4",
            "--num-workers", "0", "--shuffle-buffer", "8", "--warmup-steps", "2", "--log-every", "1", "--seed", "5",
            "--save-every", "2", "--keep-checkpoints", "0", "--max-steps", "8", "--collective-timeout-s", "120",
            *[e for e in extra if e != "--no-tokenizer"]]


def _unlink_shm(port):
    """DeepSpeed's CPU all-reduce buffers of a launch that did not finish cleanly (ours only: our port)."""
    for rank in (0, 1):
        try:
            os.unlink(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}")
        except OSError:
            pass


def _env(**extra):
    """The test's environment without a batch scheduler's job id (a test run inside a Slurm job
    must not look like a requeued run of the same job to the lock)."""
    from rils_scale.train.run_lock import _JOB_ID_VARS
    env = {k: v for k, v in os.environ.items() if k not in _JOB_ID_VARS}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _run(data, out, *extra):
    port = find_free_port()
    try:
        proc = subprocess.run(_command(data, out, port, *extra), cwd=REPO, capture_output=True, text=True,
                              timeout=600, env=_env())
    finally:
        _unlink_shm(port)
    return proc.returncode, proc.stdout + proc.stderr


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _steps(rows):
    return [r["step"] for r in rows if "event" not in r]


def _same_losses(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in ("loss", "clip_loss", "recon_loss", "lr"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), (x["step"], key, x[key], y[key])


def _wait_for(paths, proc, log):
    deadline = time.monotonic() + 600  # a hang guard only: the files appear when the run gets there
    while not all(os.path.exists(p) for p in paths):
        assert proc.poll() is None, f"the run ended early:\n{open(log).read()[-3000:]}"
        assert time.monotonic() < deadline, "the run never reached the hold point"
        time.sleep(0.2)


@pytest.mark.slow
def test_run_directory_life_two_jobs_kill_resume_roll_back_start_over_skip(data, tmp_path):
    from rils_scale.checkpoint import integrity as it
    from rils_scale.train.run_dir import file_sha256
    out, hold = tmp_path / "run", tmp_path / "hold"
    ckpts = out / "checkpoints"
    hold.mkdir()
    metrics, discarded = out / "metrics.jsonl", out / "metrics.discarded.jsonl"

    # 1. Job 1 trains; it is held after logging step 3 (checkpoint 2 written).
    port, log1 = find_free_port(), tmp_path / "job1.log"
    job1 = subprocess.Popen(_command(data, out, port), cwd=REPO, stdout=open(log1, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=_env(RILS_TEST_HOLD=f"3,5:{hold}"))
    try:
        _wait_for([hold / "held_3_rank0", hold / "held_3_rank1"], job1, log1)
        holder = json.loads((out / ".lock").read_text())
        before = {k: v for k, v in _tree(out).items() if not k.startswith("tensorboard")}  # (flushed by a timer)

        # 2. Job 2 on the same directory: refused on both ranks, naming job 1; nothing touched.
        code, log = _run(data, out)
        assert code != 0, log[-3000:]
        assert f"is in use by another job: pid {holder['pid']} on host {holder['host']}" in log, log[-3000:]
        assert "rank 1: --output-dir" in log and "refused by rank 0" in log
        assert {k: v for k, v in _tree(out).items() if not k.startswith("tensorboard")} == before

        # 3. Job 1 goes on unharmed to step 5 (checkpoint 4 written), then its lock holder is SIGKILLed.
        (hold / "release_3").touch()
        _wait_for([hold / "held_5_rank0", hold / "held_5_rank1"], job1, log1)
        assert _steps(_rows(metrics)) == [1, 2, 3, 4, 5] and it.read_latest(str(ckpts)) == "global_step4"
        os.kill(holder["pid"], signal.SIGKILL)
        os.killpg(job1.pid, signal.SIGKILL)
        job1.wait()
    finally:
        if job1.poll() is None:
            os.killpg(job1.pid, signal.SIGKILL)
            job1.wait()
        _unlink_shm(port)
    killed_row5 = _rows(metrics)[4]

    # 4. --resume takes the lock the dead job left, resumes at step 4, moves row 5 aside.
    code, log = _run(data, out, "--resume")
    assert code == 0, log[-3000:]
    assert "global_step4 at step 4 (latest)" in log and "1 row(s) of metrics.jsonl after step 4 moved" in log
    run_a = _rows(metrics)
    assert _steps(run_a) == list(range(1, 9))  # no step twice
    assert _rows(discarded) == [killed_row5]  # nothing lost
    _same_losses([killed_row5], [run_a[4]])  # and the resume was exact

    # 5. --resume with a tokenizer of the same vocabulary size: refused naming both, run's copy kept.
    own = file_sha256(str(out / "tokenizer.model"))
    code, log = _run(data, out, "--resume", "--no-tokenizer", "--tokenizer", data["other_tokenizer"])
    assert code != 0 and f"sha256 {file_sha256(data['other_tokenizer'])}" in log and f"sha256 {own}" in log, log[-3000:]
    assert "is not the tokenizer this run was trained with" in log
    assert file_sha256(str(out / "tokenizer.model")) == own == file_sha256(data["tokenizer"])

    # 6. Roll back to step 4 skipping batches 4 and 5 (run B); run A's tags 6, 8 are moved aside.
    code, log = _run(data, out, "--resume-from", "4", "--skip-batches", "4:6")
    assert code == 0, log[-3000:]
    assert "rolled back to global_step4" in log
    (group_a,) = os.listdir(ckpts / it.ABANDONED)
    assert it.list_tags(str(ckpts / it.ABANDONED / group_a)) == ["global_step6", "global_step8"]
    assert all(it.is_complete(str(ckpts / it.ABANDONED / group_a / t)) for t in ("global_step6", "global_step8"))
    marker = it.read_marker(str(ckpts / "global_step8"))
    assert marker["skip_batches"] == [[4, 6]] and marker["batches_consumed"] == 10
    assert marker["rollbacks"][0]["to"] == "global_step4"
    rows = _rows(metrics)
    assert _steps(rows) == list(range(1, 9))
    assert [(r["event"], r["step"]) for r in rows if "event" in r] == [("rollback", 4), ("skip_batches", 5)]
    run_b = [r for r in rows if "event" not in r][4:]
    assert run_b[0]["loss"] != run_a[4]["loss"]  # other data from step 5 on
    assert _steps(_rows(discarded)) == [5, 5, 6, 7, 8]  # job 1's row 5, then run A's 5..8

    # 7. Roll back to step 4 again, no skip: steps 5..8 reproduce run A exactly.
    code, log = _run(data, out, "--resume-from", "global_step4")
    assert code == 0, log[-3000:]
    assert len(os.listdir(ckpts / it.ABANDONED)) == 2  # run B's tags kept too (--keep-checkpoints 0)
    rows = [r for r in _rows(metrics) if "event" not in r]
    assert _steps(rows) == list(range(1, 9))
    _same_losses(rows[4:], run_a[4:])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    shown = {e.step: e.value for e in EventAccumulator(str(out / "tensorboard")).Reload().Scalars("train/loss")}
    assert sorted(shown) == list(range(1, 9))  # abandoned steps purged from TensorBoard's view
    assert shown[5] == pytest.approx(run_a[4]["loss"], rel=1e-6)

    # 8. (A fresh start would be refused: test_fresh_start_into_a_run_...) --start-over moves the
    #    whole run aside (nothing deleted) and starts again skipping batches 4 and 5; it stops
    #    after step 3.
    before = {k: v for k, v in _tree(out).items() if k != ".lock"}
    code, log = _run(data, out, "--start-over", "--skip-batches", "4:6", "--exit-after-steps", "3")
    assert code == 0, log[-3000:]
    (previous,) = os.listdir(out / "previous_runs")
    assert _tree(out / "previous_runs" / previous) == before

    # 9. --resume without --tokenizer (the run's own) and without --skip-batches: the recorded
    #    window is still skipped. Steps 1..4 are run A's, 5..8 run B's: a run that never saw
    #    batches 4 and 5 gives the losses of the roll back that skipped them.
    code, log = _run(data, out, "--resume", "--no-tokenizer")
    assert code == 0, log[-3000:]
    assert "reading and dropping batches 4..5" in log
    rows = _rows(metrics)
    assert [(r["event"], r["step"], r["start"], r["end"]) for r in rows if "event" in r] == [("skip_batches", 5, 4, 6)]
    rows = [r for r in rows if "event" not in r]
    _same_losses(rows[:4], run_a[:4])
    _same_losses(rows[4:], run_b)
    assert not discarded.exists()
