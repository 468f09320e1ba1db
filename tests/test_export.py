"""Exports of a checkpoint directory: one Lightning checkpoint file, or a Hugging Face model.

The directories are written as HybridParallel writes them (DCP's `state_dict` and
`optimizer_states`, plus meta.pt), from one process without training.
"""

import json
import warnings

import lightning as L
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystemReader

from lightning_parallel import checkpoint, cli
from lightning_parallel.export import ExportError, consolidate, export_hf, hf_record

transformers = pytest.importorskip("transformers")

TINY_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)


class Counter(nn.Module):
    """A module with extra state (a non-tensor entry, and tensors in a list) in its state dict."""

    def __init__(self):
        super().__init__()
        self.calls, self.history = 3, [torch.arange(3.0), torch.ones(2)]

    def get_extra_state(self):
        return {"calls": self.calls, "history": self.history}

    def set_extra_state(self, state):
        self.calls, self.history = state["calls"], state["history"]


class WrapsLlama(L.LightningModule):
    def __init__(self, tie: bool = False, bf16: bool = False):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA, tie_word_embeddings=tie))
        self.temperature = nn.Parameter(torch.tensor(0.7))  # the module's own: not the Hugging Face model's
        self.counter = Counter()
        with torch.no_grad():
            for param in self.model.parameters():  # the norms start at ones: make every tensor its own
                param.add_(torch.randn_like(param))
        if bf16:  # the parameters only: from_pretrained keeps the rotary frequencies in float32 too
            for param in self.model.parameters():
                param.data = param.data.to(torch.bfloat16)

    def forward(self, ids):
        return self.model(ids).logits / self.temperature


def write_checkpoint(path, module, optimizer_elements=1000, record=True):
    """A checkpoint directory as HybridParallel saves it (the optimizer state fake, `optimizer_elements`
    per parameter)."""
    optimizer = {f"state.{name}.exp_avg": torch.ones(optimizer_elements) for name, _ in module.named_parameters()}
    optimizer["param_groups.lr"] = 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"state_dict": module.state_dict(), "optimizer_states": {"0": optimizer}}, checkpoint_id=path,
                 no_dist=True)
    meta = {"epoch": 0, "global_step": 8, "pytorch-lightning_version": L.__version__,
            "hyper_parameters": dict(getattr(module, "hparams", {})), "loops": {"fit_loop": {"marker": 1}}}
    if record:
        meta["hugging_face"] = hf_record(module)
    torch.save(meta, path / checkpoint.META_FILE)
    return path


@pytest.fixture(scope="module", params=[{}, {"tie": True}, {"tie": True, "bf16": True}],
                ids=["untied", "tied", "tied-bf16"])
def saved(request, tmp_path_factory):
    module = WrapsLlama(**request.param).eval()
    return module, write_checkpoint(tmp_path_factory.mktemp("ckpt") / "run.ckpt", module)


def read_requests(monkeypatch) -> list[str]:
    """Records the keys of every entry DCP's file reader is asked to read."""
    requested: list[str] = []
    read_data = FileSystemReader.read_data

    def spy(self, plan, planner):
        requested.extend(item.storage_index.fqn for item in plan.items)
        return read_data(self, plan, planner)

    monkeypatch.setattr(FileSystemReader, "read_data", spy)
    return requested


def saved_names(model_dir) -> set[str]:
    from safetensors import safe_open

    names = set()
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as weights:
            names |= set(weights.keys())
    return names


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


# --------------------------------------------------------------------------- one Lightning file


def test_consolidate_reads_no_optimizer_state(saved, tmp_path, monkeypatch):
    module, path = saved
    requested = read_requests(monkeypatch)
    checkpoint.consolidate(path, tmp_path / "one.ckpt")  # the old import path
    assert requested and all(key.startswith("state_dict.") for key in requested), requested
    assert len(requested) == len(FileSystemReader(path).read_metadata().state_dict_metadata) - (
        len(list(module.parameters())) + 1)  # everything but the optimizer's entries


