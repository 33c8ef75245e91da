"""The pre-training loop: data -> engine -> objective, logging, checkpoints, resume, signals."""
from __future__ import annotations

import glob
import logging
import os
import shutil
import signal
import threading
import time
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..data.transforms import prepare_images
from ..models import get_config
from ..objectives import LossConfig, RILSLoss
from ..parallel import ParallelDims, init_parallel_state
from ..parallel.mappings import all_reduce_no_grad
from .config import TrainConfig, load_ds_config, resolve_batch_sizes
from .engine import build_engine, compute_dtype, zero_stage
from .metrics import MetricsLogger, merge_skips, write_json

log = logging.getLogger("rils_scale.train")


class StopRequest:
    """SIGTERM / SIGUSR1 set a flag; the loop checkpoints at the next step boundary and exits.

    All ranks agree through a MAX all-reduce of the flag, so a signal that reached only some
    ranks (or reached them at different steps) still stops everyone at the same step.
    """

    def __init__(self):
        self.requested = False
        self.signal_name = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        flag = torch.tensor(1.0 if self.requested else 0.0)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


class DataWaitWatchdog:
    """Says so, every ``interval`` seconds, while a rank waits for its next batch: a stalled
    loader (an unreachable pipe: URL, a dead NFS mount) shows in the log instead of a silent hang."""

    def __init__(self, rank: int, interval: float):
        self.rank, self.interval, self.timer, self.start = rank, interval, None, 0.0

    def _warn(self):
        waited = time.perf_counter() - self.start
        print(f"[rils_scale] rank {self.rank}: still waiting for data after {waited:.0f}s "
              "(check the shards, the workers and the storage)", flush=True)
        self._arm()

    def _arm(self):
        self.timer = threading.Timer(self.interval, self._warn)
        self.timer.daemon = True
        self.timer.start()

    def __enter__(self):
        self.start = time.perf_counter()
        if self.interval > 0:
            self._arm()
        return self

    def __exit__(self, *exc):
        if self.timer is not None:
            self.timer.cancel()


