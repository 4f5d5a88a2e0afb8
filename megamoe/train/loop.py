"""run(cfg): build the parallel groups, model, engine and data, then train with periodic validation."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from megamoe.config import Layout, RunConfig
from megamoe.data.loader import Datasets, IntactBatches, blamed_on_changed_files, build_datasets, build_loader
from megamoe.data.tokenizer import embedding_rows, load_tokenizer
from megamoe.models.gpt import build_model
from megamoe.moe.losses import set_aux_loss_scale
from megamoe.parallel.groups import ParallelGroups
from megamoe.parallel.initialize import destroy, initialize
from megamoe.profiling import region
from megamoe.train import checkpoint, pipeline, saving
from megamoe.train.checkpoint import Progress
from megamoe.train.deepspeed import (
    aux_loss_scale,
    base_optimizer,
    build_engine,
    expert_parameters,
    grad_norm_before_step,
    skip_if_not_finite,
)
from megamoe.train.flops import Ledger
from megamoe.train.integrity import ReadMeter
from megamoe.train.metrics import (
    ExpertLoadLog,
    MetricsWriter,
    collect_moe_metrics,
    gather_over_pipeline,
    largest_memory_gib,
    moe_layers,
    write_loss_curve,
)
from megamoe.train.optim import apply_hyperparameters
from megamoe.train.preemption import Preempted, StopRequests, announce_requeue
from megamoe.train.profile import StepProfiler
from megamoe.train.timers import StepTimers
from megamoe.train.watchdog import StallWatchdog
from megamoe.utils import get_logger


@dataclass
class Trainer:
    """What a training run holds between steps."""

    cfg: RunConfig
    layout: Layout
    groups: ParallelGroups
    engine: object  # deepspeed.DeepSpeedEngine
    datasets: Datasets
    progress: Progress
    checkpoint_bytes_read: int | None = None
    """Bytes this rank read from the checkpoint it resumed from (after its verification), where the OS says."""
    timers: StepTimers = field(default_factory=lambda: StepTimers(False, torch.device("cpu")))
    """The parts of each step, timed (logging.step_timers)."""


def build_trainer(cfg: RunConfig, layout: Layout) -> Trainer:
    """Groups -> tokenizer -> model -> engine -> datasets -> resume (last: it restores the RNG streams).

    A checkpoint's weights go into the model before the engine exists, so DeepSpeed's master weights start from
    them; its optimizer state follows, each rank reading its own part (train/checkpoint.py).
    """
    groups = initialize(cfg.parallel, cfg.train.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer_model, cfg.data.tokenizer_type)
    model = build_model(cfg, embedding_rows(cfg), groups)
    log_parameter_count(model)
    tag_dir = checkpoint.latest_tag_dir(cfg.checkpoint.load, cfg.checkpoint.save)
    checkpoint.verify_for_use(tag_dir, cfg)
    bytes_read = ReadMeter()
    with checkpoint.loading(tag_dir, cfg):
        with bytes_read:
            weights = (checkpoint.load_weights(model, tag_dir, groups) if checkpoint.loads_weights_only(tag_dir, cfg)
                       else None)
        engine = build_engine(model, cfg, layout, groups)
        datasets = build_datasets(cfg, layout, tokenizer)
        with bytes_read:
            progress = checkpoint.load(engine, tag_dir, groups, weights, restart=checkpoint.restarts(tag_dir, cfg),
                                       same_layout=tag_dir is None or not checkpoint.layout_changed(tag_dir, cfg))
    if tag_dir is not None:
        checkpoint.require_finite_loaded(engine.module, tag_dir)
        apply_hyperparameters(base_optimizer(engine), engine.lr_scheduler, cfg.train)
        if bytes_read.total is not None:
            get_logger().info(f"this rank read {bytes_read.total / 2**20:,.1f} MiB of {tag_dir} to resume")
    return Trainer(cfg=cfg, layout=layout, groups=groups, engine=engine, datasets=datasets, progress=progress,
                   checkpoint_bytes_read=bytes_read.total, timers=step_timers(cfg, engine))


def step_timers(cfg: RunConfig, engine) -> StepTimers:
    """The step's timers; enabled, DeepSpeed's gradient reduction (its allreduce_gradients, which its backward
    calls at the accumulation boundary) is timed as a part of its own."""
    timers = StepTimers(cfg.logging.step_timers, engine.device)
    if timers.enabled:
        engine.allreduce_gradients = timers.wrap(engine.allreduce_gradients, "grad_reduction")
    return timers


def log_parameter_count(model: torch.nn.Module) -> None:
    """Megatron's per-rank count: this rank's parameters (its tensor-parallel shards, its experts)."""
    experts = sum(p.numel() for p in expert_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    get_logger().info(f"parameters on this rank: {total:,} ({experts:,} in its routed experts)")


def causal_mask(seq_length: int, device: torch.device) -> torch.Tensor:
    """[1, 1, s, s] bool, True above the diagonal (= masked), as megatron's attention expects."""
    return torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool, device=device).triu(1)