def test_consolidate_writes_what_dcp_to_torch_save_did(saved, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    module, path = saved
    consolidate(path, tmp_path / "one.ckpt")
    written = torch.load(tmp_path / "one.ckpt", weights_only=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(path, tmp_path / "all.pt")
    assert_same(torch.load(tmp_path / "all.pt", weights_only=False)["state_dict"], written.pop("state_dict"))
    assert_same(torch.load(path / checkpoint.META_FILE, weights_only=False), written)

    loaded = WrapsLlama.load_from_checkpoint(tmp_path / "one.ckpt", map_location="cpu")
    assert_same(module.state_dict(), loaded.state_dict())
    assert loaded.counter.calls == 3 and loaded.hparams.tie == module.hparams.tie


def test_consolidate_refuses_what_is_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a lightning-parallel checkpoint directory"):
        consolidate(tmp_path, tmp_path / "one.ckpt")
    with pytest.raises(FileNotFoundError, match="incomplete checkpoint"):
        consolidate(tmp_path / "run.ckpt.partial", tmp_path / "one.ckpt")


# ------------------------------------------------------------------------------- Hugging Face


def test_hf_record_names_the_one_outermost_pretrained_model():
    module = WrapsLlama()
    record = hf_record(module)
    assert record["prefix"] == "model." and record["class"] == "LlamaForCausalLM"
    assert record["config"] == module.model.config.to_dict()

    deep = nn.Module()
    deep.backbone = nn.ModuleDict({"lm": module.model, "probe": nn.Linear(2, 2)})
    assert hf_record(deep)["prefix"] == "backbone.lm."
    assert hf_record(module.model)["prefix"] == ""
    assert hf_record(nn.Linear(2, 2)) is None
    two = nn.ModuleDict({"a": module.model, "b": transformers.LlamaForCausalLM(module.model.config)})
    assert hf_record(two) is None


def test_export_hf_round_trip(saved, tmp_path, monkeypatch):
    module, path = saved
    requested = read_requests(monkeypatch)
    export_hf(path, tmp_path / "hf")
    assert requested and all(key.startswith("state_dict.model.") for key in requested), requested

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(loaded) is transformers.LlamaForCausalLM
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys, no errors
    assert not [str(w.message) for w in caught if "weight" in str(w.message).lower()]
    assert loaded.config.architectures == ["LlamaForCausalLM"]
    assert loaded.config.tie_word_embeddings == module.hparams.tie
    if module.hparams.tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_same(module.model.state_dict(), loaded.state_dict())
    assert loaded.dtype == module.model.dtype

    # The files hold what save_pretrained writes (one copy of a tied weight), and the same config.
    module.model.save_pretrained(tmp_path / "reference")
    assert saved_names(tmp_path / "hf") == saved_names(tmp_path / "reference")
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == json.loads(
        (tmp_path / "reference" / "config.json").read_text())

    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, module.model(ids).logits, rtol=0, atol=0)


def test_export_hf_writes_experts_as_save_pretrained_does(tmp_path):
    # transformers 5 holds a mixture of experts' weights fused; save_pretrained writes them one
    # expert at a time, the layout of the Hub's checkpoints.
    module = nn.Module()
    torch.manual_seed(0)
    module.moe = transformers.MixtralForCausalLM(transformers.MixtralConfig(**TINY_LLAMA, num_local_experts=4))
    path = write_checkpoint(tmp_path / "run.ckpt", module)
    export_hf(path, tmp_path / "hf")
    module.moe.save_pretrained(tmp_path / "reference")
    assert saved_names(tmp_path / "hf") == saved_names(tmp_path / "reference")
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    assert_same(module.moe.state_dict(), loaded.state_dict())


def test_export_hf_refuses_a_model_changed_after_it_was_built(tmp_path):
    module = WrapsLlama()
    module.model.model.layers[0].mlp.adapter = nn.Linear(32, 4)
    path = write_checkpoint(tmp_path / "run.ckpt", module)
    with pytest.raises(ExportError, match=r"not those of a LlamaForCausalLM built from its config \(missing \[\], "
                                          r"unexpected \['model.layers.0.mlp.adapter.bias'"):
        export_hf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_hf_refuses_a_broken_tie(tmp_path):
    module = WrapsLlama(tie=True)
    module.model.lm_head.weight = nn.Parameter(module.model.lm_head.weight.detach() + 1)
    path = write_checkpoint(tmp_path / "run.ckpt", module)
    with pytest.raises(ExportError, match="lm_head.weight and model.embed_tokens.weight differ"):
        export_hf(path, tmp_path / "hf")


def test_export_hf_refuses_a_used_output_directory(saved, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").touch()
    with pytest.raises(ExportError, match="not an empty directory. Choose a new output directory"):
        export_hf(saved[1], tmp_path / "hf")


# ------------------------------------------------------------------------------------------ CLI


def test_cli_exports_hf(saved, tmp_path, capsys):
    module, path = saved
    cli.main(["consolidate", str(path), str(tmp_path / "hf"), "--format", "hf"])
    assert f"wrote {tmp_path / 'hf'}" in capsys.readouterr().out
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert_same(module.model.state_dict(), loaded.state_dict())


def test_cli_without_a_hugging_face_record_says_what_to_do(tmp_path, capsys):
    path = write_checkpoint(tmp_path / "run.ckpt", WrapsLlama(), record=False)
    with pytest.raises(SystemExit) as exit:
        cli.main(["consolidate", str(path), str(tmp_path / "hf"), "--format", "hf"])
    assert exit.value.code == 1
    error = capsys.readouterr().err
    assert "records no Hugging Face model" in error and "--format lightning" in error, error
    assert not (tmp_path / "hf").exists()


def test_cli_default_format_is_lightning(saved, tmp_path):
    module, path = saved
    cli.main(["consolidate", str(path), str(tmp_path / "one.ckpt")])
    assert_same(module.state_dict(), torch.load(tmp_path / "one.ckpt", weights_only=False)["state_dict"])
