"""CPU cost per training sample: decode, decode + transform, the loader (old vs new), webdataset.

    python benchmarks/bench_data.py [--samples 384] [--rounds 1] [--baseline-ref 0684967]

Data: 512x384 JPEGs (smooth noise, quality 90) in tar shards, the train transform at 224.
Every case runs in its own subprocess (interleaved over rounds); CPU time is that process's
user+sys plus its DataLoader workers' (children, joined before measuring), divided by samples,
so it is CPU ms per sample whatever the worker count. ``old loader`` is the project's loader at
``--baseline-ref`` (extracted with ``git archive``), ``webdataset`` the pipeline as OpenCLIP
builds it (tarfile_to_samples -> shuffle -> decode pilrgb -> RandomResizedCrop/ToTensor/
Normalize -> batched, WebLoader).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ["decode", "decode+old transform", "decode+new transform", "old loader/1", "new loader/1",
         "webdataset/1", "old loader/2", "new loader/2", "webdataset/2"]


def make_data(root: str, samples: int) -> tuple[str, str]:
    import numpy as np
    from PIL import Image
    sys.path.insert(0, REPO)
    from rils_scale.data import ShardWriter, train_tokenizer
    rng = np.random.default_rng(0)
    with ShardWriter(os.path.join(root, "shards"), 64) as writer:
        for i in range(samples):
            small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((512, 384), Image.BICUBIC)
            writer.write(image, f"a photo of thing {i % 50}", ext="jpg")
    tok = train_tokenizer([f"a photo of thing {i}" for i in range(50)], os.path.join(root, "tok"), vocab_size=64)
    return os.path.join(root, "shards"), str(tok)


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def run_case(case: str, shards: str, tok: str, samples: int) -> dict:
    import glob
    import io
    import random
    urls = sorted(glob.glob(os.path.join(shards, "*.tar")))
    name, _, workers = case.partition("/")
    workers = int(workers or 0)
    import tarfile  # imports outside the timed region
    import torch  # noqa: F401
    import webdataset  # noqa: F401
    from PIL import Image  # noqa: F401
    from rils_scale.data import build_train_loader  # noqa: F401
    from torchvision import transforms  # noqa: F401
    start_cpu, start = _cpu(), time.perf_counter()
    if name.startswith("decode"):
        import tarfile
        from PIL import Image
        from rils_scale.data.transforms import CropResize, TrainTransform
        old, new = TrainTransform(224), CropResize(224)
        done = 0
        for url in urls:
            with tarfile.open(url) as archive:
                for member in archive:
                    if not member.name.endswith(".jpg"):
                        continue
                    data = archive.extractfile(member).read()
                    rng = random.Random(done)
                    if name == "decode":
                        Image.open(io.BytesIO(data)).convert("RGB")
                    elif name == "decode+old transform":
                        old(Image.open(io.BytesIO(data)).convert("RGB"), rng)
                    else:
                        new(data, rng)
                    done += 1
    elif name in ("old loader", "new loader"):
        from rils_scale.data import Tokenizer, build_train_loader
        loader = build_train_loader(urls, Tokenizer.load(tok), image_size=224, context_length=77, batch_size=32,
                                    dp_rank=0, dp_size=1, num_workers=workers, seed=0, shuffle_buffer=256)
        done = 0
        while done < samples:
            done += len(next(loader)["keys"])
        loader.close()
    else:
        import webdataset as wds
        from torchvision import transforms as T
        from rils_scale.data import Tokenizer
        from rils_scale.data.transforms import CLIP_MEAN, CLIP_STD
        tokenizer = Tokenizer.load(tok)
        pre = T.Compose([T.RandomResizedCrop(224, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                         T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls), wds.split_by_worker, wds.tarfile_to_samples(handler=wds.warn_and_continue),
            wds.shuffle(256, initial=64), wds.decode("pilrgb", handler=wds.warn_and_continue),
            wds.rename(image="jpg;png;jpeg;webp", text="txt"),
            wds.map_dict(image=pre, text=lambda t: tokenizer([t], 77)[0]), wds.to_tuple("image", "text"),
            wds.batched(32, partial=False))
        loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers,
                               persistent_workers=False)
        done = 0
        while done < samples:
            for images, _ in loader:
                done += len(images)
                if done >= samples:
                    break
        del loader
    wall = time.perf_counter() - start
    import gc
    gc.collect()
    return {"cpu_ms": (_cpu() - start_cpu) * 1e3 / done, "samples_per_s": done / wall, "samples": done}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--baseline-ref", default="0684967", help="git ref of the 'old loader'")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--data", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, *args.data, args.samples)))
        return 0
    with tempfile.TemporaryDirectory() as root:
        shards, tok = make_data(root, args.samples)
        old_tree = os.path.join(root, "old")
        os.makedirs(old_tree)
        archive = subprocess.run(["git", "-C", REPO, "archive", args.baseline_ref, "rils_scale"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", old_tree], input=archive, check=True)
        results = {c: [] for c in CASES}
        for _ in range(args.rounds):
            for case in CASES:
                path = old_tree if case.startswith("old loader") else REPO
                out = subprocess.run([sys.executable, __file__, "--case", case, "--data", shards, tok,
                                      "--samples", str(args.samples)], capture_output=True, text=True,
                                     env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"})
                if out.returncode != 0:
                    print(f"{case}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                    return 1
                results[case].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"| case | CPU ms/sample | samples/s (wall) |\n|---|---|---|")
        for case in CASES:
            cpu = min(r["cpu_ms"] for r in results[case])
            rate = max(r["samples_per_s"] for r in results[case])
            print(f"| {case} | {cpu:.2f} | {rate:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
