"""Convert checkpoints between megamoe (any TP/EP layout) and Hugging Face.

  megamoe -> HF:  python tools/convert_checkpoint.py --load runs/tiny-dense/checkpoints --save hf/tiny-dense \\
                      [--dtype bfloat16]
  HF -> megamoe:  python tools/convert_checkpoint.py --load-hf hf/tiny-dense --save runs/imported \\
                      --config configs/tiny-dense.yaml [section.key=value ...]
                  deepspeed --num_gpus 2 launchers/pretrain.py --config runs/imported/finetune.yaml \\
                      [parallel.tensor_model_parallel_size=2 ...]
Dense models are LlamaForCausalLM (Qwen2ForCausalLM with q/k/v biases, Qwen3ForCausalLM with q/k norms), top-k
MoE models MixtralForCausalLM, Qwen3MoeForCausalLM (q/k norms) or, with a gated shared expert, Qwen2MoeForCausalLM;
DA-MoE, PEER, CartesianMoE, MPOE and encoders are megamoe's HF custom code (MegamoeForCausalLM /
MegamoeForMaskedLM, loaded with trust_remote_code=True). The directory holds config.json, model.safetensors,
generation_config.json, tokenizer.json + tokenizer_config.json (and tokenizer.model for a sentencepiece tokenizer,
the custom code's .py files). Export merges the shards of any TP/PP/EP layout from the checkpoint files alone, in one
process. Import writes a weights-only checkpoint (iteration 0) that any TP/PP/EP layout loads, plus
finetune.yaml: the model from config.json; data, train and parallel from --config and the overrides.
Settings the other side cannot express are refused with the reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megamoe import cli, config


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", help="megamoe -> HF: a run's checkpoint directory (its 'latest' tag is read)")
    source.add_argument("--load-hf", help="HF -> megamoe: a Llama, Qwen2, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE or "
                        "megamoe directory with tokenizer.model or tokenizer.json")
    parser.add_argument("--save", required=True, help="the directory to write")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="megamoe -> HF: dtype of the saved weights")
    cli.add_config(parser, "HF -> megamoe: the run config giving data, train and parallel settings", required=False,
                   overrides="HF -> megamoe: the run's other settings (data, train, parallel)")
    args = parser.parse_args(argv)
    if args.load and (args.overrides or args.config):
        parser.error("--config and overrides apply to --load-hf only (an export keeps the checkpoint's config)")
    from megamoe.convert.export import export_hf, import_hf
    from megamoe.hf.native import UnsupportedExport
    from megamoe.train.integrity import CheckpointError

    try:
        if args.load:
            export_hf(args.load, args.save, args.dtype)
        else:
            import_hf(args.load_hf, args.save, args.config, args.overrides)
    except (UnsupportedExport, config.ConfigError, FileNotFoundError, ValueError, CheckpointError) as err:
        return cli.fail("convert_checkpoint", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
