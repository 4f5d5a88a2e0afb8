"""Careless or unlucky inputs around checkpoints and the tools (issue 16): each is refused in one line before any
process group starts (or, once the model exists, before it trains), and loses nothing.

The checkpoint is a 4-step tiny MoE run (saved at 2 and 4) that each test copies; the launcher's and tools' own
`main` run in this process for the cases refused at start-up, in a gloo world of one (tests.helpers.spawn) for
those found when the model loads, and as commands where the exit status matters.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, spawn, tiny_config, tiny_overrides

MOE = ["moe.num_experts=4", "moe.ffn_hidden_size=64"]


def _train_run(data: dict, save: str) -> None:
    from megamoe.train import startup
    from megamoe.train.loop import build_trainer, train
    from megamoe.train.metrics import ExpertLoadLog, MetricsWriter

    cfg = tiny_config(data, *MOE, "train.train_iters=4", f"checkpoint.save={save}", "checkpoint.save_interval=2")
    trainer = build_trainer(cfg, startup.check(cfg))
    metrics = MetricsWriter(cfg)
    train(trainer, metrics, ExpertLoadLog(cfg.logging.log_dir))
    metrics.close()


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory) -> Path:
    """The checkpoint directory of a 4-step run: iter_0000002, iter_0000004, latest = iter_0000004."""
    save = tmp_path_factory.mktemp("run") / "checkpoints"
    spawn(_train_run, 1, tiny_data, str(save))
    return save


@pytest.fixture
def ckpt(run, tmp_path) -> Path:
    """A copy of the run's checkpoints, this test's to damage."""
    return Path(shutil.copytree(run, tmp_path / "ckpt"))


def _args(data: dict, *overrides: str) -> list[str]:
    """The launcher's arguments for the tiny MoE of tiny_config."""
    return ["--config", str(ROOT / "configs" / "tiny-dense.yaml"), *tiny_overrides(data), "train.train_iters=6", *MOE,
            *overrides]


def _refused(capsys, main, args: list[str], pattern: str, code: int = 2) -> str:
    """`main(args)` exits `code` printing one line that matches `pattern` (and no traceback)."""
    assert main(args) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err
    return err


def _tags(directory: Path) -> tuple[str, list[str]]:
    return (directory / "latest").read_text(), sorted(p.name for p in directory.glob("iter_*"))


# ---- where a run loads from and saves to ----

LOAD_MISTAKES = {
    "typo": (lambda c: c.parent / "ckpt_typo", r"checkpoint.load=\S+ckpt_typo does not exist; pass the directory"),
    "tag_directory": (lambda c: c / "iter_0000004",
                      r"is one checkpoint of a run, not its checkpoint directory: pass checkpoint.load=\S+/ckpt "
                      r"\(its 'latest' names iter_0000004\)"),
    "latest_binary": (lambda c: (c / "latest").write_bytes(b"\xff\xfe\x00junk") and c,
                      r"/latest is not text; write the tag to resume from into it, e.g. iter_0000004"),
    "latest_empty": (lambda c: (c / "latest").write_text("") or c, r"/latest is empty; write the tag"),
    "latest_outside": (lambda c: (c / "latest").write_text("/tmp") and c,
                       r"/latest names '/tmp', which is not a checkpoint directory in it"),
    "no_latest": (lambda c: (c / "latest").unlink() or c,
                  r"holds checkpoints iter_0000002 .. iter_0000004 but no 'latest' file naming the one to resume"),
    "hf_directory": (lambda c: _fake_hf_directory(c.parent / "hf"),
                     r"is a Hugging Face model directory; import it first: python tools/convert_checkpoint.py "
                     r"--load-hf"),
}


