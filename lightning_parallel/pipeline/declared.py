"""Pipeline stages from the plan a Hugging Face transformers model declares, for models torch.fx
cannot trace (transformers 5 dropped fx support).

A model declares its pipeline pieces: `config.base_model_pp_plan` (embedding, the list of
layers, final norm) merged with the head model's `_pp_plan` (lm_head) into `model.pp_plan`.
Each stage runs the model's own forward with the pieces it does not own swapped out for the
duration of the call only (restored in a `finally`), so the model, its parameter names and
checkpoints stay as they were:
- the list of layers becomes a list of this stage's layers (the same layer objects);
- pieces after the layers the stage does not own (norm, lm_head) become nn.Identity();
- stages after the first enter through `inputs_embeds=<hidden state>`, so the embedding is skipped;
  the model's other tensor arguments (attention mask, `labels=`) do not travel between stages:
  every rank reads them from its own batch (`call_by_name`) and the schedule hands each stage its
  micro-batch's slice (torch's stages infer their shapes on first use from uninitialized tensors,
  which an integer argument such as labels must not be);
- `config.layer_types`, which some forwards index by loop position, becomes this stage's slice.
Forwards that do more than this between the pieces are not covered, hence VERIFIED_FAMILIES.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from lightning_parallel.layout import LayoutError
from lightning_parallel.pipeline.cost import Hardware, OpCost
from lightning_parallel.pipeline.split import FlatOutput, _device_of, contiguous_grad, price_call, standing_in_for_meta

# config.model_type values whose forward tests/test_declared.py checks stage by stage against the
# unsplit model. Left out, because their forward does more than the swapped pieces:
# - granite: the base forward multiplies inputs_embeds by config.embedding_multiplier, so every
#   stage entered through inputs_embeds would multiply the hidden state again.
VERIFIED_FAMILIES: frozenset[str] = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma", "gemma2",
    "gemma3_text", "cohere2", "olmo3", "exaone4", "ministral", "mixtral", "qwen3_moe", "gpt2",
})

# Plans for families transformers declares none for, written as transformers writes them (the
# base model's pieces; the head model's), and what a stage that does not own one of the pieces
# before the layers (other than the embedding) runs in its place: GPT-2 adds its position
# embedding and applies dropout after the token embedding, which a later stage, entered through
# inputs_embeds, must not do again.
_OWN_PLANS = {
    "gpt2": dict(
        base={"wte": (["input_ids"], ["inputs_embeds"]), "wpe": (["position_ids"], ["position_embeds"]),
              "drop": (["hidden_states"], ["hidden_states"]), "h": (["hidden_states"], ["hidden_states"]),
              "ln_f": (["hidden_states"], ["hidden_states"])},
        head={"lm_head": (["hidden_states"], ["logits"])},
        stand_ins={"wpe": "zeros", "drop": "identity"},
    ),
}

_INPUTS = ("input_ids", "inputs_embeds")
_CACHES = ("cache", "past_key_values")


@dataclass(frozen=True)
class _Plan:
    before: list[str]  # names relative to the model, in execution order; the first makes inputs_embeds
    layers: str
    num_layers: int
    after: list[str]
    stand_ins: dict[str, str]  # the pieces before the layers but the first: what a stage not owning one runs

    def units(self) -> list[str]:
        return [*self.before, *(f"{self.layers}.{i}" for i in range(self.num_layers)), *self.after]


def _refuse(model: nn.Module, why: str) -> LayoutError:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return LayoutError(
        f"{type(model).__name__} (model_type={model_type!r}) declares a pipeline plan that lightning_parallel "
        f"cannot run: {why}. Pipeline stages from a declared plan are verified for the families "
        f"{sorted(VERIFIED_FAMILIES)}. Set pipeline_parallel=1 for this model."
    )


def _plan_of(model: nn.Module) -> dict | None:
    plan = getattr(model, "pp_plan", None) or getattr(model, "_pp_plan", None) or _own_plan(model)
    return plan if isinstance(plan, dict) and plan else None


def _own_plan(model: nn.Module) -> dict | None:
    own = _OWN_PLANS.get(getattr(getattr(model, "config", None), "model_type", None))
    base = getattr(model, "base_model", None)
    if own is None or base is None:
        return None
    if base is model:
        return dict(own["base"])
    prefix = next(name for name, sub in model.named_modules() if sub is base)
    return {**{f"{prefix}.{n}": io for n, io in own["base"].items()}, **own["head"]}


def declares_plan(model: nn.Module) -> bool:
    return _plan_of(model) is not None


def _read_plan(model: nn.Module) -> _Plan | None:
    plan = _plan_of(model)
    if plan is None:
        return None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in VERIFIED_FAMILIES:
        raise _refuse(model, "its forward has not been verified to run stage by stage")

    # The merged plan lists the head's pieces first; they run after the base model's.
    base = getattr(model, "base_model", model)
    prefix = next((name for name, sub in model.named_modules() if sub is base), "")
    in_base = [n for n in plan if not prefix or n.startswith(prefix + ".")]
    names = in_base + [n for n in plan if n not in in_base]
    try:
        modules = {n: model.get_submodule(n) for n in names}
    except AttributeError as err:
        raise _refuse(model, f"the plan names a module the model does not have ({err})") from err

    lists = [n for n in names if isinstance(modules[n], nn.ModuleList)]
    if len(lists) != 1:
        raise _refuse(model, f"it declares {len(lists)} lists of layers {lists}; exactly one is supported")
    cut = names.index(lists[0])
    before, after = names[:cut], names[cut + 1:]
    stand_ins = {f"{prefix}.{n}" if prefix else n: kind
                 for n, kind in _OWN_PLANS.get(model_type, {}).get("stand_ins", {}).items()}
    if not before or list(plan[before[0]][1]) != ["inputs_embeds"] or any(n not in stand_ins for n in before[1:]):
        raise _refuse(model, f"the pieces before the layers are {before}; one, producing inputs_embeds, is supported")
    multi = [n for n in after if len(plan[n][0]) != 1 or len(plan[n][1]) != 1]
    if multi:
        raise _refuse(model, f"the pieces after the layers {multi} take or give more than one value")

    result = _Plan(before, lists[0], len(modules[lists[0]]), after, {n: stand_ins[n] for n in before[1:]})
    covered = {id(p) for unit in result.units() for p in model.get_submodule(unit).parameters()}
    stray = [n for n, p in model.named_parameters() if id(p) not in covered]
    if stray:
        # No stage would hold, and so train, these.
        raise _refuse(model, f"parameters outside every declared piece, e.g. {stray[:3]}")
    return result


def declared_units(model: nn.Module) -> list[str] | None:
    """Execution-ordered unit names relative to `model`: the pieces before the layers, each
    layer, the pieces after (e.g. ["model.embed_tokens", "model.layers.0", ..., "model.norm",
    "lm_head"]). None if the model declares no pipeline plan. Raises LayoutError for a plan of
    a family not in VERIFIED_FAMILIES or of a shape not supported."""
    plan = _read_plan(model)
    return None if plan is None else plan.units()


def _bind(forward, args: tuple, kwargs: dict) -> dict:
    """The call as {parameter name: value}, what went into **kwargs flattened in."""
    signature = inspect.signature(forward)
    bound = signature.bind(*args, **kwargs)
    call = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise LayoutError(f"Pipeline stages pass the model's inputs by name; {len(value)} extra positional argument(s) have none.")
        else:
            call[name] = value
    if any(call.get(name) is not None for name in _CACHES):
        raise LayoutError("A key/value cache cannot be split across pipeline stages: call the model without one.")
    return call


def _parameter_names(forward) -> set[str]:
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {p.name for p in inspect.signature(forward).parameters.values() if p.kind not in kinds}


def call_by_name(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The model's call with every argument by name: what each rank hands its stages (the
    schedule slices its tensors into micro-batches for every stage alike)."""
    return _bind(model.forward, args, kwargs)


