"""load_weights: the three checkpoint forms into plain, tensor-parallel + FSDP2, and pipeline-stage
(meta) tensors, each rank reading only its own regions."""

import argparse
import datetime
import json
import socket
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_parallel.weights import checkpoint_kind, load_weights

KINDS = ["hf", "sharded", "file"]


def llama_config(**kwargs) -> LlamaConfig:
    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    return LlamaConfig(**{**sizes, **kwargs})


class Wrapped(pl.LightningModule):
    """A LightningModule holding the Hugging Face model as a child, as users write it."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.model = LlamaForCausalLM(config)


def write_checkpoints(root: Path, config: LlamaConfig, dtype=torch.float32, hf_shard_size="5GB") -> dict:
    """The same weights in the three forms under root/{hf,sharded,file.ckpt}; returns them by
    the LightningModule's names."""
    torch.manual_seed(0)
    module = Wrapped(config).to(dtype)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    module.model.save_pretrained(root / "hf", max_shard_size=hf_shard_size)
    optimizer_state = {"0": {"state.model.lm_head.weight.exp_avg": torch.randn(3, 3)}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # saved by one process
        dcp.save({"state_dict": module.state_dict(), "optimizer_states": optimizer_state}, checkpoint_id=root / "sharded")
    torch.save({"epoch": 1}, root / "sharded" / "meta.pt")
    torch.save({"state_dict": module.state_dict(), "epoch": 1}, root / "file.ckpt")
    return state


def paths(root: Path) -> dict:
    return {"hf": root / "hf", "sharded": root / "sharded", "file": root / "file.ckpt"}


def assert_equal_state(module: nn.Module, expected: dict) -> None:
    actual = module.state_dict()
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert actual[name].dtype == torch.float32, name
        assert torch.equal(actual[name], value.float()), name


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    return root, write_checkpoints(root, llama_config())


# ---------------------------------------------------------------- one process, plain tensors


@pytest.mark.parametrize("kind", KINDS)
def test_one_process_loads_exact_values(kind, llama_dir):
    root, state = llama_dir
    assert checkpoint_kind(paths(root)[kind]) == kind
    torch.manual_seed(1)
    module = Wrapped(llama_config())
    loaded = load_weights(module, paths(root)[kind])
    assert sorted(loaded) == sorted(state)
    assert loaded.unused == []
    assert_equal_state(module, state)


def test_hf_bf16_arrives_as_fp32(tmp_path):
    state = write_checkpoints(tmp_path, llama_config(), dtype=torch.bfloat16)
    module = Wrapped(llama_config())
    load_weights(module, tmp_path / "hf")
    assert_equal_state(module, state)  # bf16 values, held in fp32


def test_hf_tied_embeddings_and_many_files(tmp_path):
    config = llama_config(tie_word_embeddings=True)
    state = write_checkpoints(tmp_path, config, hf_shard_size="20KB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    module = Wrapped(config)
    assert module.model.lm_head.weight is module.model.model.embed_tokens.weight
    loaded = load_weights(module, tmp_path / "hf")
    assert "model.lm_head.weight" in loaded  # read as embed_tokens.weight, absent from the files
    assert_equal_state(module, state)


def test_sharded_reads_no_optimizer_state(llama_dir, monkeypatch):
    root, _ = llama_dir
    read = []
    original = dcp.FileSystemReader.read_data

    def spy(self, plan, planner):
        read.extend(item.storage_index.fqn for item in plan.items)
        return original(self, plan, planner)

    monkeypatch.setattr(dcp.FileSystemReader, "read_data", spy)
    load_weights(Wrapped(llama_config()), paths(root)["sharded"])
    assert read and all(key.startswith("state_dict.") for key in read), read


def test_file_with_unsafe_hyperparameters_and_bare_state_dict(tmp_path):
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    state = source.state_dict()
    torch.save({"state_dict": state, "hyper_parameters": argparse.Namespace(lr=0.1)}, tmp_path / "lightning.ckpt")
    torch.save(state, tmp_path / "bare.pt")
    for name in ("lightning.ckpt", "bare.pt"):
        target = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        loaded = load_weights(target, tmp_path / name)
        assert sorted(loaded) == sorted(state)  # persistent buffers too (running stats, count)
        for key, value in state.items():
            assert torch.equal(target.state_dict()[key], value), (name, key)


def test_extra_keys_are_reported_not_loaded(tmp_path):
    state = {"0.weight": torch.ones(3, 4), "0.bias": torch.ones(3), "9.weight": torch.ones(2)}
    torch.save(state, tmp_path / "w.pt")
    loaded = load_weights(nn.Sequential(nn.Linear(4, 3)), tmp_path / "w.pt")
    assert sorted(loaded) == ["0.bias", "0.weight"] and loaded.unused == ["9.weight"]


def test_not_strict_a_tensor_the_checkpoint_lacks_keeps_its_value(tmp_path):
    """A fine-tuning head the pretrained weights do not have keeps its initialization."""
    torch.save({"0.weight": torch.ones(3, 4), "0.bias": torch.ones(3)}, tmp_path / "w.pt")
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    head = model[1].weight.detach().clone()
    loaded = load_weights(model, tmp_path / "w.pt", strict=False)
    assert sorted(loaded) == ["0.bias", "0.weight"] and loaded.missing == ["1.bias", "1.weight"]
    assert torch.equal(model[0].weight, torch.ones(3, 4)) and torch.equal(model[1].weight, head)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kind", KINDS)
def test_missing_parameter_is_named(kind, llama_dir):
    root, _ = llama_dir
    module = Wrapped(llama_config())
    module.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"lacks 2 of the module's tensors: extra.bias, extra.weight;.*has \d+ tensors: "):
        load_weights(module, paths(root)[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_shape_mismatch_is_named(kind, llama_dir):
    root, _ = llama_dir
    module = Wrapped(llama_config(intermediate_size=48))
    with pytest.raises(ValueError, match=r"model.model.layers.0.mlp.down_proj.weight: module \(32, 48\), checkpoint \(32, 64\)"):
        load_weights(module, paths(root)[kind])


def test_paths_of_no_accepted_form(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="absent.*does not exist.*Hugging Face.*lightning-parallel.*torch"):
        checkpoint_kind(tmp_path / "absent")
    for name, why in [("empty", "neither"), ("notes.txt", "not a torch.save file"), ("model.safetensors", "pass the directory")]:
        with pytest.raises(ValueError, match=f"{name}.*{why}.*Expected a Hugging Face"):
            load_weights(nn.Linear(2, 2), tmp_path / name)
    torch.save({"other": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no key of .* names a tensor of the module"):
        load_weights(nn.Linear(2, 2), tmp_path / "other.pt")


# ---------------------------------------------------------------- four processes (gloo)
# "2d": tensor parallel (q/k/v/o, mlp, lm_head) on tp, FSDP2 on dp; vocab 65 makes the
# embedding's and lm_head's shards uneven (and lm_head's strided: tp, then dp).
# "pp": a (pp, tp) mesh; each pipeline rank materializes only its stage, the rest stays meta.
MP_CONFIG = dict(vocab_size=65)
TP_PLAN = {**{f"self_attn.{p}_proj": "colwise" for p in "qkv"}, "self_attn.o_proj": "rowwise",
           "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise"}


def _parallel_model(layout: str, mesh, pp_rank: int) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    with torch.device("meta"):
        module = Wrapped(llama_config(**MP_CONFIG))
    llama = module.model
    for layer in llama.model.layers:
        parallelize_module(layer, mesh["tp"], {k: styles[v]() for k, v in TP_PLAN.items()})
    parallelize_module(llama, mesh["tp"], {"lm_head": ColwiseParallel()})
    if layout == "2d":
        for layer in llama.model.layers:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(llama, mesh=mesh["dp"])
        module.to_empty(device="cpu")
    else:
        stage = [llama.model.embed_tokens, llama.model.layers[0]] if pp_rank == 0 else \
            [llama.model.layers[1], llama.model.norm, llama.lm_head]
        for part in stage:
            part.to_empty(device="cpu")
    for tensor in module.state_dict().values():
        if not tensor.is_meta:
            tensor.fill_(-1.0)
    return module


def _compare(module: nn.Module, expected: dict) -> dict:
    from torch.distributed.tensor import DTensor

    result = {"meta": [], "wrong": [], "local": {}}
    for name, value in module.state_dict().items():
        if value.is_meta:
            result["meta"].append(name)
            continue
        full = value
        if isinstance(value, DTensor):
            result["local"][name] = [list(value.to_local().shape), str(value.placements)]
            full = value.full_tensor()
        if not torch.equal(full, expected[name]):
            result["wrong"].append(name)
    return result


def _worker(rank: int, world: int, port: int, root: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    # A hang (one rank raising, the others waiting in a collective) fails in a minute.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    expected = torch.load(Path(root, "file.ckpt"), weights_only=True)["state_dict"]  # tiny: the test's reference
    results = {}
    for layout, dims, names in [("2d", (2, 2), ("dp", "tp")), ("pp", (2, 2), ("pp", "tp"))]:
        mesh = init_device_mesh("cpu", dims, mesh_dim_names=names)
        pp_rank = mesh["pp"].get_local_rank() if layout == "pp" else 0
        for kind, path in paths(Path(root)).items():
            module = _parallel_model(layout, mesh, pp_rank)
            try:
                loaded = load_weights(module, path)
                results[f"{layout}-{kind}"] = {**_compare(module, expected), "loaded": sorted(loaded)}
            except Exception as error:  # reported by the test of this case
                results[f"{layout}-{kind}"] = {"error": repr(error)}
    results["errors"] = _errors_seen_by_some_ranks(mesh, pp_rank, rank, Path(root))  # the (pp, tp) mesh
    Path(root, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _errors_seen_by_some_ranks(mesh, pp_rank: int, rank: int, root: Path) -> list[str]:
    """Only stage 1 holds a tensor the checkpoint lacks; only rank 3 is given a wrong path."""
    lacking = _parallel_model("pp", mesh, pp_rank)
    lacking.extra = nn.Linear(2, 2, device="cpu" if pp_rank == 1 else "meta")
    wrong_path = root / ("absent" if rank == 3 else "file.ckpt")
    errors = []
    for module, path in [(lacking, root / "file.ckpt"), (_parallel_model("pp", mesh, pp_rank), wrong_path)]:
        try:
            load_weights(module, path)
            errors.append("no error")
        except Exception as error:
            errors.append(f"{type(error).__name__}: {error}")
    return errors


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    write_checkpoints(root, llama_config(**MP_CONFIG))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(4, port, str(root)), nprocs=4, join=True)
    return [json.loads(Path(root, f"rank{r}.json").read_text()) for r in range(4)]


@pytest.mark.parametrize("kind", KINDS)
def test_tensor_parallel_and_fsdp_shards_load_exactly(kind, four_ranks):
    all_names = sorted(Wrapped(llama_config(**MP_CONFIG)).state_dict())
    for rank, results in enumerate(four_ranks):
        result = results[f"2d-{kind}"]
        assert "error" not in result, (rank, result)
        assert result["wrong"] == [] and result["meta"] == [], (rank, result)
        assert result["loaded"] == all_names, rank
    # The layout holds what this test is for: uneven FSDP2 shards, strided (tp, then dp) ones.
    shards = {name: sorted(r[f"2d-{kind}"]["local"][name][0][0] for r in four_ranks)
              for name in ("model.model.embed_tokens.weight", "model.lm_head.weight")}
    assert shards == {"model.model.embed_tokens.weight": [32, 32, 33, 33], "model.lm_head.weight": [16, 16, 16, 17]}
    assert "_StridedShard" in four_ranks[0][f"2d-{kind}"]["local"]["model.lm_head.weight"][1]


@pytest.mark.parametrize("kind", KINDS)
def test_other_stages_tensors_stay_meta(kind, four_ranks):
    for rank, results in enumerate(four_ranks):
        result = results[f"pp-{kind}"]
        assert "error" not in result, (rank, result)
        assert result["wrong"] == [], (rank, result)
        names = Wrapped(llama_config(**MP_CONFIG)).state_dict()
        first = [n for n in names if n.startswith(("model.model.embed_tokens.", "model.model.layers.0."))]
        held = first if rank < 2 else sorted(set(names) - set(first))  # mesh (pp, tp): ranks 0, 1 are stage 0
        assert result["loaded"] == sorted(held), rank
        assert sorted(result["meta"]) == sorted(set(names) - set(held)), rank


def test_an_error_seen_by_some_ranks_is_raised_by_all(four_ranks):
    lacking, wrong_path = zip(*(results["errors"] for results in four_ranks))
    assert len(set(lacking)) == 1 and "lacks 2 of the module's tensors: extra.bias, extra.weight" in lacking[0]
    assert wrong_path[3].startswith("FileNotFoundError") and "absent does not exist" in wrong_path[3]
    for error in wrong_path[:3]:
        assert error.startswith("RuntimeError") and "could not be opened on every rank" in error and "rank 3" in error