def lm_loss_sum(engine, batch: dict[str, torch.Tensor], causal: bool = True) -> torch.Tensor:
    """Summed cross entropy over the loss-masked tokens of one micro-batch: next-token prediction (causal), or
    the masked tokens (masked_lm: bidirectional attention, no mask at all since samples have no padding)."""
    device = engine.device
    tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
    mask = causal_mask(tokens.shape[1], device) if causal else None
    loss_BS = engine(tokens, batch["position_ids"].to(device), mask, labels=labels)
    return (loss_BS.float() * batch["loss_mask"].to(device).float()).sum()


def lm_loss(engine, batch: dict[str, torch.Tensor], causal: bool = True) -> torch.Tensor:
    """Mean cross entropy over the loss-masked tokens of one micro-batch."""
    return lm_loss_sum(engine, batch, causal) / batch["loss_mask"].float().sum().clamp(min=1.0)


def is_causal(cfg: RunConfig) -> bool:
    return cfg.model.objective == "causal_lm"


def dp_sum(value: torch.Tensor, groups: ParallelGroups, device: torch.device) -> torch.Tensor:
    """Sum a statistic over the data-parallel ranks (TP peers hold the same tokens)."""
    value = value.detach().float().to(device).clone()
    if groups.dp_group is not None:
        dist.all_reduce(value, group=groups.dp_group)
    return value


