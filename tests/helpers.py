"""Test helpers: multi-process gloo runs that finish or fail together, and tiny configs."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from megamoe import config
from megamoe.utils import free_port

ROOT = Path(__file__).resolve().parent.parent


# What every rank imports, imported once by the process the ranks are forked from: a fresh interpreter spends ~5 s
# of CPU importing them, on every rank of every spawn of the suite. Not megamoe itself: each rank imports (and so
# patches, see megamoe.platform) it as a spawned one would; nor anything that reads the environment on import.
_RANK_PRELOAD = ["torch", "deepspeed", "megatron.core.models.gpt", "megatron.core.transformer.moe.moe_layer"]


def _rank_context():
    """Ranks start as forks of a server that has imported _RANK_PRELOAD (and nothing else: fork() of a process with
    threads or initialized communication is unsafe, which the server never has)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_RANK_PRELOAD)
    return ctx


def _rank_main(fn: Callable, rank: int, world_size: int, port: int, env: dict[str, str], args: tuple,
               results) -> None:
    # The server was started with the environment of the suite's first spawn: a rank takes its caller's.
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(
        world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        # Plain pickle bytes: torch.multiprocessing would share tensors through handles that die with
        # this process, and the parent would block on them.
        results.put((rank, "ok", pickle.dumps(fn(*args))))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1) from None


def spawn(fn: Callable, world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """Run fn(*args) on `world_size` new processes (RANK/WORLD_SIZE/MASTER_* set, the caller's environment, nothing
    but the heavy third-party imports shared between them, see _rank_context); return each rank's value.

    If any rank fails or the timeout passes, every rank is killed and the first error is raised: a
    broken rank never leaves the others hanging in a collective.
    """
    ctx = _rank_context()
    results = ctx.Queue()
    port = free_port()
    env = dict(os.environ)
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, env, args, results), daemon=True)
             for r in range(world_size)]
    for proc in procs:
        proc.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - values.keys())} did not finish "
                                   f"within {timeout:.0f} s")
            try:
                rank, status, value = results.get(timeout=1.0)
            except Exception:  # queue.Empty
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in values]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}") from None
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            values[rank] = pickle.loads(value)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return [values[r] for r in range(world_size)]


def start_rank(fn: Callable, *args: Any):
    """fn(*args) on one new process of a one-rank launch, not waited for: the caller watches it (and may kill it).
    Returns the process."""
    ctx = _rank_context()
    results = ctx.Queue()
    proc = ctx.Process(target=_rank_main, args=(fn, 0, 1, free_port(), dict(os.environ), args, results), daemon=True)
    proc.start()
    proc.results = results  # alive as long as the process: the child opens it after start() returns
    return proc


def load_tool(name: str):
    """tools/<name>.py as a module (its main(argv) returns the exit status; argparse errors raise SystemExit)."""
    return load_script(f"tools/{name}.py")


def load_script(relative: str):
    """An entry point (tools/x.py, launchers/pretrain.py) as a module, without running it."""
    import importlib.util

    name = "megamoe_tool_" + Path(relative).stem if relative.startswith("tools/") else Path(relative).stem
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(data: dict[str, str], *overrides: str) -> config.RunConfig:
    """A 2-layer Llama-style GPT on the test corpus; no logging sinks, no checkpoints, no validation."""
    return config.load(None, tiny_overrides(data) + list(overrides))


def tiny_overrides(data: dict[str, str]) -> list[str]:
    """tiny_config's settings as overrides (of the defaults, or of any config file a launcher is given)."""
    return [
        "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "model.make_vocab_size_divisible_by=64",
        f"data.data_path=[{data['prefix']}]", f"data.tokenizer_model={data['tokenizer']}",
        "data.seq_length=32", "data.split=90,10,0", "data.num_workers=0",
        "train.micro_batch_size=4", "train.train_iters=3", "train.lr=1e-3", "train.lr_warmup_iters=1",
        "train.eval_iters=0", "train.log_interval=1",
        "logging.wandb=false", "logging.tensorboard=false", f"logging.log_dir={data['root']}/runs",
    ]


def tiny_launch_overrides(data: dict[str, str], log_dir) -> list[str]:
    """Overrides of configs/tiny-dense.yaml for a launched tiny run (2 ranks, dropout on, DP=2 with 2 micro-batches
    per step, ZeRO-2; metrics and checkpoints under `log_dir`; a rank stalled for 2 minutes prints its stacks and
    fails the run)."""
    return [
        "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
        "model.hidden_dropout=0.1", "model.attention_dropout=0.1", "model.make_vocab_size_divisible_by=64",
        f"data.data_path=[{data['prefix']}]", f"data.tokenizer_model={data['tokenizer']}", "data.seq_length=32",
        "data.split=90,10,0", "data.num_workers=1", "train.micro_batch_size=2", "train.global_batch_size=8",
        "train.lr_warmup_iters=2", "train.log_interval=1", "train.eval_iters=2", "deepspeed.zero_stage=2",
        "logging.wandb=false", "logging.tensorboard=false", f"logging.log_dir={log_dir}",
        f"checkpoint.save={log_dir}/checkpoints", "parallel.step_timeout_minutes=2",
    ]


def launch_command(data: dict[str, str], log_dir, *overrides: str) -> list[str]:
    """`deepspeed --num_gpus 2 launchers/pretrain.py` of the tiny model (tiny_launch_overrides, then `overrides`)."""
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
            str(ROOT / "launchers" / "pretrain.py"), "--config", str(ROOT / "configs" / "tiny-dense.yaml"),
            *tiny_launch_overrides(data, log_dir), *overrides]


