"""The resume-time warning when the global batch changes (e.g. after convert_checkpoint.py
--format deepspeed --tensor-parallel N); the real resume is checked in test_checkpoint_export.py."""
import json

from rils_scale.train.resume_checks import global_batch_change


def test_global_batch_change_is_one_clear_line(tmp_path):
    assert global_batch_change(str(tmp_path), 32, 1, 2, 10) is None  # no config.json: nothing to compare
    (tmp_path / "config.json").write_text(json.dumps({
        "global_batch_size": 128, "parallel": {"data_parallel": 4},
        "deepspeed": {"train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 1}}))
    assert global_batch_change(str(tmp_path), 32, 2, 2, 10) is None  # 32 x 2 x 2 = 128: unchanged
    note = global_batch_change(str(tmp_path), 32, 1, 2, 10)
    assert note == ("[rils_scale] warning: the global batch changes from 128 (micro 32 x accumulation 1 x DP 4) "
                    "to 64 (micro 32 x accumulation 1 x DP 2) at step 10: each step from here sees 64 samples; "
                    "keep 128 with --micro-batch-size / --grad-accum, or scale --lr")
    assert "\n" not in note
