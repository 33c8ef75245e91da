#!/usr/bin/env python
"""RILS pre-training entry point.

    deepspeed --num_gpus 8 launchers/pretrain.py --ds_config ds_configs/zero3.json \\
        --model vit_b16 --train-data /data/laion/{00000..09999}.tar --tokenizer tok.model \\
        --output-dir runs/b16

On a CPU machine `deepspeed --num_gpus 2 ...` starts 2 CPU ranks (gloo; fp32 unless the CPU has
native bf16 or --precision bf16 asks). `torchrun --nproc_per_node N launchers/pretrain.py ...`
works the same way, and a plain `python launchers/pretrain.py ...` runs as one rank.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rils_scale.train.config import parse_args  # noqa: E402
from rils_scale.train.loop import train  # noqa: E402


def main(argv=None):
    train(parse_args(argv))


if __name__ == "__main__":
    main()
