"""The README's listing example on small data: make_shards.py says when its shards are too few
for 2 ranks x 2 workers and which --shard-size would do, and the trainer's preflight refusal
states the rule (shards >= nodes x GPUs x --num-workers) and the shard size that would work."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_shards(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "launchers", "make_shards.py"), *args],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO})


def test_small_listing_gets_the_rule_and_a_shard_size(tmp_path):
    from PIL import Image
    from rils_scale.train.preflight import PreflightError, check_shards
    lines = ["image,caption"]
    for i in range(12):
        Image.new("RGB", (16, 16), (20 * i, 0, 0)).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,a red square number {i}")
    (tmp_path / "listing.csv").write_text("\n".join(lines) + "\n")
    proc = _make_shards("--input", str(tmp_path / "listing.csv"), "--output", str(tmp_path / "big"),
                        "--shard-size", "10000")  # the README's example, on 12 images
    assert proc.returncode == 0, proc.stderr
    assert "wrote 12 samples in 1 shard(s)" in proc.stdout
    assert "shards >= nodes x GPUs per node x --num-workers" in proc.stdout and "--shard-size 3" in proc.stdout
    with pytest.raises(PreflightError) as refused:
        check_shards(str(tmp_path / "big"), dp_size=2, num_workers=2, announce=False)
    message = str(refused.value)
    assert "1 shard(s) cannot feed 2 data-parallel rank(s) x 2 worker(s)" in message
    assert "Rule: shards >= nodes x GPUs per node x --num-workers (here 4)" in message
    assert "hold 12 samples, so --shard-size 3" in message
    # with the size it suggested, the same check passes
    proc = _make_shards("--input", str(tmp_path / "listing.csv"), "--output", str(tmp_path / "small"),
                        "--shard-size", "3")
    assert proc.returncode == 0 and "note:" not in proc.stdout
    assert len(check_shards(str(tmp_path / "small"), dp_size=2, num_workers=2, announce=False)) == 4