def run_launch(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a launch to its end, failing the test (with the output's tail) unless it exits 0 within `timeout_s`.
    It runs in its own process group, all of which a timeout kills: no rank outlives the test."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the launch ran past {timeout_s} s and was killed:\n{err[-4000:]}") from None
    assert proc.returncode == 0, f"the launch exited {proc.returncode}:\n{err[-4000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def full_params(trainer) -> dict:
    """Every parameter as the full tensor under its global name, on every rank: TP shards gathered, experts
    gathered over the expert-parallel group, pipeline stages merged."""
    return full_tensors(trainer, {name: p.detach() for name, p in trainer.engine.module.named_parameters()})


def full_tensors(trainer, local: dict) -> dict:
    """Full copies of per-parameter tensors laid out like this rank's parameters (the parameters themselves,
    or their gradients), by global name: TP-gathered, EP-gathered, merged over the pipeline stages."""
    import torch
    import torch.distributed as dist

    from megamoe.models.sharding import gather_tp, shift_layer_index
    from megamoe.moe.experts import Experts
    from megamoe.train.checkpoint import layer_offset

    model, groups = trainer.engine.module, trainer.groups
    params = dict(model.named_parameters())
    experts = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, Experts)
               for p, _ in m.named_parameters(recurse=False)}
    full = {}
    for name, tensor in local.items():
        if name in experts and groups.ep_group is not None:
            parts = [torch.empty_like(tensor) for _ in range(groups.ep_size)]
            dist.all_gather(parts, tensor.contiguous(), group=groups.ep_group)
            full[name] = torch.cat(parts)
        else:
            full[name] = gather_tp(tensor, params[name], groups).clone()
    offset = layer_offset(model)
    full = {shift_layer_index(name, offset): t for name, t in full.items()}
    if groups.pp_group is not None:
        stages = [None] * groups.pp_size
        dist.all_gather_object(stages, full, group=groups.pp_group)
        full = {k: v for stage in stages for k, v in stage.items()}
    return full


class GradientCapture:
    """The gradient each optimizer step uses, per parameter (before ZeRO partitions it): hooks sum every
    micro-batch's local gradient; `step()` averages over the data-parallel replicas (experts: summed over their
    expert-data-parallel replicas, over the data-parallel size, as the loss is scaled) and returns full
    tensors by global name (full_tensors). Works for every ZeRO stage and pipeline layout."""

    def __init__(self, trainer) -> None:
        from megamoe.moe.experts import Experts

        self.trainer, self.sums = trainer, {}
        model = trainer.engine.module
        self.experts = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, Experts)
                        for p, _ in m.named_parameters(recurse=False)}
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.register_hook(lambda grad, name=name: self._add(name, grad))

    def _add(self, name: str, grad) -> None:
        grad = grad.detach().float()
        self.sums[name] = self.sums[name] + grad if name in self.sums else grad.clone()

    def step(self) -> dict:
        import torch.distributed as dist

        groups, out = self.trainer.groups, {}
        for name, grad in sorted(self.sums.items()):
            # Experts are DeepSpeed expert parameters only under EP > 1 (else dense, reduced over DP).
            group = groups.edp_group if name in self.experts and groups.ep_size > 1 else groups.dp_group
            if group is not None:
                dist.all_reduce(grad, group=group)
            out[name] = grad / groups.dp_size
        self.sums = {}
        return full_tensors(self.trainer, out)


def train_steps(data: dict, overrides: list[str], steps: int) -> dict:
    """Build the trainer for tiny_config(data, *overrides) on this launch and run `steps` optimizer steps.

    Returns the losses, gradient norms and (rank 0) the full weights afterwards; keeps `trainer` for more."""
    import torch.distributed as dist

    from megamoe.data.loader import build_loader
    from megamoe.train import startup
    from megamoe.train.loop import build_trainer, train_step

    cfg = tiny_config(data, *overrides)
    trainer = build_trainer(cfg, startup.check(cfg))
    batches = iter(build_loader(trainer.datasets.train, 0, cfg, trainer.groups))
    values = [train_step(trainer, batches) for _ in range(steps)]
    full = full_params(trainer)
    return {"losses": [v["train/loss"] for v in values], "grad_norms": [v["train/grad_norm"] for v in values],
            "full": full if dist.get_rank() == 0 else None, "trainer": trainer}


def run_training(data: dict, *overrides: str) -> None:
    """Train tiny_config(data, *overrides) on this launch through megamoe's loop (validation, checkpoints,
    metrics.jsonl in logging.log_dir), as the launcher does."""
    from megamoe.train import startup
    from megamoe.train.loop import build_trainer, train
    from megamoe.train.metrics import ExpertLoadLog, MetricsWriter

    cfg = tiny_config(data, *overrides)
    trainer = build_trainer(cfg, startup.check(cfg))
    metrics = MetricsWriter(cfg)
    try:
        train(trainer, metrics, ExpertLoadLog(cfg.logging.log_dir))
    finally:
        metrics.close()


def max_rel_diff(got: dict, want: dict) -> float:
    """Largest relative (norm-wise) difference over the tensors of `want`."""
    return max(((got[k] - v).norm() / v.norm().clamp(min=1e-30)).item() for k, v in want.items())