def mask_generator(seed: int, dp_rank: int, micro_step: int) -> torch.Generator:
    """Masks depend only on (seed, DP rank, micro-step): identical on TP peers, exact on resume."""
    state = np.random.SeedSequence([seed, dp_rank, micro_step]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def checkpoint_dir(cfg: TrainConfig) -> str:
    return os.path.join(cfg.output_dir, "checkpoints")


def _prune_checkpoints(directory: str, keep: int) -> None:
    if keep <= 0:
        return
    tags = sorted(glob.glob(os.path.join(directory, "global_step*")),
                  key=lambda p: int(p.rsplit("global_step", 1)[1]))
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.cfg = cfg
        if get_accelerator().device_name() == "cuda":  # srun launches set no device for us
            get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", max(cfg.local_rank, 0))))
        elif "OMP_NUM_THREADS" not in os.environ:
            # CPU ranks share the cores: oversubscribed OpenMP threads spin against each other
            # (measured here: 2 ranks x 2 threads on 2 cores ran 5-10x slower than 2 x 1).
            local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.is_main = self.rank == 0
        # Validate everything that can be validated before any process group or compute.
        self.tokenizer = self._load_tokenizer()
        self.model_cfg = get_config(cfg.model, mask_ratio=cfg.mask_ratio)
        self.model_cfg.text.vocab_size = self.tokenizer.vocab_size
        self._validate()
        dims = ParallelDims(self.world, cfg.tensor_parallel, cfg.sequence_parallel)
        self.ds_config = resolve_batch_sizes(load_ds_config(cfg), dims.data_parallel)

        self.state = init_parallel_state(cfg.tensor_parallel, cfg.sequence_parallel)
        self.engine, self.spec = build_engine(cfg, self.model_cfg, self.ds_config, self.state)
        self.device = self.engine.device
        self.dtype = compute_dtype(self.ds_config)
        self.micro_batch = self.engine.train_micro_batch_size_per_gpu()
        self.grad_accum = self.engine.gradient_accumulation_steps()
        self.global_batch = self.micro_batch * self.grad_accum * self.state.dp_size
        self.objective = RILSLoss(LossConfig(
            student_temp=cfg.student_temp, teacher_temp=cfg.teacher_temp, recon_weight=cfg.recon_weight,
            prototype_grad=cfg.prototype_grad, retrieval_filter=not cfg.no_retrieval_filter,
            kl_backend=cfg.kl_backend), dp_group=self.state.dp_group,
            tp_group=self.state.tp_group if self.state.tp_size > 1 else None)
        self.step = 0
        self.batches_consumed = 0
        self.skipped: Dict[str, int] = {}
        self.skipped_before_resume: Dict[str, int] = {}
        self.loader_resume = None  # saved loader state (data/loader_state.py), set by maybe_resume
        self.loader = None
        self.flops_per_step = self._flops_per_step()

    # ------------------------------------------------------------------ set-up helpers
    def _load_tokenizer(self):
        from ..data.tokenizer import Tokenizer
        if not self.cfg.tokenizer or not os.path.exists(self.cfg.tokenizer):
            raise SystemExit(f"--tokenizer {self.cfg.tokenizer!r} not found "
                             "(train one with launchers/train_tokenizer.py)")
        return Tokenizer.load(self.cfg.tokenizer)

    def _validate(self) -> None:
        """Every problem of the model x parallel layout in one message, before any compute."""
        from ..parallel.validate import validate_parallel_config
        try:
            notes = validate_parallel_config(self.model_cfg, {
                "world_size": self.world, "tensor_parallel": self.cfg.tensor_parallel,
                "sequence_parallel": self.cfg.sequence_parallel})
        except ValueError as err:
            raise SystemExit(f"invalid configuration: {err}") from None
        for note in notes if self.is_main else ():
            log.info(note)

    def _flops_per_step(self, recon_rows_fraction: float = 1.0) -> Optional[Dict]:
        try:
            from .flops import rils_step_flops
            return rils_step_flops(self.model_cfg, self.micro_batch, self.micro_batch * self.state.dp_size,
                                   activation_checkpointing=self.cfg.activation_checkpointing,
                                   tensor_parallel=self.state.tp_size, recon_rows_fraction=recon_rows_fraction,
                                   prototype_grad=self.cfg.prototype_grad)
        except Exception as exc:  # MFU is a report, never a reason to stop training
            log.warning("FLOP accounting unavailable: %s", exc)
            return None

    def _loader(self):
        from ..data.pipeline import build_train_loader
        return build_train_loader(
            self.cfg.train_data, self.tokenizer, image_size=self.model_cfg.vision.image_size,
            context_length=self.model_cfg.text.context_length, batch_size=self.micro_batch,
            dp_rank=self.state.dp_rank, dp_size=self.state.dp_size, num_workers=self.cfg.num_workers,
            seed=self.cfg.seed, shuffle_buffer=self.cfg.shuffle_buffer, resampled=self.cfg.resampled,
            start_batch=self.batches_consumed, resume=self.loader_resume)

    def _write_run_config(self) -> None:
        if not self.is_main:
            return
        os.makedirs(self.cfg.output_dir, exist_ok=True)
        tok_copy = os.path.join(self.cfg.output_dir, "tokenizer.model")
        if os.path.abspath(self.cfg.tokenizer) != os.path.abspath(tok_copy):
            shutil.copyfile(self.cfg.tokenizer, tok_copy)
        write_json(os.path.join(self.cfg.output_dir, "config.json"), {
            "train": self.cfg.to_dict(), "model": self.model_cfg.to_dict(), "deepspeed": self.ds_config,
            "parallel": {"world_size": self.world, "tensor_parallel": self.state.tp_size,
                         "data_parallel": self.state.dp_size, "sequence_parallel": self.cfg.sequence_parallel,
                         "zero_stage": zero_stage(self.ds_config)},
            "global_batch_size": self.global_batch, "tokenizer": "tokenizer.model",
        })

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        directory = checkpoint_dir(self.cfg)
        total_skips = self._global_skips()
        self.engine.save_checkpoint(directory, tag=f"global_step{self.step}", client_state={
            "step": self.step, "batches_consumed": self.batches_consumed, "skipped": total_skips,
            "model_config": self.model_cfg.to_dict(), "tensor_parallel": self.state.tp_size,
        })
        if self.state.tp_rank == 0 and self.loader is not None:  # TP peers read the same data
            from ..data.loader_state import write_loader_state
            write_loader_state(os.path.join(directory, f"global_step{self.step}"), self.loader.state_dict())
        if self.is_main:
            _prune_checkpoints(directory, self.cfg.keep_checkpoints)
            print(f"[rils_scale] checkpoint saved: {directory}/global_step{self.step}", flush=True)
        dist.barrier()

    def maybe_resume(self) -> None:
        directory = checkpoint_dir(self.cfg)
        if not self.cfg.resume:
            return
        if not os.path.exists(os.path.join(directory, "latest")):
            if self.is_main:
                print(f"[rils_scale] --resume: no checkpoint in {directory}, starting fresh", flush=True)
            return
        from ..checkpoint.resume import load_weights_only_checkpoint, weights_only_tag
        if weights_only_tag(directory) is not None:  # written by convert_checkpoint.py --format deepspeed
            path, client = load_weights_only_checkpoint(self.engine, directory, self.state.tp_rank, self.state.tp_size)
        else:
            path, client = self.engine.load_checkpoint(directory)
        if path is None:
            raise SystemExit(f"could not load the checkpoint in {directory}")
        if client.get("tensor_parallel", 1) != self.state.tp_size:
            raise SystemExit(f"checkpoint was written with --tensor-parallel {client.get('tensor_parallel')}, "
                             f"this run uses {self.state.tp_size}: convert it with "
                             "launchers/convert_checkpoint.py --format deepspeed --tensor-parallel N")
        self.step = int(client["step"])
        self.batches_consumed = int(client["batches_consumed"])
        self.skipped_before_resume = dict(client.get("skipped", {}))
        from ..data.loader_state import read_loader_states
        tag_dir = path if os.path.isdir(path) else os.path.dirname(path)
        self.loader_resume = read_loader_states(tag_dir, self.state.dp_rank)  # None: replay
        if self.is_main:
            print(f"[rils_scale] resumed from {path} at step {self.step}", flush=True)

    def _global_skips(self) -> Dict[str, int]:
        """Skip counts summed over DP ranks (TP peers read the same data) plus earlier runs."""
        gathered = [None] * self.state.dp_size
        if self.state.dp_size > 1:
            dist.all_gather_object(gathered, self.skipped, group=self.state.dp_group)
        else:
            gathered = [self.skipped]
        total = dict(self.skipped_before_resume)
        for g in gathered:
            merge_skips(total, g)
        return total

    # ------------------------------------------------------------------ the loop
    def train_step(self, batches) -> Dict[str, float]:
        sums: Dict[str, float] = {}
        wait = 0.0
        for _ in range(self.grad_accum):
            t0 = time.perf_counter()
            with DataWaitWatchdog(self.rank, self.cfg.data_wait_warning_s):
                batch = next(batches)
            wait += time.perf_counter() - t0
            merge_skips(self.skipped, batch.get("skipped"))
            images = prepare_images(batch["images"], self.device, self.dtype)
            token_ids = batch["token_ids"].to(self.device, non_blocking=True)
            out = self.engine(images, token_ids, mask_generator=mask_generator(
                self.cfg.seed, self.state.dp_rank, self.batches_consumed),
                mask_strategy=self.cfg.mask_strategy, mask_temperature=self.cfg.mask_temperature)
            loss, metrics = self.objective(out)
            self.engine.backward(loss)
            self.engine.step()
            self.batches_consumed += 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        avg = {k: v / self.grad_accum for k, v in sums.items()}
        avg["data_wait_s"] = wait
        return avg

    def _reduce_metrics(self, m: Dict[str, float]) -> Dict[str, float]:
        keys = sorted(m)
        vec = all_reduce_no_grad(torch.tensor([m[k] for k in keys], dtype=torch.float64), self.state.dp_group)
        out = dict(zip(keys, vec.tolist()))
        dp = self.state.dp_size
        recon = out.pop("recon_loss_share")  # shares of the global mean: sum, not average
        out = {k: v / dp for k, v in out.items()}
        out["recon_loss"] = recon
        out["loss"] = out["clip_loss"] + self.cfg.recon_weight * recon
        return out

    def run(self) -> None:
        cfg = self.cfg
        self.maybe_resume()
        self._write_run_config()
        logger = MetricsLogger(cfg.output_dir, self.is_main, cfg.max_steps, resume=cfg.resume)
        stop = StopRequest()
        self.loader = self._loader()
        if self.is_main and self.step:
            print(f"[rils_scale] data resume: {self.loader.resume_mode}", flush=True)
        try:
            self._run_loop(logger, stop, iter(self.loader))
        finally:  # a raising step must not leave workers that block this rank's exit
            self.loader.close()

    def _run_loop(self, logger: MetricsLogger, stop: StopRequest, batches) -> None:
        cfg = self.cfg
        steps_this_run, window_start, window_steps = 0, time.perf_counter(), 0
        if self.is_main:
            print(f"[rils_scale] model {cfg.model}: world {self.world} = DP {self.state.dp_size} x TP "
                  f"{self.state.tp_size}, ZeRO-{zero_stage(self.ds_config)}, {self.dtype}, global batch "
                  f"{self.global_batch}, steps {self.step}->{cfg.max_steps}", flush=True)
        exit_reason = "finished"
        while self.step < cfg.max_steps:
            m = self.train_step(batches)
            self.step += 1
            steps_this_run += 1
            window_steps += 1
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                m = self._reduce_metrics(m)
                elapsed = time.perf_counter() - window_start
                m["samples_per_s"] = window_steps * self.global_batch / max(elapsed, 1e-9)
                m["step_time_s"] = elapsed / window_steps
                m["lr"] = self.engine.get_lr()[0]
                m.update(self._perf_metrics(m["step_time_s"], m["recon_keep_frac"]))
                skips = self._global_skips()
                m["skipped_samples"] = sum(skips.values())
                m.update({f"skipped/{k}": v for k, v in sorted(skips.items())})
                logger.log(self.step, m)
                logger.progress(self.step, m, steps_this_run)
                window_start, window_steps = time.perf_counter(), 0
            if cfg.visualize_every and self.step % cfg.visualize_every == 0:
                self._visualize(logger)
            stopping = stop.agreed()
            if stopping:
                exit_reason = f"signal {stop.signal_name or '(peer)'}"
            elif cfg.exit_after_steps and steps_this_run >= cfg.exit_after_steps and self.step < cfg.max_steps:
                stopping, exit_reason = True, f"--exit-after-steps {cfg.exit_after_steps}"
            if stopping or self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                self.save()
            if stopping:
                break
        logger.close()
        if self.is_main:
            print(f"[rils_scale] stopped at step {self.step}: {exit_reason}", flush=True)

    def _perf_metrics(self, step_time: float, keep_fraction: float) -> Dict[str, float]:
        out: Dict[str, float] = {}
        try:
            from .hardware import peak_memory_bytes
            out["peak_mem_gb"] = peak_memory_bytes() / 2 ** 30
        except Exception:
            pass
        if self.flops_per_step is None:
            return out
        # Count the reconstruction rows actually computed (the retrieval filter drops rows).
        flops = self._flops_per_step(keep_fraction)["total"] * self.grad_accum
        out["tflops_per_device"] = flops / step_time / 1e12
        peak = self._peak_tflops()
        if peak:
            out["mfu"] = out["tflops_per_device"] / peak
            out["peak_tflops"] = peak
        return out

    def _peak_tflops(self) -> Optional[float]:
        """--peak-tflops, else the datasheet table, else (CPUs, unknown GPUs) this device's
        measured matmul rate, decided once per run and announced."""
        if not hasattr(self, "_peak"):
            from .hardware import device_name, measured_matmul_tflops, peak_tflops
            name = device_name()
            peak, source = self.cfg.peak_tflops, "--peak-tflops"
            if not peak:
                peak, source = peak_tflops(name, "bf16" if self.dtype != torch.float32 else "fp32"), "datasheet"
            if not peak:
                peak, source = measured_matmul_tflops(self.dtype), "measured matmul rate"
            self._peak = peak
            if self.is_main:
                print(f"[rils_scale] MFU denominator: {peak:.3f} TFLOP/s per device ({source}, {name})", flush=True)
        return self._peak

    def _visualize(self, logger: MetricsLogger) -> None:
        try:
            from ..eval.visualize import training_visualization
        except ImportError:
            return
        training_visualization(self, logger)


def train(cfg: TrainConfig) -> None:
    import warnings
    # DeepSpeed 0.19 calls collectives that torch 2.14 renamed; the warning repeats every step.
    warnings.filterwarnings("ignore", message=r".*`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
                        format="[%(asctime)s] %(name)s: %(message)s")
    Trainer(cfg).run()
