"""The README's evaluation commands, as printed, on small sets and a seeded random model:

- the CLIP_benchmark block (``make_shards.py --layout clip_benchmark`` on a 12-image listing,
  then ``python -m rils_scale.eval.clip_benchmark eval ...``) runs: the split has >= 4 shards,
  the numpy >= 2.4 ``accuracy()`` error is gone, and its zero-shot top-1 equals
  ``evaluate.py --data data/wds_mine`` (which reads the same folder, labels, class names and
  prompts, and says which tasks it left out and why);
- ``evaluate.py`` on caption-only shards runs retrieval, leaves the rest out with reasons,
  counts the samples it skipped (bad JSON, a caption-less tail) and writes them to the JSON;
  an explicitly requested task that cannot run is an error;
- ``evaluate.py --builtin data/shapes`` writes and evaluates ``shapes``.

Commands are read from README.md and run in a scratch directory that holds what they name.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from random_models import config, rils_dir, tokenizer
from test_launch_single_rank import readme_commands

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _run(cmd, cwd, ok=True):
    if cmd[0] == "python":
        cmd = [sys.executable] + cmd[1:]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO})
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Scratch dir: launchers/ (link), exported/b16 (rils), exported/b16_openclip, a labelled listing."""
    from PIL import Image
    from rils_scale.checkpoint.export import export
    from rils_scale.checkpoint.sources import open_source
    root = tmp_path_factory.mktemp("evalcmd")
    os.symlink(os.path.join(REPO, "launchers"), root / "launchers")
    tok, vocab = tokenizer(root)
    model = rils_dir(str(root / "exported" / "b16"), config(vocab), tok)
    export(open_source(model), "open_clip", str(root / "exported" / "b16_openclip"))
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 220)}
    lines = ["image,label"]
    for i in range(12):
        name = list(colours)[i % 3]
        im = Image.new("RGB", (40 + i, 36), colours[name])
        im.paste((255, 255, 255), (4 + i, 6, 14 + i, 20))  # a white square that moves: images differ
        im.save(root / f"{i}.png")
        lines.append(f"{i}.png,{i % 3}")
    (root / "val.csv").write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("\n".join(colours) + "\n")
    return root


def test_readme_clip_benchmark_commands_run_on_a_small_set(work):
    make = [c for c in readme_commands("python launchers/make_shards.py") if "clip_benchmark" in c]
    bench = readme_commands("python -m rils_scale.eval.clip_benchmark")
    assert len(make) == 1 and len(bench) == 1, (make, bench)
    proc = _run(make[0], work)
    assert "wrote 12 samples in 4 shard(s)" in proc.stdout, proc.stdout
    assert (work / "data" / "wds_mine" / "test" / "nshards.txt").read_text().strip() == "4"
    proc = _run(bench[0], work)
    with open(work / "mine.json") as f:
        metrics = json.load(f)["metrics"]
    assert 0.0 <= metrics["acc1"] <= 1.0  # (acc5 is NaN with fewer than 5 classes)

    # evaluate.py reads the same folder: same images, labels, class names and prompts
    out = work / "cb_results.json"
    proc = _run(["python", "launchers/evaluate.py", "--model", "exported/b16", "--data", "data/wds_mine",
                 "--output", str(out)], work)
    with open(out) as f:
        results = json.load(f)
    z = results["tasks"]["zero_shot"]
    assert z["num_images"] == 12 and z["num_classes"] == 3 and z["num_templates"] == 1
    assert abs(z["top1"] - metrics["acc1"]) < 0.5 / 12, (z, metrics)
    left = {t: v["skipped"] for t, v in results["tasks"].items() if "skipped" in v}
    assert set(left) == {"retrieval", "linear_probe", "few_shot", "localization"}, left
    assert "--train-data" in left["linear_probe"] and "captions" in left["retrieval"]
    assert "left out:" in proc.stdout and "nothing skipped" in proc.stdout
    # a split directory works as well (in-process: the same runner)
    from rils_scale import load_model
    from rils_scale.eval.runner import evaluate
    lines = []
    again = evaluate(load_model(str(work / "exported" / "b16")), data=str(work / "data" / "wds_mine" / "test"),
                     tasks=["zero_shot"], log=lines.append)
    assert again["tasks"]["zero_shot"]["top1"] == z["top1"] and "CLIP_benchmark set" in lines[0]