def _fake_hf_directory(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


@pytest.mark.parametrize("mistake", sorted(LOAD_MISTAKES))
def test_a_load_that_holds_no_usable_checkpoint_is_refused(mistake, ckpt, tiny_data, tmp_path, monkeypatch, capsys):
    """An explicit checkpoint.load is a request to resume: a wrong one is an error, not a new run from scratch."""
    from launchers.pretrain import main

    monkeypatch.setenv("WORLD_SIZE", "1")
    how, pattern = LOAD_MISTAKES[mistake]
    load = how(ckpt)
    before = sorted(p.name for p in ckpt.iterdir())
    _refused(capsys, main, _args(tiny_data, f"checkpoint.load={load}", f"checkpoint.save={tmp_path / 'new'}"),
             "megamoe: checkpoint error: .*" + pattern)
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_a_new_run_cannot_save_over_another_runs_checkpoints(ckpt, tiny_data, monkeypatch, capsys):
    from launchers.pretrain import main

    monkeypatch.setenv("WORLD_SIZE", "1")
    before = _tags(ckpt)
    _refused(capsys, main, _args(tiny_data, "model.hidden_size=32", f"checkpoint.save={ckpt}"),
             rf"checkpoint.save={ckpt} already holds another run's checkpoints \(latest iter_0000004\), which this run "
             rf"would replace: resume it with checkpoint.load={ckpt}, or save to a new directory")
    _refused(capsys, main, _args(tiny_data, f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}",
                                 "checkpoint.finetune=true"),
             r"checkpoint.finetune=true restarts at iteration 0 in .*, the directory it loads from")
    assert _tags(ckpt) == before


