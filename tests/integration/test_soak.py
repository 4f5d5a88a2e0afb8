"""Soak (slow, outside the default suite: `pytest -m slow`): 2,000 steps of the tiny MoE model through megamoe's
training loop (logging every 50 steps, validation every 500, a checkpoint every 500 keeping the last 2), resident
memory sampled as it runs. Growth from the steady state at step 200 to the end must stay under 5 %."""

from __future__ import annotations

import pytest

from tests.helpers import spawn

STEPS = 2000


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _soak(data: dict, save: str) -> dict[int, int]:
    import threading
    import time

    from megamoe.train import startup
    from megamoe.train.loop import build_trainer, train
    from megamoe.train.metrics import ExpertLoadLog, MetricsWriter
    from tests.helpers import tiny_config

    cfg = tiny_config(data, f"train.train_iters={STEPS}", "train.log_interval=50", "train.eval_interval=500",
                      "train.eval_iters=2", "moe.num_experts=4", "moe.ffn_hidden_size=64",
                      f"checkpoint.save={save}", "checkpoint.save_interval=500", "checkpoint.keep_last=2")
    trainer = build_trainer(cfg, startup.check(cfg))
    samples: dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples[trainer.progress.iteration] = _rss_bytes()
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    metrics = MetricsWriter(cfg)
    try:
        train(trainer, metrics, ExpertLoadLog(cfg.logging.log_dir))
    finally:
        done.set()
        sampler.join()
        metrics.close()
    return samples


@pytest.mark.slow
def test_resident_memory_stays_flat_over_2000_steps(tiny_data, tmp_path):
    samples = spawn(_soak, 1, tiny_data, str(tmp_path / "ckpt"), timeout=1100)[0]  # inside pytest.ini's 1200 s
    start = max(rss for step, rss in samples.items() if 200 <= step < 300)
    end = max(rss for step, rss in samples.items() if step >= STEPS - 100)
    growth = (end - start) / start
    print(f"RSS at steps 200-300: {start / 2**20:.0f} MiB, at the end: {end / 2**20:.0f} MiB ({100 * growth:+.1f} %)")
    assert growth < 0.05