class DeclaredStage(nn.Module):
    """One pipeline stage of a model with a declared plan. Every stage takes the model's call
    by name (`call_by_name`); a later stage also takes the hidden state first, and enters
    through it. A non-last stage returns the hidden state, the last one the model's own output.
    Registers only the modules it owns (the model is not a child), so its parameters() are the
    stage's."""

    def __init__(self, model: nn.Module, units: list[str], is_first: bool, is_last: bool,
                 probe_args: tuple, probe_kwargs: dict) -> None:
        super().__init__()
        plan = _read_plan(model)
        if plan is None:
            raise LayoutError(f"{type(model).__name__} declares no pipeline plan (pp_plan) to cut into stages.")
        everything, units = plan.units(), list(units)
        start = everything.index(units[0]) if units and units[0] in everything else -1
        if start < 0 or everything[start:start + len(units)] != units:
            raise LayoutError(f"A pipeline stage's units must be a contiguous, non-empty slice of {everything}; got {units}.")
        if is_first != (start == 0) or is_last != (start + len(units) == len(everything)):
            raise LayoutError(f"Stage {units} given is_first={is_first}, is_last={is_last}, which its units contradict.")

        object.__setattr__(self, "_model", model)  # not a child: the stage must not own the rest
        object.__setattr__(self, "_base", getattr(model, "base_model", model))
        self.is_first, self.is_last = is_first, is_last
        self.owned = nn.ModuleDict({name.replace(".", "__"): model.get_submodule(name) for name in units})
        self._layers = plan.layers
        self._layer_indices = [int(u.rsplit(".", 1)[1]) for u in units if u.startswith(plan.layers + ".")]
        self._num_layers = plan.num_layers
        self._stand_ins = {name: _stand_in(model.get_submodule(name), kind)
                           for name, kind in [*plan.stand_ins.items(), *((n, "identity") for n in plan.after)]
                           if name not in units}
        self.flat_output = FlatOutput()

        # Decided from the probe alone, so every stage agrees on what crosses between them.
        probe = _bind(model.forward, probe_args, probe_kwargs)
        self._carried = [n for n, v in probe.items() if isinstance(v, torch.Tensor) and n not in _INPUTS]
        self._constants = {n: v for n, v in probe.items() if not isinstance(v, torch.Tensor) and n not in _INPUTS}
        # Arguments the head model consumes itself (labels, logits_to_keep): a non-last stage runs
        # the base model, so that the head's work (loss, logit scaling, slicing) is not done on
        # hidden states.
        self._head_only = (_parameter_names(model.forward) - _parameter_names(self._base.forward)) | {"labels"}

    def forward(self, *args, **kwargs):
        if self.is_first:
            call = _bind(self._model.forward, args, kwargs)
        else:
            (hidden,) = args
            call = {**self._constants, **{n: v for n, v in kwargs.items() if n not in _INPUTS},
                    "inputs_embeds": contiguous_grad(hidden)}
        missing = [n for n in self._carried if not isinstance(call.get(n), torch.Tensor)]
        if missing:
            raise LayoutError(f"The model was probed with tensor argument(s) {missing}, which this call lacks; every call must pass the same arguments.")
        call["use_cache"] = False
        # forward, not __call__: hooks on the whole model (an FSDP root, a profiler) must not
        # act on every stage's partial run.
        with self._swapped():
            if self.is_last:
                return self.flat_output.flatten(self._model.forward(**call))
            output = self._base.forward(**{n: v for n, v in call.items() if n not in self._head_only})
        # A fresh tensor: GPT-2's base forward returns a view (`.view(output_shape)`), which the
        # split-backward schedules (zero_bubble, zbv, dualpipev) detach in place after use.
        return output[0].clone()

    def publish_parameters(self) -> None:
        """Nothing to put back: the stage reads no parameter except through its modules."""

    @contextmanager
    def _swapped(self):
        owner_name, _, attr = self._layers.rpartition(".")
        owner = self._model.get_submodule(owner_name)
        layers = getattr(owner, attr)
        restore = [(owner, attr, layers, None)]
        for name, stand_in in self._stand_ins.items():
            parent_name, _, child = name.rpartition(".")
            parent = self._model.get_submodule(parent_name)
            restore.append((parent, child, getattr(parent, child), stand_in))
        config = self._base.config
        layer_types = getattr(config, "layer_types", None)
        per_layer = isinstance(layer_types, (list, tuple)) and len(layer_types) == self._num_layers
        try:
            setattr(owner, attr, nn.ModuleList([layers[i] for i in self._layer_indices]))
            for parent, child, _, stand_in in restore[1:]:
                setattr(parent, child, stand_in)
            if per_layer:
                config.layer_types = type(layer_types)(layer_types[i] for i in self._layer_indices)
            yield
        finally:
            for parent, child, original, _ in reversed(restore):
                setattr(parent, child, original)
            if per_layer:
                config.layer_types = layer_types