@pytest.mark.parametrize("change, pattern", [
    (["model.hidden_size=96"], r"config error: model.hidden_size=96 \(the checkpoint has 64\), model.kv_channels=24 "
                               r"\(the checkpoint has 16\): .* holds another model"),
    (["model.num_layers=3"], r"model.num_layers=3 \(the checkpoint has 2\)"),
    (["TOKENIZER"], r"checkpoint error: data.tokenizer_model=\S+other.model \(400 pieces\) is not the tokenizer "
                    r"\S+ was trained with \(\S+spm.model, 512 pieces\)"),
    (["CONFIG_GONE", "checkpoint.verify=none"], r"iter_0000004/config.yaml is missing: the checkpoint is incomplete"),
], ids=["hidden", "layers", "tokenizer", "config_missing"])
def test_resuming_another_model_is_refused_before_it_starts(change, pattern, ckpt, tiny_data, tmp_path, monkeypatch,
                                                            capsys):
    from launchers.pretrain import main
    from megamoe.data.preprocess import encode_corpus, train_tokenizer

    monkeypatch.setenv("WORLD_SIZE", "1")
    if change[0] == "TOKENIZER":  # another tokenizer (and its data): the embedding rows would mean other pieces
        other = train_tokenizer([tiny_data["corpus"]], str(tmp_path / "other"), vocab_size=400)
        prefix = encode_corpus([tiny_data["corpus"]], other, str(tmp_path / "other")).prefix
        change = [f"data.tokenizer_model={other}", f"data.data_path=[{prefix}]"]
    elif change[0] == "CONFIG_GONE":
        (ckpt / "iter_0000004" / "config.yaml").unlink()
        change = change[1:]
    _refused(capsys, main, _args(tiny_data, f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}", *change), pattern)


def _load(data: dict, ckpt: str, *overrides: str) -> str:
    """build_trainer of the tiny MoE resuming `ckpt`: 'loaded' or the error."""
    from megamoe.train import startup
    from megamoe.train.loop import build_trainer

    cfg = tiny_config(data, *MOE, f"checkpoint.load={ckpt}", f"checkpoint.save={ckpt}", *overrides)
    try:
        build_trainer(cfg, startup.check(cfg))
    except Exception as err:  # noqa: BLE001 - the test reads it
        return f"{type(err).__name__}: {err}"
    return "loaded"


def _poison(model_file: Path) -> None:
    """NaN in the first floating tensor of a model file, keeping its size (what checkpoint.verify=sizes checks)."""
    state = torch.load(model_file, weights_only=False)
    next(v for v in state["module"].values() if torch.is_tensor(v) and v.is_floating_point()).fill_(float("nan"))
    size = model_file.stat().st_size
    torch.save(state, model_file)
    assert model_file.stat().st_size == size


@pytest.mark.parametrize("damage", ["more_experts", "wider_experts", "expert_shard_gone", "nan_weights",
                                    "manifest_not_json"])
def test_a_checkpoint_that_does_not_fit_is_refused_when_it_loads(damage, ckpt, tiny_data):
    tag = ckpt / "iter_0000004"
    overrides, expected = [], ""
    if damage in ("more_experts", "wider_experts"):  # shapes MoE layers decide are compared tensor by tensor
        overrides = ["moe.num_experts=8"] if damage == "more_experts" else ["moe.ffn_hidden_size=48"]
        expected = (r"ShapeMismatch: \S+: decoder.layers.0.mlp.moe.\S+ is \[4, .*\] in the checkpoint, \[8, .*\] "
                    r"in this model: this model is not the checkpoint's \(its config differs in "
                    r"moe.num_experts 4 -> 8\)")
        if damage == "wider_experts":
            expected = (r"ShapeMismatch: \S+: the experts of decoder.layers.0.mlp.moe.experts.\S+ are \[128, 64\] in "
                        r"the checkpoint, \[96, 64\] in this model: .*config differs in moe.ffn_hidden_size 64 -> 48")
    elif damage == "expert_shard_gone":
        (tag / "experts_ep000.pt").unlink()
        overrides, expected = ["checkpoint.verify=none"], r"CheckpointError: \S+ holds no experts_ep\*.pt expert shards"
    elif damage == "nan_weights":
        _poison(tag / "mp_rank_00_model_states.pt")
        overrides, expected = ["checkpoint.verify=sizes"], r"CheckpointError: \S+ holds NaN or Inf in 1 weight tensors"
    else:
        (tag / "manifest.json").write_text("{")
        expected = r"CheckpointError: \S+manifest.json is not JSON: the checkpoint is damaged"
    got = spawn(_load, 1, tiny_data, str(ckpt), *overrides)[0]
    assert re.search(expected, got), got


def _resume_with(data: dict, ckpt: str) -> dict:
    """Resume a 4-step run with a new schedule and Adam settings: the rates and betas the resumed step uses."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megamoe.train import startup
    from megamoe.train.loop import build_trainer

    new = ["train.train_iters=10", "train.lr=2e-3", "train.min_lr=1e-4", "train.lr_warmup_iters=2",
           "train.adam_beta2=0.9", "train.adam_eps=1e-6", "train.weight_decay=0.05"]
    cfg = tiny_config(data, *MOE, f"checkpoint.load={ckpt}", f"checkpoint.save={ckpt}", *new)
    trainer = build_trainer(cfg, startup.check(cfg))
    optimizer = trainer.engine.optimizer
    groups = getattr(optimizer, "optimizer", optimizer).param_groups  # under DeepSpeed's wrapper, if any
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    expected = OptimizerParamScheduler(reference, init_lr=0.0, max_lr=2e-3, min_lr=1e-4, lr_warmup_steps=2,
                                       lr_decay_steps=10, lr_decay_style="cosine", start_wd=0.05, end_wd=0.05,
                                       wd_incr_steps=10, wd_incr_style="constant")
    expected.step(increment=4)
    return {"iteration": trainer.progress.iteration, "lr": groups[0]["lr"],
            "expected_lr": reference.param_groups[0]["lr"],
            "betas": {tuple(g["betas"]) for g in groups}, "eps": {g["eps"] for g in groups},
            "weight_decay": groups[0]["weight_decay"]}


def test_resuming_with_a_changed_schedule_applies_it(ckpt, tiny_data):
    """Megatron's --override-opt_param-scheduler: the step count comes from the checkpoint, the schedule and the
    Adam settings from this run's config (which its next checkpoint records); before, the checkpoint's were kept."""
    got = spawn(_resume_with, 1, tiny_data, str(ckpt))[0]
    assert got["iteration"] == 4
    assert got["lr"] == pytest.approx(got["expected_lr"], rel=1e-12) and got["lr"] != pytest.approx(1e-3)
    assert got["betas"] == {(0.9, 0.9)} and got["eps"] == {1e-6} and got["weight_decay"] == pytest.approx(0.05)


def _save_onto_a_full_disk(data: dict, save: str, failure: str) -> dict:
    from megamoe.train import checkpoint, reshard, saving, startup
    from megamoe.train.integrity import CheckpointError
    from megamoe.train.loop import build_trainer

    cfg = tiny_config(data, *MOE, f"checkpoint.load={save}", f"checkpoint.save={save}")
    trainer = build_trainer(cfg, startup.check(cfg))

    def fails(snapshot, directory, group=None):
        directory.parent.mkdir(parents=True, exist_ok=True)
        (directory.parent / "mp_rank_00_model_states.pt").write_bytes(b"part of a file")
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    reshard.write = fails  # the first write of a save
    trainer.progress = checkpoint.Progress(iteration=5, consumed_samples=20)
    try:
        saving.save(trainer.engine, trainer.cfg, trainer.progress, trainer.groups)
    except CheckpointError as err:
        return {"error": str(err), "partial": sorted(p.name for p in Path(save, ".partial").glob("*")),
                "latest": (Path(save) / "latest").read_text()}
    return {"error": None}


@pytest.mark.parametrize("failure", ["enospc", "other"])
def test_a_save_that_fails_says_why_removes_its_files_and_keeps_latest(failure, ckpt, tiny_data):
    got = spawn(_save_onto_a_full_disk, 1, tiny_data, str(ckpt), failure)[0]
    expected = (rf"no space left on the file system of {ckpt} while saving step 5 \([\d,]+ bytes free\): the "
                r"checkpoint was not written and its partial files were removed; 'latest' still names iter_0000004"
                if failure == "enospc" else
                rf"saving step 5 into {ckpt} failed \(RuntimeError: .*\); its partial files were removed and 'latest' "
                r"still names iter_0000004")
    assert got["error"] and re.search(expected, got["error"]), got
    assert got["partial"] == [] and got["latest"] == "iter_0000004"


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_at_the_first_save_is_one_line_and_leaves_nothing(tiny_data, tmp_path):
    """A real full file system (a 1 MB tmpfs: root can mount one), through the launcher."""
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "1M"):
        pytest.skip("cannot mount a tmpfs here (not root, or no mount privilege)")
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "launchers" / "pretrain.py"),
                               *_args(tiny_data, f"checkpoint.save={small / 'ckpt'}", "train.train_iters=2")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        left = sorted(str(p.relative_to(small)) for p in small.rglob("*"))
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)
    said = [line for line in proc.stderr.splitlines() if line.startswith("megamoe:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(said) == 1 and re.search(rf"no space left on the file system of {small / 'ckpt'} while saving step 2",
                                        said[0]), said
    assert set(left) <= {"ckpt", "ckpt/.partial", "ckpt/.lock"}, left  # no file of the failed save


def test_evaluating_with_another_model_shape_is_one_line(ckpt, tiny_data):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"),
                           *_args(tiny_data, f"checkpoint.load={ckpt}", "model.hidden_size=96", "train.eval_iters=1")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "megamoe: evaluate: model.hidden_size=96 (the checkpoint has 64)"), proc.stderr[-2000:]


# ---- tools writing checkpoints and exports ----

def test_import_and_upcycle_refuse_a_directory_holding_a_run(ckpt, tiny_data, tmp_path, capsys):
    from tools.convert_checkpoint import main as convert
    from tools.upcycle import main as upcycle

    before = _tags(ckpt)
    hf = tmp_path / "hf"
    # (an export builds the model, with a process group: not in this process)
    subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "--load", str(ckpt), "--save",
                    str(hf)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    _refused(capsys, convert, ["--load-hf", str(hf), "--save", str(ckpt), "--config",
                               str(ROOT / "configs" / "tiny-dense.yaml"), f"data.data_path=[{tiny_data['prefix']}]"],
             rf"--save: {ckpt} already holds checkpoints \(latest iter_0000004\), which this would replace; choose a "
             "new directory")
    _refused(capsys, upcycle, ["--load", str(ckpt), "--save", str(ckpt), "moe.num_experts=4"],
             rf"--save: {ckpt} already holds checkpoints")
    _refused(capsys, convert, ["--load-hf", str(ckpt), "--save", str(tmp_path / "x"), "--config",
                               str(ROOT / "configs" / "tiny-dense.yaml")],
             r"is a megamoe checkpoint, not a Hugging Face directory")
    assert _tags(ckpt) == before


def test_an_export_to_a_file_fails_before_the_merge(ckpt, tmp_path, capsys):
    from tools.convert_checkpoint import main as convert

    (tmp_path / "afile").write_text("x")
    _refused(capsys, convert, ["--load", str(ckpt), "--save", str(tmp_path / "afile")],
             rf"--save: {tmp_path / 'afile'} cannot be created \({tmp_path / 'afile'} is a file\)")
    _refused(capsys, convert, ["--load", str(ckpt), "--save", str(ckpt)],
             rf"--save {ckpt} is a run's checkpoint directory \(latest iter_0000004\); export to a directory of its "
             "own")
    assert json.loads((ckpt / "iter_0000004" / "manifest.json").read_text())["files"]


def test_a_second_run_saving_into_a_directory_in_use_is_refused(tiny_data, tmp_path, monkeypatch, capsys):
    """A job submitted twice: both would save into one directory, interleaving their tags and deleting each other's
    staged files. The running one's rank 0 holds a lock there; the kernel drops it when that process ends."""
    from launchers.pretrain import main

    save = tmp_path / "ckpt"
    save.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from megamoe.train import preflight; "
                               f"preflight.lock_save_directory({str(save)!r}); print('locked', flush=True); "
                               "sys.stdin.read()"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setenv("WORLD_SIZE", "1")
        _refused(capsys, main, _args(tiny_data, f"checkpoint.save={save}"),
                 rf"checkpoint.save={save} is in use by another run \(pid {holder.pid} on \S+, since [\d:\- ]+\); two "
                 "runs saving there would interleave their checkpoints")
    finally:
        holder.communicate(input="")  # it ends, and with it its lock
    from megamoe.train import preflight

    preflight.lock_save_directory(str(save))  # free again


def test_tools_refuse_what_they_cannot_use_in_one_line(tiny_data, tmp_path, capsys):
    from tools.evaluate import main as evaluate
    from tools.inspect_dataset import main as inspect
    from tools.plan import main as plan

    _refused(capsys, evaluate, _args(tiny_data), r"megamoe: evaluate: checkpoint.load is not set")
    for flag in ("--nodes", "--gpus-per-node"):
        with pytest.raises(SystemExit):  # argparse's error: exit 2, one usage line and the reason
            plan(["--config", str(ROOT / "configs" / "tiny-moe.yaml"), flag, "0", "--vocab-size", "512"])
        assert f"{flag} 0 must be >= 1" in capsys.readouterr().err
    prefix = str(tmp_path / "c_text_document")
    for suffix in (".bin", ".idx"):
        shutil.copy(tiny_data["prefix"] + suffix, prefix + suffix)
    Path(prefix + ".idx").write_bytes(Path(prefix + ".idx").read_bytes()[:40])
    with pytest.raises(SystemExit):
        inspect([prefix])
    assert f"{prefix}.idx is truncated" in capsys.readouterr().err


def _only_rank_1_fails() -> str:
    import torch.distributed as dist

    from megamoe.train.integrity import CheckpointError, on_every_rank

    dist.init_process_group("gloo")

    def check() -> str:
        if dist.get_rank() == 1:
            raise CheckpointError("the shard of rank 1's experts is gone")
        return "fine"

    try:
        return on_every_rank(check)
    except CheckpointError as err:
        return str(err)
    finally:
        dist.destroy_process_group()


def test_a_checkpoint_problem_one_rank_sees_fails_every_rank_alike():
    """(Launched with EP=2, the other rank died in its next collective with gloo's 'Connection closed by peer'.)"""
    assert spawn(_only_rank_1_fails, 2) == ["the shard of rank 1's experts is gone"] * 2
