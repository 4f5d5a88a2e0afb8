"""Each rank reads its own share of a checkpoint when it resumes: a 4-rank checkpoint (expert parallel 2, ZeRO-2 over
4 data-parallel ranks) resumed at 4 ranks and at 2. A rank's share is what it holds: its weights (the dense ones,
its experts) and its partition of the optimizer state (Adam's moments, the fp32 master weights). Bytes read are the
OS's count (/proc/self/io), so they include every file a resume opens."""

from __future__ import annotations

import pytest

from tests.helpers import run_training, spawn

LIMIT = 1.25
MODEL = ["model.hidden_size=256", "model.ffn_hidden_size=1024", "moe.num_experts=4", "moe.ffn_hidden_size=512",
         "moe.router_topk=2", "parallel.expert_model_parallel_size=2", "deepspeed.zero_stage=2",
         "train.global_batch_size=16", "train.micro_batch_size=2"]


def _train_and_save(data: dict, save: str) -> None:
    run_training(data, *MODEL, f"checkpoint.save={save}", "train.train_iters=2", f"logging.log_dir={save}-log")


def _share(trainer) -> int:
    """Bytes of this rank's weights, buffers and optimizer state (ZeRO-2: its partition of the moments and of
    the fp32 master weights)."""
    from megamoe.train.deepspeed import base_optimizer

    weights = sum(t.numel() * t.element_size() for t in trainer.engine.module.state_dict().values()
                  if hasattr(t, "numel"))
    moments = sum(v.numel() * v.element_size() for state in base_optimizer(trainer.engine).state.values()
                  for v in state.values() if hasattr(v, "dim") and v.dim() > 0)
    master = sum(t.numel() * t.element_size() for t in trainer.engine.optimizer.single_partition_of_fp32_groups)
    return weights + moments + master


def _resume(data: dict, save: str, log_dir: str) -> dict:
    from megamoe.train import reshard, startup  # noqa: F401 - imported before the reads are counted
    from megamoe.train.loop import build_trainer
    from tests.helpers import tiny_config

    cfg = tiny_config(data, *MODEL, f"checkpoint.load={save}", f"logging.log_dir={log_dir}",
                      "train.train_iters=3")
    trainer = build_trainer(cfg, startup.check(cfg))
    return {"read": trainer.checkpoint_bytes_read, "share": _share(trainer),
            "iteration": trainer.progress.iteration}


@pytest.fixture(scope="module")
def saved(tiny_data, tmp_path_factory):
    save = tmp_path_factory.mktemp("reads") / "ckpt"
    spawn(_train_and_save, 4, tiny_data, str(save), timeout=600)
    return save


@pytest.mark.parametrize("ranks", [4, 2])
def test_a_rank_reads_its_own_share_of_the_checkpoint(tiny_data, saved, tmp_path, ranks):
    got = spawn(_resume, ranks, tiny_data, str(saved), str(tmp_path / "run"), timeout=600)
    for rank, value in enumerate(got):
        ratio = value["read"] / value["share"]
        print(f"4-rank checkpoint resumed at {ranks} ranks, rank {rank}: read {value['read']:,} bytes, share "
              f"{value['share']:,} bytes: {ratio:.3f}x")
        assert value["iteration"] == 2
        assert ratio <= LIMIT, f"rank {rank} read {ratio:.2f}x its share"
