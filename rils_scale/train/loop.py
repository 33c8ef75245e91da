"""The pre-training loop: data -> engine -> objective, logging, checkpoints, resume, signals."""
from __future__ import annotations

import datetime
import logging
import os
import sys
import time
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..data.transforms import prepare_images
from ..models import get_config
from ..objectives import LossConfig, RILSLoss
from ..parallel import ParallelDims, init_parallel_state
from ..parallel import comm, cpu_comm
from .config import TrainConfig, load_ds_config, resolve_batch_sizes
from .engine import build_engine, compute_dtype, zero_stage
from .recompute import resolve_activation_checkpointing
from . import checkpointing, recipe
from .guard import EXIT_NONFINITE, NonFiniteAbort, NonFiniteGuard
from .launch_env import ensure_launch_env
from .metrics import MetricsLogger, merge_skips, write_json
from .param_clamp import clamp_logit_scale_
from .precision import resolve_precision
from .resume_checks import global_batch_change
from .signals import DataWaitWatchdog, LauncherWatch, StopRequest

log = logging.getLogger("rils_scale.train")


def mask_generator(seed: int, dp_rank: int, micro_step: int) -> torch.Generator:
    """Masks depend only on (seed, DP rank, micro-step): identical on TP peers, exact on resume."""
    state = np.random.SeedSequence([seed, dp_rank, micro_step]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def checkpoint_dir(cfg: TrainConfig) -> str:
    return os.path.join(cfg.output_dir, "checkpoints")


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
        if get_accelerator().device_name() == "cpu":  # says what is built; once per environment
            cpu_comm.prepare_cpu_comm_build(announce=int(os.environ.get("LOCAL_RANK", "0")) == 0)
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   timeout=datetime.timedelta(seconds=cfg.collective_timeout_s))
        cpu_comm.release_shm_buffer_once_mapped()  # no /dev/shm name outlives this run, however it ends
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.is_main = self.rank == 0
        from .run_dir import claim, resolve_tokenizer
        self.run_lock = claim(cfg, self.is_main)  # one writer: before anything is written into output_dir
        resolve_tokenizer(cfg)  # --resume without --tokenizer: the run's own copy
        # Validate everything that can be validated before any process group or compute.
        self.tokenizer = self._load_tokenizer()
        self.model_cfg = get_config(cfg.model, mask_ratio=cfg.mask_ratio, recon_target=cfg.recon_target,
                                    decoder_text_conditioning=cfg.decoder_text_conditioning)
        self.model_cfg.text.vocab_size = self.tokenizer.vocab_size
        recipe.configure_model(cfg, self.model_cfg)
        self._validate()
        self._preflight()
        dims = ParallelDims(self.world, cfg.tensor_parallel, cfg.sequence_parallel)
        self.ds_config = resolve_batch_sizes(load_ds_config(cfg), dims.data_parallel)
        # CPU: fp32 unless bf16 is native (or asked, or the resumed run trained in it)
        self.precision_note = resolve_precision(cfg.precision, self.ds_config, resume_dir=cfg.resume and cfg.output_dir)

        self.state = init_parallel_state(cfg.tensor_parallel, cfg.sequence_parallel, cfg.collective_timeout_s)
        self.checkpointing = resolve_activation_checkpointing(  # the planner's policy (train/recompute.py)
            cfg, self.model_cfg, self.ds_config, self.state, get_accelerator().device_name())
        if self.is_main:
            print(f"[rils_scale] {self.checkpointing.line()}", flush=True)
        self.engine, self.spec = build_engine(cfg, self.model_cfg, self.ds_config, self.state,
                                              self.checkpointing.fraction)
        self.device = self.engine.device
        self.dtype = compute_dtype(self.ds_config)
        self.micro_batch = self.engine.train_micro_batch_size_per_gpu()
        self.grad_accum = self.engine.gradient_accumulation_steps()
        self.global_batch = self.micro_batch * self.grad_accum * self.state.dp_size
        self.objective = RILSLoss(LossConfig(
            student_temp=cfg.student_temp, teacher_temp=cfg.teacher_temp, recon_weight=cfg.recon_weight,
            prototype_grad=cfg.prototype_grad, retrieval_filter=not cfg.no_retrieval_filter,
            kl_backend=cfg.kl_backend, recon_target=cfg.recon_target), dp_group=self.state.dp_group,
            tp_group=self.state.tp_group if self.state.tp_size > 1 else None)
        self.step = 0
        self.batches_consumed = 0
        self.skipped: Dict[str, int] = {}
        self.skipped_before_resume: Dict[str, int] = {}
        self.guard = NonFiniteGuard(cfg.max_nonfinite_steps, self.is_main)
        self.resume_point: Optional[checkpointing.ResumePoint] = None  # .path: the resumed tag directory
        # Per-rank hook ``fn(tag_dir)`` writing extra files into a checkpoint before it is marked
        # complete (e.g. the loader state of each DP rank).
        self.write_checkpoint_extra = self._write_loader_state
        self.loader_resume = None  # saved loader state (data/loader_state.py), set by maybe_resume
        self.loader = None
        self.skip_windows = []  # --skip-batches plus the resumed checkpoint's windows (train/rollback.py)
        self.rollbacks = []  # roll backs in this run's lineage (train/rollback.py)
        self.pending_events = []  # metrics.jsonl event rows decided before the logger exists
        self.flops_per_step = self._flops_per_step()
        self.recipe = recipe.attach(self)  # SemMIM: its objective, momentum EMA, checkpoint state (train/recipe.py)

    # ------------------------------------------------------------------ set-up helpers
    def _load_tokenizer(self):
        from ..data.tokenizer import Tokenizer
        if not self.cfg.tokenizer and self.cfg.resume:
            raise SystemExit(f"--resume: {self.cfg.output_dir} has no tokenizer.model of its own: pass --tokenizer")
        if not self.cfg.tokenizer or not os.path.exists(self.cfg.tokenizer):
            raise SystemExit(f"--tokenizer {self.cfg.tokenizer!r} not found "
                             "(train one with launchers/train_tokenizer.py)")
        from .run_dir import file_sha256
        self.tokenizer_sha256 = file_sha256(self.cfg.tokenizer)  # the tokenizer is part of the run
        return Tokenizer.load(self.cfg.tokenizer)

    def _validate(self) -> None:
        """Every problem of the model x parallel layout in one message, before any compute."""
        from ..parallel.topology import describe_nodes, gather_node_identities
        from ..parallel.validate import validate_node_layout, validate_parallel_config
        nodes = gather_node_identities()  # every rank gets every rank's node: all refuse together
        try:
            notes = validate_parallel_config(self.model_cfg, {
                "world_size": self.world, "tensor_parallel": self.cfg.tensor_parallel,
                "sequence_parallel": self.cfg.sequence_parallel})
            validate_node_layout(nodes, self.cfg.tensor_parallel)
        except ValueError as err:
            raise SystemExit(f"invalid configuration: {err}") from None
        notes = notes + [describe_nodes(nodes)] if len(set(nodes)) > 1 else notes
        for note in notes if self.is_main else ():
            log.info(note)

    def _preflight(self) -> None:
        """Bad shards and a tokenizer that does not fit the checkpoint: before any engine."""
        from .preflight import check_shards
        check_shards(self.cfg.train_data, dp_size=self.world // max(1, self.cfg.tensor_parallel),
                     num_workers=self.cfg.num_workers, resampled=self.cfg.resampled, announce=self.is_main)
        if self.cfg.resume:  # the tag to load; tokenizer and model must be the run's (train/resume_checks.py)
            from .resume_checks import check_resume
            self.resume_choice = check_resume(self.cfg, self.cfg.tokenizer, self.tokenizer_sha256,
                                              self.tokenizer.vocab_size, self.model_cfg.to_dict(), self.is_main)

    def _flops_per_step(self, recon_rows_fraction: float = 1.0) -> Optional[Dict]:
        try:
            from .flops import rils_step_flops
            return rils_step_flops(self.model_cfg, self.micro_batch, self.micro_batch * self.state.dp_size,
                                   activation_checkpointing=self.checkpointing.fraction,
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
        from .run_dir import install_run_tokenizer
        os.makedirs(self.cfg.output_dir, exist_ok=True)
        warning = install_run_tokenizer(self.cfg.output_dir, self.cfg.tokenizer, self.tokenizer_sha256)
        if warning:
            print(f"[rils_scale] WARNING: {warning}", flush=True)
        write_json(os.path.join(self.cfg.output_dir, "config.json"), {
            "train": self.cfg.to_dict(), "model": self.model_cfg.to_dict(), "deepspeed": self.ds_config,
            "parallel": {"world_size": self.world, "tensor_parallel": self.state.tp_size,
                         "data_parallel": self.state.dp_size, "sequence_parallel": self.cfg.sequence_parallel,
                         "activation_checkpointing": {k: getattr(self.checkpointing, k) for k in ("policy", "fraction")},
                         "zero_stage": zero_stage(self.ds_config)},
            "global_batch_size": self.global_batch, "tokenizer": "tokenizer.model",
            "tokenizer_sha256": self.tokenizer_sha256, "skip_batches": [list(w) for w in self.skip_windows],
            "resumed_from": self.resume_point.tag if self.resume_point else None,
        })

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        checkpointing.save(self, client_state={
            "step": self.step, "batches_consumed": self.batches_consumed, "skipped": self._global_skips(),
            "nonfinite_steps": self.guard.total,
            "model_config": self.model_cfg.to_dict(), "tensor_parallel": self.state.tp_size,
            "tokenizer_sha256": self.tokenizer_sha256, "skip_batches": [list(w) for w in self.skip_windows],
            "rollbacks": self.rollbacks,
        }, write_extra=self.write_checkpoint_extra)

    def _write_loader_state(self, tag_dir: str) -> None:
        if self.state.tp_rank == 0 and self.loader is not None:  # TP peers read the same data
            from ..data.loader_state import write_loader_state
            write_loader_state(tag_dir, self.loader.state_dict())

    def maybe_resume(self) -> None:
        from .rollback import parse_skip_batches
        self.skip_windows = parse_skip_batches(self.cfg.skip_batches)
        if not self.cfg.resume:
            return
        choice = self.resume_choice
        point = checkpointing.resume(self, choice.tag) if choice.tag else None
        if point is None:
            if self.is_main:
                print(f"[rils_scale] --resume: no checkpoint in {checkpoint_dir(self.cfg)}, starting fresh", flush=True)
            return
        client = point.client_state
        if client.get("tensor_parallel", 1) != self.state.tp_size:
            raise SystemExit(f"checkpoint was written with --tensor-parallel {client.get('tensor_parallel')}, "
                             f"this run uses {self.state.tp_size}: convert it with "
                             "launchers/convert_checkpoint.py --format deepspeed --tensor-parallel N")
        self.resume_point = point
        self.step = int(client["step"])
        self.batches_consumed = int(client["batches_consumed"])
        self.skipped_before_resume = dict(client.get("skipped", {}))
        self.guard.total = int(client.get("nonfinite_steps", 0))
        from ..data.loader_state import read_loader_states
        self.loader_resume = read_loader_states(point.path, self.state.dp_rank)  # None: replay
        from .rollback import combine_windows, roll_back
        self.skip_windows = combine_windows(client.get("skip_batches") or [], self.skip_windows,
                                            self.batches_consumed, point.path)
        self.rollbacks = list(client.get("rollbacks") or [])
        if self.is_main:
            print(f"[rils_scale] resumed from {point.path} at step {self.step} ({choice.why})", flush=True)
            note = global_batch_change(self.cfg.output_dir, self.micro_batch, self.grad_accum, self.state.dp_size,
                                       self.step)  # e.g. after a reshard
            if note:
                print(note, flush=True)
        if choice.newer:
            roll_back(self, point, choice.newer)

    def _global_skips(self) -> Dict[str, int]:
        """Skip counts summed over DP ranks (TP peers read the same data) plus earlier runs."""
        gathered = comm.all_gather_objects(self.skipped, self.state.dp_group)
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
            self.guard.observe_loss(loss)
            self.engine.backward(loss)
            self.engine.step()
            self.batches_consumed += 1
            for k, v in metrics.items():  # device tensors: no host sync until a logged step
                v = v.detach() if torch.is_tensor(v) else v
                sums[k] = sums[k] + v if k in sums else v
        avg = {k: v / self.grad_accum for k, v in sums.items()}
        avg["data_wait_s"] = wait
        # Not applied (non-finite loss / grad norm): the batches are consumed, the step number is not.
        avg["step_applied"] = self.guard.after_step(self.engine, self.step + 1)
        if avg["step_applied"]:
            clamp_logit_scale_(self.engine)  # the parameter itself stays <= the cap (train/param_clamp.py)
            if self.recipe is not None:
                self.recipe.after_step(self.step)  # SemMIM: the momentum encoder's EMA
        return avg

    def _reduce_metrics(self, m: Dict[str, float]) -> Dict[str, float]:
        keys = sorted(m)
        out = dict(zip(keys, comm.all_reduce_values([float(m[k]) for k in keys], self.state.dp_group)))
        dp = self.state.dp_size
        recon = out.pop("recon_loss_share")  # shares of the global mean: sum, not average
        out = {k: v / dp for k, v in out.items()}
        out["recon_loss"] = recon
        out["loss"] = out["clip_loss"] + self.cfg.recon_weight * recon + out.get("extra_loss", 0.0)
        return out

    def run(self) -> None:
        cfg = self.cfg
        self.maybe_resume()
        if self.recipe is not None:
            self.recipe.after_resume(self.resume_point)
        self._write_run_config()
        logger = MetricsLogger(cfg.output_dir, self.is_main, cfg.max_steps, start_step=self.step)
        for event in self.pending_events:
            logger.event(**event)
        stop = StopRequest()
        LauncherWatch(stop)
        self.loader = self._loader()
        if self.is_main and self.step:
            print(f"[rils_scale] data resume: {self.loader.resume_mode}", flush=True)
        from .rollback import SkippingBatches
        batches = SkippingBatches(iter(self.loader), self.skip_windows, self.batches_consumed,
                                  on_skip=lambda a, b, skipped: self._skipped_window(logger, a, b, skipped),
                                  announce=self.is_main)
        try:
            self._run_loop(logger, stop, batches)
        finally:  # a raising step must not leave workers that block this rank's exit
            self.loader.close()
        if self.run_lock is not None:  # after the last save's barrier: every rank is done writing
            self.run_lock.release()

    def _skipped_window(self, logger: MetricsLogger, start: int, end: int, skipped: Dict[str, int]) -> None:
        """--skip-batches: batches start..end-1 were read and dropped; the data position follows."""
        self.batches_consumed = end
        merge_skips(self.skipped, skipped)
        logger.event("skip_batches", self.step + 1, start=start, end=end)

    def _run_loop(self, logger: MetricsLogger, stop: StopRequest, batches) -> None:
        cfg = self.cfg
        steps_this_run, window_start, window_steps = 0, time.perf_counter(), 0
        if self.is_main:
            print(f"[rils_scale] model {cfg.model}: world {self.world} = DP {self.state.dp_size} x TP "
                  f"{self.state.tp_size}, ZeRO-{zero_stage(self.ds_config)}, {self.dtype}"
                  f"{f' ({self.precision_note})' if self.precision_note else ''}, global batch "
                  f"{self.global_batch}, steps {self.step}->{cfg.max_steps}", flush=True)
        exit_reason = "finished"
        while self.step < cfg.max_steps:
            m = self.train_step(batches)
            if not m.pop("step_applied"):
                if stop.agreed():  # a skipped step leaves the last checkpoint as it is
                    exit_reason = stop.describe()
                    break
                continue
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
                m["nonfinite_steps"] = self.guard.total
                m.update({f"skipped/{k}": v for k, v in sorted(skips.items())})
                logger.log(self.step, m)
                logger.progress(self.step, m, steps_this_run)
                window_start, window_steps = time.perf_counter(), 0
            if cfg.visualize_every and self.step % cfg.visualize_every == 0:
                self._visualize(logger)
            stopping = stop.agreed()
            if stopping:
                exit_reason = stop.describe()
            elif cfg.exit_after_steps and steps_this_run >= cfg.exit_after_steps and self.step < cfg.max_steps:
                stopping, exit_reason = True, f"--exit-after-steps {cfg.exit_after_steps}"
            final = self.step == cfg.max_steps and not cfg.no_final_checkpoint
            if stopping or self.step % cfg.save_every == 0 or final:
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
        out["model_tflop_per_step"] = flops / 1e12  # per device: what the code computes, rate-free
        out["tflops_per_device"] = flops / step_time / 1e12
        peak = self._peak_tflops()
        if peak:
            # Above 1 means the peak is wrong (or --peak-tflops too low): clamp, and say so once.
            mfu = out["tflops_per_device"] / peak
            if mfu > 1 and not getattr(self, "_mfu_warned", False) and self.is_main:
                print(f"[rils_scale] measured {out['tflops_per_device']:.3f} TFLOP/s exceeds the peak {peak}: "
                      "MFU capped at 100 % (check --peak-tflops)", flush=True)
                self._mfu_warned = True
            out["mfu"] = min(mfu, 1.0)
            out["peak_tflops"] = peak
        return out

    def _peak_tflops(self) -> Optional[float]:
        """--peak-tflops, else the datasheet table (known GPUs), else none: no MFU is reported.
        A rate measured on a CPU depends on whatever else runs on the machine (130-970 % MFU was
        seen on a shared box), so it is never used as a denominator (docs/checkpoints.md, MFU)."""
        if not hasattr(self, "_peak"):
            from .hardware import device_name, peak_tflops
            name = device_name()
            peak, source = self.cfg.peak_tflops, "--peak-tflops"
            if not peak:
                peak, source = peak_tflops(name, "bf16" if self.dtype != torch.float32 else "fp32"), "datasheet"
            self._peak = peak or None
            if self.is_main:
                print(f"[rils_scale] MFU denominator: {peak:.3f} TFLOP/s per device ({source}, {name})" if peak else
                      f"[rils_scale] MFU not reported: no datasheet peak for {name} (pass --peak-tflops)", flush=True)
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
    from .launch_env import adopt_slurm_env
    adopt_slurm_env()  # ranks started by srun: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE from Slurm's variables
    single_rank = ensure_launch_env()  # plain `python launchers/pretrain.py`: one rank, not MPI discovery
    if single_rank:
        print(single_rank, flush=True)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
                        format="[%(asctime)s] %(name)s: %(message)s")
    _run_or_exit(cfg)