def train_step(trainer: Trainer, batches: Iterator[dict],
               before_step: Callable[[object], None] | None = None) -> dict[str, float]:
    """One optimizer step: grad_accum_steps micro-batches, each backward scaled by DeepSpeed (1/GAS); with
    pipeline parallelism in 1F1B order across the stages (train/pipeline.py).

    `before_step(engine)` runs once the step's gradients are complete, before the optimizer uses them
    (after the MoE layers' own step work: expert-bias updates).
    """
    engine, gas, groups, timers = trainer.engine, trainer.layout.grad_accum_steps, trainer.groups, trainer.timers
    lr = engine.optimizer.param_groups[0]["lr"]  # the rate this step applies
    skipped_before = engine.skipped_steps
    with region("data"), timers.part("data"):
        micro_batches = [next(batches) for _ in range(gas)]
    # The step's loss is the mean over all its loss tokens (Megatron's per-token loss): with a varying number
    # of loss tokens per micro-batch (masked LM, masked EOD) a mean of per-micro-batch means would weight
    # tokens unequally and depend on the layout. DeepSpeed averages over DP and divides by GAS: undo both.
    with region("loss bookkeeping"):  # two host reads per step: the loss tokens here, the loss at the end
        total_tokens = dp_sum(sum(b["loss_mask"].float().sum() for b in micro_batches), groups,
                              engine.device).clamp(min=1.0)
        scale = groups.dp_size * gas / total_tokens.item()
    losses, grad_norm = [], []

    def forward(index: int, x: torch.Tensor | None) -> torch.Tensor:
        set_aux_loss_scale(aux_loss_scale(engine))  # the fp16 loss scale may change between micro-batches
        for layer in moe_layers(engine.module):
            layer.begin_micro_batch(last=index == gas - 1)
        with region("forward"), timers.part("forward"):
            out = stage_output(trainer, micro_batches[index], x)
        if not groups.last_stage:
            return out
        losses.append(out.detach())
        return out * scale

    @region("backward")
    @timers.wrap_as("backward")
    def backward(y: torch.Tensor, dy: torch.Tensor | None) -> None:
        if dy is None:
            engine.backward(y)
        else:  # an inner pipeline stage: d(sum(y * dy))/dy = dy, already divided by GAS downstream
            engine.backward((y * dy).sum(), scale_wrt_gas=False)

    @region("optimizer")
    @timers.wrap_as("optimizer")
    def step() -> None:
        if engine.is_gradient_accumulation_boundary():
            grad_norm.append(grad_norm_before_step(engine))
            skip_if_not_finite(engine, grad_norm[-1])
            for layer in moe_layers(engine.module):
                layer.finish_step()
            if before_step is not None:
                before_step(engine)
        engine.step(lr_kwargs={"increment": 1})  # optimizer and LR step only at the accumulation boundary

    if groups.pp_size == 1:
        for index in range(gas):
            backward(forward(index, None), None)
            step()
    else:
        pipeline.train_1f1b(groups, gas, forward, backward, step, *stage_io(trainer))
    norm = grad_norm[0] if grad_norm and grad_norm[0] is not None else engine.get_global_grad_norm()
    with region("loss bookkeeping"):
        loss_sum = torch.stack(losses).sum() if losses else torch.zeros((), device=engine.device)
        loss = (dp_sum(pipeline.from_last_stage(loss_sum.float(), groups), groups, engine.device)
                / total_tokens).item()
    return {"train/loss": loss, "train/lr": lr, "train/grad_norm": float(norm) if norm is not None else float("nan"),
            "train/skipped": float(engine.skipped_steps > skipped_before)}


def stage_output(trainer: Trainer, batch: dict[str, torch.Tensor], x: torch.Tensor | None) -> torch.Tensor:
    """This pipeline stage's output for one micro-batch: the summed loss on the last stage (lm_loss_sum), the
    hidden states [S, B, D] before it; `x` is the previous stage's output (None on the first stage)."""
    engine = trainer.engine
    if x is not None:
        engine.module.set_input_tensor(x)
    if trainer.groups.last_stage:
        return lm_loss_sum(engine, batch, is_causal(trainer.cfg))
    device = engine.device
    tokens = batch["tokens"].to(device)
    mask = causal_mask(tokens.shape[1], device) if is_causal(trainer.cfg) else None
    return engine(tokens, batch["position_ids"].to(device), mask)


def stage_io(trainer: Trainer) -> tuple[torch.Size, torch.dtype, torch.device]:
    """Shape, dtype and device of the hidden states passed between pipeline stages."""
    cfg, groups = trainer.cfg, trainer.groups
    seq = cfg.data.seq_length // (groups.tp_size if groups.sequence_parallel else 1)
    dtype = next(trainer.engine.module.parameters()).dtype
    return torch.Size([seq, cfg.train.micro_batch_size, cfg.model.hidden_size]), dtype, trainer.engine.device


@dataclass(frozen=True)
class HeldOut:
    """One validation set's result on every rank: summed loss and predicted tokens, and each MoE layer's expert
    load over the set (share of its copies per expert, by layer label)."""

    loss_sum: float
    tokens: float
    expert_load: dict[str, list[float]]

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1.0)

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0))

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/loss": self.loss, f"{prefix}/ppl": self.ppl}


