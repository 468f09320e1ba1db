"""`lightning-parallel consolidate CKPT_DIR OUT [--format lightning|hf]`: a sharded checkpoint
directory as one Lightning checkpoint file or as a Hugging Face model directory.
`lightning-parallel plan ...`: the layouts of a world size ranked by predicted step time, with
the memory each rank would hold (lightning_parallel/planner.py)."""

import argparse
import json
import re

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
    planning = commands.add_parser(
        "plan", help="rank the layouts of a world size by predicted step time, with the memory per rank",
        description="Build the model on the meta device (no weights) and predict, for every valid layout of "
        "--world devices, the elements and bytes each rank holds and the step time; layouts that do not fit "
        "are listed with the reason. Give the model as --config (the main job's YAML, with key=value "
        "overrides) or as --model and --batch.",
    )
    planning.add_argument("overrides", nargs="*", help="key=value overrides of --config")
    planning.add_argument("--config", help="a composed run config (e.g. configs/train.yaml): its model and data")
    planning.add_argument("--model", help="package.module:factory returning the LightningModule")
    planning.add_argument("--kwargs", default="{}", help="the factory's keyword arguments as JSON")
    planning.add_argument("--batch", help="the global training batch as dtype[shape] tensors joined by +, e.g. "
                          "'int64[32,256]*2' (two such tensors) or 'float32[32,10]+int64[32]'")
    planning.add_argument("--global-batch", type=int, help="with --config: the global batch (default: the "
                          "config's batch size x its data-parallel degree)")
    planning.add_argument("--world", type=int, required=True, help="devices (processes) in all")
    planning.add_argument("--machine", default="cpu", choices=sorted(_machines()), help="hardware preset")
    planning.add_argument("--precision", default="32-true")
    planning.add_argument("--tensor-plan", default=None, help="a tensor plan as JSON (default: the config's, or 'auto')")
    planning.add_argument("--expert-plan", default=None, help="experts modules as a JSON list of module-name globs "
                          "(default: the config's, or 'auto': the model's declared ones)")
    planning.add_argument("--top", type=int, default=10, help="layouts to list")
    planning.add_argument("--pythonpath", action="append", default=[],
                          help="a directory to import the model from (e.g. examples, for the main job's gpt.GPT)")
    args = parser.parse_args(argv)
    if args.command == "plan":
        _plan(args, planning)
        return
    try:
        FORMATS[args.format](args.checkpoint_dir, args.output)
    except (ExportError, FileNotFoundError) as error:
        merge.exit(1, f"lightning-parallel consolidate: error: {error}\n")
    print(f"wrote {args.output}")


def _machines():
    from lightning_parallel.planner import MACHINES

    return MACHINES


def _plan(args, parser) -> None:
    from lightning_parallel import planner

    if bool(args.config) == bool(args.model):
        parser.error("give either --config or --model (with --batch)")
    import sys

    sys.path[:0] = args.pythonpath
    if args.config:
        module, batch, tensor_plan, expert_plan = _from_config(args)
    else:
        if not args.batch:
            parser.error("--model needs --batch, e.g. --batch 'int64[32,256]*2'")
        module = planner.build_on_meta(_import(args.model), **json.loads(args.kwargs))
        batch, tensor_plan, expert_plan = _meta_batch(args.batch), "auto", "auto"
    if args.tensor_plan:
        tensor_plan = json.loads(args.tensor_plan)
    if args.expert_plan:
        expert_plan = json.loads(args.expert_plan)
    machine = planner.MACHINES[args.machine]
    predictions = planner.plan(module, batch, args.world, machine, args.precision, tensor_plan, expert_plan=expert_plan)
    print(f"{len(predictions)} layouts of {args.world} devices on {machine.name}, fastest first:")
    print(planner.format_plan(predictions, args.top))
    best = next((p for p in predictions if p.fits), None)
    if best is not None:
        print(f"\nHybridParallel(**{best.option.arguments()})")


def _import(path: str):
    import importlib

    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _meta_batch(text: str):
    """'int64[32,256]*2' or 'int64[32,256]+float32[32,10]' as a tuple of meta tensors."""
    import torch

    tensors = []
    for part in text.split("+"):
        match = re.fullmatch(r"\s*(\w+)\[([\d,\s]+)\](?:\*(\d+))?\s*", part)
        if match is None:
            raise SystemExit(f"lightning-parallel plan: error: --batch part {part!r} is not dtype[shape] or dtype[shape]*n")
        shape = [int(d) for d in match[2].split(",") if d.strip()]
        tensors += [torch.empty(shape, dtype=getattr(torch, match[1]), device="meta")] * int(match[3] or 1)
    return tuple(tensors)


if __name__ == "__main__":
    main()


def _from_config(args):
    """The config's model on meta, its data module's first training batch tiled to the global
    batch, and its tensor and expert plans."""
    import torch
    from torch.utils._pytree import tree_map

    from lightning_parallel import planner
    from lightning_parallel.config import compose, instantiate
    from lightning_parallel.layout import Layout

    cfg = compose(args.config, args.overrides)
    with torch.device("meta"):
        module = instantiate(cfg.model, "model")
    if callable(getattr(module, "configure_model", None)):
        with torch.device("meta"):
            module.configure_model()
    data = instantiate(cfg.data, "data")
    data.setup("fit")
    per_rank = next(iter(data.train_dataloader()))
    strategy = cfg.get("strategy", {})
    world = cfg.trainer.get("devices", 1) * cfg.trainer.get("num_nodes", 1)
    layout = Layout.resolve(world, strategy.get("data_parallel", "auto"), strategy.get("tensor_parallel", 1),
                            strategy.get("pipeline_parallel", 1))
    size = planner.batch_size(per_rank)
    global_batch = args.global_batch or size * layout.dp
    batch = tree_map(lambda t: torch.empty((global_batch, *t.shape[1:]), dtype=t.dtype, device="meta")
                     if isinstance(t, torch.Tensor) else t, per_rank)
    plan = strategy.get("tensor_plan", "auto")
    plan = dict(plan) if hasattr(plan, "items") else plan
    expert_plan = strategy.get("expert_plan", "auto")
    return module, batch, plan, expert_plan if expert_plan == "auto" else list(expert_plan)