def _run_or_exit(cfg: TrainConfig) -> None:
    """Run; on failure exit this rank *now* with a clear message and a documented status.

    A rank that raised would otherwise sit in interpreter shutdown (loader workers, process
    group destructors) while its peers wait in a collective: ``os._exit`` after flushing makes
    the peers' next collective fail (gloo: at once; NCCL: after --collective-timeout-s).
    """
    rank = os.environ.get("RANK", "0")
    code = 0
    try:
        Trainer(cfg).run()
    except NonFiniteAbort as err:
        print(f"[rils_scale] rank {rank}: stopped: {err}", file=sys.stderr, flush=True)
        code = EXIT_NONFINITE
    except checkpointing.CheckpointWriteError as err:
        print(f"[rils_scale] rank {rank}: CheckpointWriteError: {err}", file=sys.stderr, flush=True)
        code = checkpointing.EXIT_CHECKPOINT_WRITE
    except SystemExit as err:  # a clear message raised on this rank (maybe only on this one)
        if err.code in (None, 0):
            raise
        print(f"[rils_scale] rank {rank}: {err.code}" if isinstance(err.code, str) else "", file=sys.stderr, flush=True)
        code = err.code if isinstance(err.code, int) else 1
    except BaseException as err:  # noqa: BLE001 (KeyboardInterrupt too: exit, never hang)
        import traceback
        traceback.print_exc()
        print(f"[rils_scale] rank {rank}: failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        code = 1
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
