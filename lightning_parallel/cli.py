"""`lightning-parallel consolidate CKPT_DIR OUT [--format lightning|hf]`: a sharded checkpoint
directory as one Lightning checkpoint file or as a Hugging Face model directory."""

import argparse

from lightning_parallel.export import ExportError, consolidate, export_hf

FORMATS = {"lightning": consolidate, "hf": export_hf}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="lightning-parallel")
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser(
        "consolidate",
        help="write a sharded checkpoint directory as one Lightning checkpoint file or a Hugging Face model directory",
        description="Write a checkpoint directory saved by HybridParallel for use on one process, without a process "
        "group. Only the model's weights are read: the optimizer state is neither read nor written.",
    )
    merge.add_argument("checkpoint_dir", help="the checkpoint directory HybridParallel saved (it holds meta.pt)")
    merge.add_argument("output", help="the file (--format lightning) or the new directory (--format hf) to write")
    merge.add_argument(
        "--format", choices=FORMATS, default="lightning",
        help="lightning (default): one checkpoint file for MyModule.load_from_checkpoint, with the "
        "hyperparameters and loop state; hf: the Hugging Face model the LightningModule wraps (e.g. "
        "self.model = LlamaForCausalLM(config)), config.json and safetensors for from_pretrained",
    )
    args = parser.parse_args(argv)
    try:
        FORMATS[args.format](args.checkpoint_dir, args.output)
    except (ExportError, FileNotFoundError) as error:
        merge.exit(1, f"lightning-parallel consolidate: error: {error}\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
