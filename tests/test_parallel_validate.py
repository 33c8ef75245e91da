"""validate_parallel_config: every problem listed in one ValueError, before any compute."""
import pytest

from rils_scale.models import build_model, get_config
from rils_scale.models.transformer import ParallelSpec
from rils_scale.parallel import ParallelDims
from rils_scale.parallel.validate import validate_parallel_config


@pytest.mark.parametrize("preset,world,tp", [("tiny", 2, 2), ("tiny", 4, 4), ("small", 6, 3), ("vit_b16", 8, 4),
                                             ("vit_l16", 16, 2), ("vit_h14", 8, 4), ("vit_g14", 8, 8)])
def test_valid_layouts(preset, world, tp):
    notes = validate_parallel_config(get_config(preset), ParallelDims(world, tp, tp > 1))
    assert all("padded" in n for n in notes)


def test_world_not_divisible_is_reported_with_model_problems():
    with pytest.raises(ValueError) as err:
        validate_parallel_config(get_config("tiny"), {"world_size": 6, "tensor_parallel": 4})
    msg = str(err.value)
    assert "world size 6 is not divisible by --tensor-parallel 4" in msg
    # tiny has 4 heads and hidden 256, which TP=4 divides: nothing else is reported
    assert msg.count("\n  - ") == 1


def test_heads_not_divisible_lists_every_tower():
    with pytest.raises(ValueError) as err:
        validate_parallel_config(get_config("tiny"), ParallelDims(3, 3))
    msg = str(err.value)
    for tower in ("vision encoder", "RILS decoder", "text tower"):
        assert f"{tower}: 4 attention heads are not divisible by --tensor-parallel 3" in msg
        assert f"{tower}: MLP hidden size 256 is not divisible by --tensor-parallel 3" in msg


def test_text_heads_only():
    cfg = get_config("small")  # 6 and 6 heads
    cfg.text.heads = 8
    cfg.text.width = 512
    with pytest.raises(ValueError) as err:
        validate_parallel_config(cfg, ParallelDims(3, 3))
    msg = str(err.value)
    assert "text tower: 8 attention heads" in msg and "vision encoder" not in msg


def test_mlp_hidden_not_divisible():
    cfg = get_config("tiny")
    cfg.vision.mlp_ratio = 4.03125  # hidden 258
    with pytest.raises(ValueError, match="vision encoder: MLP hidden size 258 is not divisible"):
        validate_parallel_config(cfg, ParallelDims(4, 4))


def test_sequence_parallel_needs_tp_and_vocab_is_padded():
    with pytest.raises(ValueError, match="--sequence-parallel needs --tensor-parallel > 1"):
        validate_parallel_config(get_config("tiny"), {"world_size": 2, "tensor_parallel": 1,
                                                      "sequence_parallel": True})
    cfg = get_config("small")
    cfg.text.vocab_size = 1001
    notes = validate_parallel_config(cfg, ParallelDims(3, 3))
    assert any("padded to 1002" in n for n in notes)


def test_validation_agrees_with_model_construction():
    """Whatever validation accepts builds; what the layers reject, validation rejects too."""
    cfg = get_config("tiny")

    class FakeGroupSpec(ParallelSpec):  # tp_size without a process group: construction only
        @property
        def tp_size(self):
            return 3

    with pytest.raises(ValueError):
        validate_parallel_config(cfg, ParallelDims(3, 3))
    with pytest.raises(ValueError, match="not divisible by --tensor-parallel 3"):
        build_model(cfg, FakeGroupSpec())