@torch.no_grad()
def evaluate(trainer: Trainer) -> dict[str, float]:
    """Validation loss and perplexity, pooled over the validation sets and, with several, per set
    (valid/<name>/loss, valid/<name>/ppl), plus the MoE layers' validation metrics."""
    sets = evaluate_sets(trainer)
    pooled = HeldOut(sum(r.loss_sum for r in sets.values()), sum(r.tokens for r in sets.values()), {})
    values = pooled.metrics("valid")
    if len(sets) > 1:
        for name, result in sets.items():
            values |= result.metrics(f"valid/{name}")
    layers = moe_layers(trainer.engine.module)
    metrics = {f"valid/moe_{layer.shape.label}_{k}": v
               for layer in layers for k, v in layer.validation_metrics().items()}
    return {**values, **gather_over_pipeline(metrics, trainer.groups)}


@torch.no_grad()
def evaluate_sets(trainer: Trainer) -> dict[str, HeldOut]:
    """Each validation set's loss over the same first eval_iters micro-batches every time, and the MoE layers'
    expert load over them. Collective: every rank calls it."""
    engine = trainer.engine
    layers = moe_layers(engine.module)
    for layer in layers:
        layer.sync_buffers()  # e.g. PEER's BatchNorm statistics: the same model on every rank
    engine.eval()
    collect_moe_metrics(engine.module, trainer.groups)  # training statistics since the last log: not this set's
    try:
        return {name: _evaluate_set(trainer, dataset) for name, dataset in trainer.datasets.valid.items()}
    finally:
        engine.train()


def _evaluate_set(trainer: Trainer, dataset) -> HeldOut:
    engine, groups = trainer.engine, trainer.groups
    # The first eval_iters micro-batches: megatron's dataset may hold more than the samples asked for (an epoch).
    # Read here, not by a worker forked for each evaluation: a few reads of a memory map, and every fork() of a
    # rank with dozens of communication threads risks a child that deadlocks.
    loader = IntactBatches(build_loader(dataset, 0, trainer.cfg, groups, in_process=True), trainer.datasets.files)
    batches = list(itertools.islice(loader, trainer.cfg.train.eval_iters))
    sums = []

    def forward(index: int, x: torch.Tensor | None) -> torch.Tensor:
        out = stage_output(trainer, batches[index], x)
        if groups.last_stage:
            sums.append(torch.stack([out.float(), batches[index]["loss_mask"].float().sum().to(engine.device)]))
        return out

    if groups.pp_size == 1:
        for index in range(len(batches)):
            forward(index, None)
    else:
        pipeline.forward_only(groups, len(batches), forward, *stage_io(trainer))
    _, loads = collect_moe_metrics(engine.module, groups)
    total = torch.stack(sums).sum(dim=0) if sums else torch.zeros(2, device=engine.device)
    loss_sum, tokens = dp_sum(pipeline.from_last_stage(total, groups), groups, engine.device).tolist()
    return HeldOut(loss_sum=loss_sum, tokens=tokens, expert_load=loads)


def train(trainer: Trainer, metrics: MetricsWriter, expert_load: ExpertLoadLog,
          stop: StopRequests | None = None, watchdog: StallWatchdog | None = None) -> dict[int, float]:
    """Steps from trainer.progress to train_iters: log, validate, checkpoint. Returns {step: valid ppl}.
    Raises Preempted (after a checkpoint) when a rank got a stop signal (`stop`, see train/preemption.py);
    tells `watchdog` (train/watchdog.py) after every step that the rank is not stalled."""
    perplexity = {}

    def validate(step: int) -> None:
        values = evaluate(trainer)
        perplexity[step] = values["valid/ppl"]
        metrics.log(step, values)

    with blamed_on_changed_files(trainer.datasets.files):
        if trainer.datasets.valid and trainer.progress.iteration == 0:
            validate(0)
        batches = iter(IntactBatches(build_loader(trainer.datasets.train, trainer.progress.consumed_samples,
                                                  trainer.cfg, trainer.groups), trainer.datasets.files))
        saver = saving.Saver(trainer.cfg)
        try:
            run_steps(trainer, batches, metrics, expert_load, validate, stop, watchdog, saver)
        except BaseException:
            saver.wait_quietly()  # a save in flight is still published; the error that ends training is raised
            raise
        saver.wait()
    return perplexity


