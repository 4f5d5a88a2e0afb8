"""The generated DeepSpeed config, optimizer groups and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from megamoe.config import Layout
from tests.helpers import tiny_config


def test_deepspeed_config_generated_and_extra_merged(tiny_data):
    from megamoe.train.deepspeed import to_deepspeed_config

    cfg = tiny_config(tiny_data, "deepspeed.zero_stage=2", "train.bf16=true", "train.clip_grad=0.5",
                      "deepspeed.extra.zero_optimization.overlap_comm=true")
    ds = to_deepspeed_config(cfg, Layout(data_parallel_size=2, grad_accum_steps=3, global_batch_size=24))
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True,
                                       "overlap_comm": True}
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True} and ds["fp16"]["enabled"] is False


def test_norms_and_biases_get_no_weight_decay():
    from megamoe.config import TrainConfig
    from megamoe.train.optim import param_groups

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = {g["name"]: g for g in param_groups(model, TrainConfig(train_iters=1))}
    assert [p.shape for p in groups["decay"]["params"]] == [torch.Size([4, 4])]
    assert len(groups["no_decay"]["params"]) == 3 and groups["no_decay"]["wd_mult"] == 0.0


def test_lr_mult_groups_scale_the_schedule_and_frozen_params_are_left_out(tiny_data):
    from megamoe.train.optim import lr_scheduler_factory, param_groups

    cfg = tiny_config(tiny_data, "train.train_iters=10", "train.lr=1.0", "train.min_lr=0.1",
                      "train.lr_warmup_iters=0", "train.lr_decay_style=constant")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4))
    model[1].weight.lr_mult = 0.5
    model[2].requires_grad_(False)
    groups = param_groups(model, cfg.train)
    assert [g["name"] for g in groups] == ["decay", "no_decay", "decay_lr_x0.5"]
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr)
    lr_scheduler_factory(cfg.train)(optimizer).step(1)
    assert [g["lr"] for g in optimizer.param_groups] == [1.0, 1.0, 0.5]
    assert sum(len(g["params"]) for g in groups) == 3  # model[2] is frozen


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
def test_lr_schedule_warmup_then_decay(style, tiny_data):
    from megamoe.train.optim import lr_scheduler_factory

    cfg = tiny_config(tiny_data, "train.train_iters=100", "train.lr=1.0", "train.min_lr=0.1",
                      "train.lr_warmup_iters=10", f"train.lr_decay_style={style}")
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.train.lr)
    scheduler = lr_scheduler_factory(cfg.train)(optimizer)
    lrs = []
    for _ in range(101):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(increment=1)
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    want_mid = {"cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)), "linear": 1.0 - 0.9 * 45 / 90,
                "constant": 1.0}[style]
    assert lrs[55] == pytest.approx(want_mid)
    assert lrs[100] == pytest.approx(1.0 if style == "constant" else 0.1)


STALLED_RANK = """
import sys, time
from megamoe.train.watchdog import StallWatchdog

def stuck_in_a_collective():
    time.sleep(60)

def stuck_in_teardown():
    time.sleep(60)

with StallWatchdog(minutes=2 / 60) as watchdog:
    for _ in range(4):  # steps that finish in time keep it quiet
        time.sleep(0.5)
        watchdog.progress()
    print("steps done", flush=True)
    if sys.argv[1] == "step":
        stuck_in_a_collective()
stuck_in_teardown()
"""


@pytest.mark.parametrize("where", ["step", "teardown"])
def test_a_stalled_rank_prints_where_it_is_stuck_and_exits(where):
    import subprocess
    import sys
    import time

    from tests.helpers import ROOT

    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", STALLED_RANK, where], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1 and proc.stdout == "steps done\n", proc.stderr
    stuck = "stuck_in_a_collective" if where == "step" else "stuck_in_teardown"
    assert "Timeout (0:00:02)!" in proc.stderr and f"in {stuck}" in proc.stderr, proc.stderr
    assert elapsed < 30, f"exited after {elapsed:.0f} s, not 2 s after the last step"


STUCK_DATA_WORKER = """
import os, sys, time
import torch
from megamoe.train.watchdog import StallWatchdog

class StuckDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        with open(sys.argv[1], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)  # e.g. deadlocked after fork()

with StallWatchdog(minutes=3 / 60):
    next(iter(torch.utils.data.DataLoader(StuckDataset(), num_workers=1)))
"""


def test_a_stalled_rank_takes_its_stuck_data_worker_with_it(tmp_path):
    """Else the orphaned worker keeps the rank's output pipes open: whoever waits on the launch waits on it."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.helpers import ROOT

    pid_file = tmp_path / "worker.pid"
    proc = subprocess.Popen([sys.executable, "-c", STUCK_DATA_WORKER, str(pid_file)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        raise AssertionError("the stalled process exited but its data worker lived on, holding its pipes") from None
    assert proc.returncode == 1 and "Timeout (0:00:03)!" in err, err
    # A killed process closes its files before it turns zombie: for a moment after the pipes close it still runs.
    stat = Path(f"/proc/{pid_file.read_text()}/stat")
    deadline = time.monotonic() + 10
    while stat.exists() and _state(stat) != "Z" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not stat.exists() or _state(stat) == "Z", "the data worker is still running"


def _state(stat):
    """A process's state letter from /proc/<pid>/stat; "Z" (zombie) if it ended while being read."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "Z"


def test_a_resumed_optimizer_takes_this_configs_adam_settings_and_group_rates(tiny_data):
    """torch restores a checkpoint's parameter groups whole (betas, eps, an lr_mult group's peak rate): a resumed
    run puts this config's back, so that what its config.yaml records is what trains."""
    from megamoe.train.optim import apply_hyperparameters, lr_scheduler_factory, param_groups

    schedule = ["train.train_iters=10", "train.lr_warmup_iters=0", "train.lr_decay_style=constant"]
    old = tiny_config(tiny_data, *schedule, "train.lr=1.0", "train.min_lr=0.1")
    new = tiny_config(tiny_data, *schedule, "train.lr=2.0", "train.min_lr=0.2", "train.adam_beta1=0.8",
                      "train.adam_eps=1e-6")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4, bias=False))
    model[1].weight.lr_mult = 0.5
    saved = torch.optim.AdamW(param_groups(model, old.train), lr=1.0, betas=(0.9, 0.95), eps=1e-8)
    saved_schedule = lr_scheduler_factory(old.train)(saved)
    saved_schedule.step(3)
    resumed = torch.optim.AdamW(param_groups(model, new.train), lr=2.0, betas=(0.8, 0.95), eps=1e-6)
    resumed.load_state_dict(saved.state_dict())
    schedule = lr_scheduler_factory(new.train)(resumed)
    schedule.load_state_dict(saved_schedule.state_dict())
    apply_hyperparameters(resumed, schedule, new.train)
    assert [g["lr"] for g in resumed.param_groups] == [2.0, 2.0, 1.0] and schedule.num_steps == 3
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 for g in resumed.param_groups)


def test_ctrl_c_asks_for_a_stop_checkpoint_and_a_second_one_interrupts():
    import os
    import signal
    import time

    from megamoe.train.preemption import StopRequests

    def deliver(signum: int) -> None:
        os.kill(os.getpid(), signum)
        time.sleep(0.05)  # Python runs the handler between bytecodes

    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler; SIG_IGN in a background job
    with StopRequests() as stop:
        deliver(signal.SIGINT)
        assert stop.agreed(torch.device("cpu")) == signal.SIGINT
        deliver(signal.SIGTERM)  # DeepSpeed's launcher sends it after a Ctrl-C: the first request stands
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            deliver(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # the handler it found is back


def test_a_checkpoint_written_before_a_model_setting_existed_still_fits(tiny_data):
    """config.yaml of an older checkpoint lacks model.add_qkv_bias and model.qk_layernorm: their defaults apply."""
    import copy
    import dataclasses

    from megamoe.train.preflight import model_shape
    from tests.helpers import tiny_config

    run = dataclasses.asdict(tiny_config(tiny_data))
    old = copy.deepcopy(run)
    del old["model"]["add_qkv_bias"], old["model"]["qk_layernorm"]
    assert model_shape(old) == model_shape(run)