class _Zeros(nn.Module):
    """Stands in for an embedding whose output a later stage must not add again."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.dim, self.dtype = embedding.embedding_dim, embedding.weight.dtype

    def forward(self, indices):
        return torch.zeros(*indices.shape, self.dim, dtype=self.dtype, device=indices.device)


def _stand_in(module: nn.Module, kind: str) -> nn.Module:
    return _Zeros(module) if kind == "zeros" else nn.Identity()


def declared_costs(model: nn.Module, units: list[str], args: tuple, kwargs: dict, hardware: Hardware) -> list[float]:
    """Each unit's priced forward and backward, on the inputs it receives in one forward of
    the whole model (on meta tensors where the forward allows)."""
    try:
        return _declared_costs(model, units, args, kwargs, hardware, on_meta=True)
    except Exception:  # the forward needs real values (a mask it inspects, say)
        return _declared_costs(model, units, args, kwargs, hardware, on_meta=False)


def _declared_costs(model, units, args, kwargs, hardware, on_meta) -> list[float]:
    calls: dict[str, tuple] = {}
    hooks = [
        model.get_submodule(unit).register_forward_pre_hook(
            lambda module, a, kw, unit=unit: calls.setdefault(unit, (a, kw)) and None, with_kwargs=True)
        for unit in units
    ]
    stand_ins = nullcontext() if on_meta else standing_in_for_meta(model, units, _device_of((args, kwargs)))
    try:
        with torch.no_grad(), OpCost(hardware, on_meta), stand_ins:
            model(*args, **{**kwargs, "use_cache": False})
    finally:
        for hook in hooks:
            hook.remove()
    params = {id(p): id(p) for p in model.parameters()}
    costs = []
    for unit in units:
        with OpCost(hardware, on_meta) as counter:
            price_call(model.get_submodule(unit), *calls[unit], on_meta, params)
        costs.append(counter.seconds)
    return costs