def run_steps(trainer: Trainer, batches: Iterator[dict], metrics: MetricsWriter, expert_load: ExpertLoadLog,
              validate: Callable[[int], None], stop: StopRequests | None, watchdog: StallWatchdog | None,
              saver: saving.Saver) -> None:
    """The steps of `train` up to train_iters: log, validate, checkpoint (`saver`), stop on a signal."""
    cfg, layout = trainer.cfg, trainer.layout
    tokens_per_step = layout.global_batch_size * cfg.data.seq_length
    do_eval = bool(trainer.datasets.valid)
    skips = SkippedSteps(cfg.train.max_skipped_steps, trainer.progress.skipped_steps)
    ledger = Ledger.of(cfg, embedding_rows(cfg), dist.get_world_size(), tokens_per_step) if metrics.enabled else None
    started, first_step = time.perf_counter(), trainer.progress.iteration
    profiler = StepProfiler(cfg, trainer.engine.module, dist.get_rank())
    while trainer.progress.iteration < cfg.train.train_iters:
        with profiler.step(trainer.progress.iteration + 1):
            start = time.perf_counter()
            with trainer.timers.part("step"):
                values = train_step(trainer, batches)
            values["train/skipped_steps"] = skips.count(values.pop("train/skipped"), trainer.progress.iteration + 1)
            step_s = time.perf_counter() - start
            trainer.progress = replace(trainer.progress, iteration=trainer.progress.iteration + 1,
                                       consumed_samples=trainer.progress.consumed_samples + layout.global_batch_size,
                                       skipped_steps=skips.total)
            step, last = trainer.progress.iteration, trainer.progress.iteration == cfg.train.train_iters
            if step % cfg.train.log_interval == 0 or last:
                with region("logging"):
                    moe_values, loads = collect_moe_metrics(trainer.engine.module, trainer.groups)
                    expert_load.add(step, loads)
                    elapsed = time.perf_counter() - started
                    throughput = (ledger.values(tokens_per_step / step_s, moe_values.get("moe/experts_per_token_mean"))
                                  if ledger is not None else {})
                    metrics.log(step, {
                        **values, "train/tokens_per_s": tokens_per_step / step_s, **throughput, "train/step_s": step_s,
                        "train/memory_gib": largest_memory_gib(trainer.engine.device), "train/elapsed_s": elapsed,
                        "train/eta_s": elapsed / (step - first_step) * (cfg.train.train_iters - step),
                        "train/consumed_samples": trainer.progress.consumed_samples, **trainer.timers.pop(),
                        **moe_values})
        if do_eval and (step % cfg.train.eval_interval == 0 or last):
            validate(step)
        signum = stop.agreed(trainer.engine.device) if stop is not None else 0
        if cfg.checkpoint.save and (step % cfg.checkpoint.save_interval == 0 or last or signum):
            stall_s = saver.save(trainer.engine, trainer.progress, trainer.groups, wait=last or bool(signum))
            metrics.log(step, {"checkpoint/stall_s": stall_s})
        if signum and not last:
            if cfg.checkpoint.save:
                announce_requeue()
            raise Preempted(step, signum, saved=bool(cfg.checkpoint.save))
        if watchdog is not None:
            watchdog.progress()