def test_clip_benchmark_entry_point_lowers_workers_to_shards(tmp_path, capsys):
    from argparse import Namespace
    from rils_scale.eval.clip_benchmark import _workers_for_shards, accuracy
    import torch
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "nshards.txt").write_text("1\n")
    seen = []
    run = _workers_for_shards(lambda args: seen.append(args.num_workers))
    args = Namespace(dataset="wds/mine", dataset_root=str(tmp_path), split="test", task="zeroshot_classification",
                     num_workers=4, skip_load=False, train_split="train")
    run(args)
    assert seen == [1] and "1 shard(s)" in capsys.readouterr().out
    run(Namespace(**{**vars(args), "dataset": "cifar10", "num_workers": 4}))  # not a local wds set: untouched
    assert seen == [1, 4]
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    assert accuracy(logits, torch.tensor([1, 2, 2]), topk=(1, 2)) == [2 / 3, 1.0]


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_evaluate_caption_only_shards_runs_what_it_can_and_counts_skips(work):
    from PIL import Image
    shards = work / "captions"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for i in range(10):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (20 * i, 100, 200 - 15 * i)).save(buf, format="PNG")
            _add(tar, f"{i:04d}.png", buf.getvalue())
            _add(tar, f"{i:04d}.txt", f"a {['red', 'green', 'blue'][i % 3]} circle left of a square".encode())
            if i in (3, 7):
                _add(tar, f"{i:04d}.json", b"{not json")  # bad_json: skipped and counted
        _add(tar, "0010.png", buf.getvalue())  # a caption-less tail after the last good sample
    out = work / "captions.json"
    proc = _run(["python", "launchers/evaluate.py", "--model", "exported/b16", "--data", str(shards),
                 "--output", str(out)], work)
    with open(out) as f:
        results = json.load(f)
    tasks = results["tasks"]
    assert tasks["retrieval"]["num_pairs"] == 8
    assert results["skipped_samples"]["data"] == {"bad_json": 2, "missing_caption": 1}
    assert "skipped 3 evaluation sample(s)" in proc.stdout and "skipped samples" in proc.stdout
    left = {t: v["skipped"] for t, v in tasks.items() if "skipped" in v}
    assert set(left) == {"zero_shot", "linear_probe", "few_shot", "localization"}, left
    assert "no labels" in left["zero_shot"] and "--train-data" in left["few_shot"]
    # a task asked for by name that cannot run is an error (evaluate.py: exit 1 with this message)
    from rils_scale import load_model
    from rils_scale.eval.runner import evaluate
    with pytest.raises(ValueError, match=r"linear_probe: needs labelled training images \(--train-data\)"):
        evaluate(load_model(str(work / "exported" / "b16")), data=str(shards), tasks=["retrieval", "linear_probe"])


def test_readme_evaluate_builtin_writes_the_named_dataset(work):
    cmd = [c for c in readme_commands("python launchers/evaluate.py") if "--builtin" in c]
    assert len(cmd) == 1 and "data/shapes" in cmd[0], cmd
    # as printed, with the sample caps appended to bound the test's time
    proc = _run(cmd[0] + ["--max-samples", "60", "--max-train-samples", "300", "--shots", "1", "4",
                          "--seeds", "1"], work)
    assert "writing the built-in 'shapes' dataset" in proc.stdout
    with open(work / "data" / "shapes" / "classes.json") as f:
        assert json.load(f)["dataset"] == "shapes"
    with open(work / "results.json") as f:
        tasks = json.load(f)["tasks"]
    assert tasks["zero_shot"]["num_classes"] == 30 and tasks["linear_probe"]["train_samples"] == 300
    assert "skipped" in tasks["localization"]  # shapes has one object per image: no localisation
