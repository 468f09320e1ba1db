"""Fine-tuning from pretrained weights: a model built empty and read from `init_from` into each
rank's shards trains as one process does after `from_pretrained`; the result exports back to a
Hugging Face directory."""

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lightning_parallel import parity
from lightning_parallel.checkpoint import META_FILE
from lightning_parallel.export import export_hf
from tests.harness import reference, run
from tests.models import save_pretrained_llama

LAYOUTS = {
    "dp2_full": dict(data_parallel=2, sharding="full"),
    "pp2_tp2": dict(pipeline_parallel=2, tensor_parallel=2, micro_batches=4),
    "3d_full": dict(pipeline_parallel=2, tensor_parallel=2, data_parallel=2, sharding="full", micro_batches=4),
}


def _devices(strategy: dict) -> int:
    return strategy.get("data_parallel", 1) * strategy.get("tensor_parallel", 1) * strategy.get("pipeline_parallel", 1)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A Hugging Face Llama directory (safetensors), as `save_pretrained` writes it."""
    path = tmp_path_factory.mktemp("pretrained") / "llama"
    model = save_pretrained_llama(path)
    return path, {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}


def _spec(path) -> dict:
    return dict(model="tests.models:pretrained_llama", model_kwargs={"path": str(path)}, data="tests.models:token_data",
                batch_size=8, max_steps=4)


def _from(init_from, strategy: dict, **extra) -> dict:
    return dict(model="tests.models:llama_from_config", build="empty", devices=_devices(strategy),
                strategy={**strategy, "init_from": str(init_from)}, **extra)


@pytest.mark.parametrize("layout", [pytest.param(name, marks=pytest.mark.slow if name != "3d_full" else ())
                                    for name in LAYOUTS])  # 3d_full loads into FSDP2 shards too
def test_fine_tuning_from_a_hugging_face_directory_matches_one_process(layout, pretrained, tmp_path):
    path, _ = pretrained
    spec = _spec(path)
    extra = {"save_to": str(tmp_path / "ckpt")} if layout == "3d_full" else {}
    run_ = run({**spec, **_from(path, LAYOUTS[layout], **extra)})
    gaps = parity.assert_parity(reference(spec), run_)
    print(f"\nGAPS init_from hf {layout}: loss {gaps['loss_rtol']:.3g} rel, params {gaps['param_atol']:.3g} abs")
    if layout == "3d_full":  # the run's weights go back out as a Hugging Face directory
        from transformers import LlamaForCausalLM

        export_hf(tmp_path / "ckpt", tmp_path / "hf")
        exported = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
        for name, value in exported.state_dict().items():
            assert torch.equal(value, run_["params"][f"model.{name}"]), name


def test_a_one_file_checkpoint_as_init_from(pretrained, tmp_path):
    path, weights = pretrained
    torch.save({"state_dict": weights, "epoch": 3}, tmp_path / "weights.ckpt")
    spec = _spec(path)
    parity.assert_parity(reference(spec), run({**spec, **_from(tmp_path / "weights.ckpt", LAYOUTS["pp2_tp2"])}))


def test_a_hybrid_parallel_checkpoint_directory_as_init_from(pretrained, tmp_path):
    path, weights = pretrained
    directory = tmp_path / "sharded"
    dcp.save({"state_dict": weights, "optimizer_states": {"0": {"never.read": torch.zeros(3)}}},
             checkpoint_id=directory, no_dist=True)
    torch.save({"epoch": 3}, directory / META_FILE)
    spec = _spec(path)
    parity.assert_parity(reference(spec), run({**spec, **_from(directory, LAYOUTS["3d_full"])}))


def test_a_model_built_with_values_reads_init_from_too(pretrained):
    path, _ = pretrained
    spec = _spec(path)
    parallel = {**spec, "model": "tests.models:llama_from_config", "devices": 2,
                "strategy": {"data_parallel": 2, "init_from": str(path)}}
    parity.assert_parity(reference(spec), run(parallel))