class NonFiniteTraining(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class SkippedSteps:
    """Counts steps DeepSpeed skipped (non-finite loss or gradient: no update applied, LR schedule held)."""

    def __init__(self, limit: int, total: int = 0) -> None:
        self.limit, self.total, self.in_a_row = limit, total, 0

    def count(self, skipped: float, step: int) -> int:
        """Record step `step`; the total so far. NonFiniteTraining after `limit` skips in a row."""
        if not skipped:
            self.in_a_row = 0
            return self.total
        self.total, self.in_a_row = self.total + 1, self.in_a_row + 1
        get_logger().warning(f"step {step} skipped: non-finite loss or gradient ({self.in_a_row} in a row, "
                             f"{self.total} in all); its update was not applied")
        if self.in_a_row >= self.limit:
            raise NonFiniteTraining(f"{self.in_a_row} optimizer steps in a row (to step {step}) had a non-finite "
                                    "loss or gradient: lower train.lr, keep train.clip_grad on, or check the data; "
                                    "the last checkpoint holds finite weights")
        return self.total


def run(cfg: RunConfig, layout: Layout) -> None:
    """Train `cfg` on the processes of this launch (the config is already validated for it)."""
    with StallWatchdog(cfg.parallel.step_timeout_minutes) as watchdog:  # the set-up counts as the first step
        trainer = build_trainer(cfg, layout)
        resumed = trainer.progress.iteration
        metrics = MetricsWriter(cfg, layout, resume_step=resumed)
        expert_load = ExpertLoadLog(cfg.logging.log_dir, resume_step=resumed)
        try:
            with StopRequests() as stop:
                perplexity = train(trainer, metrics, expert_load, stop, watchdog)
            get_logger().info(summary(trainer.progress.iteration, perplexity))
        except Preempted as stopped:
            get_logger().warning(f"{stopped}; exiting with {stopped.exit_code}"
                                 + (" for a requeue" if stopped.saved else ""))
            raise
        finally:
            try:
                draw_pictures(cfg, expert_load)
            finally:
                metrics.close()  # last: console.log keeps the lines above
    destroy()  # before exit, as torch asks: NCCL's teardown at interpreter shutdown can hang


def draw_pictures(cfg: RunConfig, expert_load: ExpertLoadLog) -> None:
    """expert_load.png and loss.png (rank 0), named on the console. A picture that cannot be drawn is a warning:
    it must not replace the error that may be ending the run, nor stop the sinks from closing."""
    try:
        pictures = [p for p in (expert_load.write_heatmap(), write_loss_curve(cfg.logging.log_dir)) if p]
    except Exception as err:  # noqa: BLE001 - matplotlib, a full disk, a damaged metrics.jsonl line
        get_logger().warning(f"pictures not drawn: {type(err).__name__}: {err}")
        return
    if pictures:
        get_logger().info(f"pictures: {', '.join(map(str, pictures))}")


def summary(steps: int, perplexity: dict[int, float]) -> str:
    """The run's last line: steps done and the validation perplexity from the first to the last evaluation."""
    out = f"done: {steps} steps"
    if perplexity:
        (first, ppl_first), (last, ppl_last) = min(perplexity.items()), max(perplexity.items())
        out += f"; validation perplexity {ppl_first:.1f} at step {first} -> {ppl_last:.1f} at step {last}"
    return out


def evaluate_checkpoint(cfg: RunConfig, layout: Layout) -> dict[str, float]:
    """Validation metrics of the checkpoint cfg.checkpoint.load names (evaluation-only options apply, e.g.
    moe.drop_top_ranks); every rank returns them."""
    if cfg.checkpoint.load is None:
        raise ValueError("set checkpoint.load=<a run's checkpoint directory> to evaluate its latest checkpoint")
    checkpoint.latest_tag_dir(cfg.checkpoint.load)  # CheckpointError if it holds none
    trainer = build_trainer(cfg, layout)
    if not trainer.datasets.valid:
        raise ValueError("train.eval_iters=0 or an empty validation split: nothing to evaluate")
    return {"iteration": trainer.progress.iteration, **evaluate(trainer)}
