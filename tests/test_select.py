"""Tests for hwnoise.select: layer types by duck typing, globs, layer indices, excludes, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hwnoise.select import (
    DEFAULT_EXCLUDE,
    decoder_layer_index,
    decoder_layer_indices,
    format_layer_range,
    is_linear,
    is_rmsnorm,
    parse_layers,
    select_modules,
)


def _tiny_llama(layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


class FusedNorm(nn.Module):
    """vLLM-style RMSNorm: another class name, the same duck type."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = 1e-6


class ColumnParallelLinear(nn.Module):
    """vLLM-style linear that is not an nn.Linear subclass."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_out, n_in))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = FusedNorm(8)
        self.proj = ColumnParallelLinear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.ln_nobias = nn.LayerNorm(8, bias=False)  # centres its input: not an RMSNorm


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.final = nn.RMSNorm(8)


# --- duck typing --------------------------------------------------------------------------


def test_hf_llama_norms_and_linears():
    model = _tiny_llama(3)
    norms = select_modules(model, "rmsnorm")
    assert len(norms) == 2 * 3 + 1  # input + post-attention per layer, plus the final norm
    assert list(norms)[0] == "model.layers.0.input_layernorm" and list(norms)[-1] == "model.norm"
    linears = select_modules(model, "linear")
    assert len(linears) == 7 * 3  # q k v o gate up down; lm_head excluded by default
    assert "lm_head" not in linears
    assert "lm_head" in select_modules(model, "linear", default_exclude=False)


def test_other_architectures_norm_classes():
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    for cls in (Qwen2RMSNorm, MistralRMSNorm, nn.RMSNorm):
        assert is_rmsnorm(cls(16)), cls.__name__


def test_vllm_style_classes_match_by_duck_typing():
    model = Stack()
    norms = select_modules(model, "rmsnorm")
    assert list(norms) == ["blocks.0.norm", "blocks.1.norm", "final"]
    assert list(select_modules(model, "linear")) == ["blocks.0.proj", "blocks.1.proj"]
    assert not is_rmsnorm(nn.LayerNorm(8)) and not is_rmsnorm(nn.LayerNorm(8, bias=False))
    assert not is_rmsnorm(nn.BatchNorm1d(8)) and not is_rmsnorm(nn.Linear(8, 8))
    assert is_linear(nn.Linear(2, 2)) and not is_linear(FusedNorm(8))


def test_peft_style_lora_adapters_excluded_base_kept():
    class LoraLinear(nn.Module):  # the shape of peft's lora.Linear wrapper
        def __init__(self):
            super().__init__()
            self.base_layer = nn.Linear(8, 8)
            self.lora_A = nn.ModuleDict({"default": nn.Linear(8, 2, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(2, 8, bias=False)})

        @property
        def weight(self):  # peft exposes the base weight; it must not be selected twice
            return self.base_layer.weight

    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].q_proj = LoraLinear()
    assert list(select_modules(model, "linear")) == ["layers.0.q_proj.base_layer"]


# --- names and layers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("model.layers.14.input_layernorm", 14),
        ("model.layers.3", 3),
        ("transformer.h.7.mlp.c_fc", 7),
        ("blocks.0.attn", 0),
        ("base_model.model.model.layers.29.self_attn.q_proj.lora_A.default", 29),
        ("model.norm", None),
        ("lm_head", None),
        ("model.layers_extra.3", None),
        ("model.mesh.4", None),
    ],
)
def test_decoder_layer_index(name, index):
    assert decoder_layer_index(name) == index


def test_parse_layers_and_ranges():
    assert parse_layers("14-17") == (14, 15, 16, 17)
    assert parse_layers("0-2, 5") == (0, 1, 2, 5)
    assert parse_layers([3, 1]) == (3, 1)
    assert parse_layers(4) == (4,)
    assert format_layer_range([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    for bad in ("14..17", "17-14", "a", [1.5], [-1], [True]):
        with pytest.raises(ValueError):
            parse_layers(bad)


def test_layers_globs_and_excludes():
    model = _tiny_llama(3)
    picked = select_modules(model, "rmsnorm", layers="1-2")
    assert list(picked) == [f"model.layers.{i}.{n}" for i in (1, 2) for n in ("input_layernorm", "post_attention_layernorm")]
    assert "model.norm" not in picked  # outside decoder layers
    assert list(select_modules(model, "mlp.down_proj")) == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    assert list(select_modules(model, "*.q_proj", layers=[0])) == ["model.layers.0.self_attn.q_proj"]
    union = select_modules(model, ("rmsnorm", "*.o_proj"), layers=[2])
    assert list(union) == [
        "model.layers.2.self_attn.o_proj", "model.layers.2.input_layernorm", "model.layers.2.post_attention_layernorm",
    ]  # model order, whatever the order of the specs
    no_attn = select_modules(model, "linear", exclude=["self_attn"])
    assert all("self_attn" not in n for n in no_attn) and len(no_attn) == 3 * 3
    assert decoder_layer_indices(model) == [0, 1, 2]
    assert set(DEFAULT_EXCLUDE) >= {"lm_head", "embed_tokens", "lora_A", "lora_B"}


# --- errors -------------------------------------------------------------------------------


def test_no_match_lists_existing_names():
    model = _tiny_llama(2)
    with pytest.raises(ValueError) as info:
        select_modules(model, "rmsnrom")  # a typo is a glob that matches nothing
    text = str(info.value)
    assert "'rmsnrom'" in text and "rmsnorm" in text and "model.layers.0" in text
    with pytest.raises(ValueError, match="matched no module"):
        select_modules(nn.Sequential(nn.ReLU()), "linear")
    with pytest.raises(ValueError, match="matched no module"):
        select_modules(model, "linear", exclude=["*"])


def test_layers_outside_model_name_valid_range():
    with pytest.raises(ValueError, match=r"\[5, 9\].*valid: 0-2"):
        select_modules(_tiny_llama(3), "rmsnorm", layers=[1, 5, 9])
    with pytest.raises(ValueError, match="targets"):
        select_modules(_tiny_llama(1), [3])


# --- the bundled model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled():
    from hwnoise.models import load

    model, _ = load("default")
    return model


@pytest.mark.slow
def test_bundled_model_counts(bundled):
    norms = select_modules(bundled, "rmsnorm")
    assert len(norms) == 61
    linears = select_modules(bundled, "linear")
    assert len(linears) == 210 and "lm_head" not in linears  # 211 minus lm_head
    assert decoder_layer_indices(bundled) == list(range(30))
    assert len(select_modules(bundled, "rmsnorm", layers="14-17")) == 8


# --- blocks: attention, mlp, experts (dense and MoE) ------------------------------------------------


def test_attention_and_mlp_blocks_dense():
    model = _tiny_llama(3)
    assert list(select_modules(model, "attention")) == [f"model.layers.{i}.self_attn" for i in range(3)]
    assert list(select_modules(model, "mlp", layers="1-2")) == [f"model.layers.{i}.mlp" for i in (1, 2)]


def test_moe_blocks_outermost_and_experts():
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    from hwnoise.select import is_attention, is_experts, is_mlp

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    mixtral = MixtralForCausalLM(MixtralConfig(**small, num_local_experts=4, num_experts_per_tok=2))
    qwen = Qwen2MoeForCausalLM(Qwen2MoeConfig(**small, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                              num_experts=4, num_experts_per_tok=2))
    for model in (mixtral, qwen):
        # The sparse MoE block as a whole; Qwen2-MoE's shared_expert MLP inside it is not selected twice.
        assert list(select_modules(model, "mlp")) == ["model.layers.0.mlp", "model.layers.1.mlp"]
        assert list(select_modules(model, "experts")) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
        assert list(select_modules(model, "attention")) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert "model.layers.0.mlp.shared_expert.down_proj" in select_modules(qwen, "linear")
    assert not is_mlp(nn.Linear(2, 2)) and not is_attention(nn.Linear(2, 2)) and not is_experts(nn.Linear(2, 2))


def test_block_types_named_in_no_match_errors():
    with pytest.raises(ValueError, match=r"layer types: linear, rmsnorm, attention, mlp, experts"):
        select_modules(_tiny_llama(1), "experts")  # a dense model has no fused experts


def test_layer_range_spec_in_targets():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=20,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    picked = select_modules(model, "layers.14-17")
    assert {decoder_layer_index(n) for n in picked} == {14, 15, 16, 17}
    assert all(isinstance(m, torch.nn.Linear) for m in picked.values()) and len(picked) == 4 * 7
    norms = select_modules(model, ("rmsnorm", "layers.3"))
    assert set(norms) == {"model.layers.3.input_layernorm", "model.layers.3.post_attention_layernorm"}
    with pytest.raises(ValueError, match="valid: 0-19"):
        select_modules(model, "layers.25")


# -- parse_names: the one parser of a targets / exclude list --------------------------------------

def test_parse_names_splits_commas_and_keeps_layer_ranges_whole():
    from hwnoise.select import parse_names

    assert parse_names("linear, *.q_proj") == ("linear", "*.q_proj")
    assert parse_names(["linear", "lm_head"]) == ("linear", "lm_head")
    # "layers.0-3,14" is one layer-range spec to select_modules: its comma does not start a glob "14"
    assert parse_names("layers.0-3,14,*.q_proj") == ("layers.0-3", "layers.14", "*.q_proj")
    model = nn.Sequential()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList(nn.Sequential(nn.Linear(2, 2)) for _ in range(16))
    assert select_modules(model, parse_names("layers.0-3,14")) == select_modules(model, "layers.0-3,14")
    for bad, says in ((["linear", ""], "non-empty"), (["a+b"], "separate"), (3, "string or a sequence")):
        with pytest.raises(ValueError, match=says):
            parse_names(bad, "exclude")


def test_emulation_reads_targets_through_parse_names():
    from hwnoise.emulation import Emulation

    e = Emulation.parse("weights:mxfp4+targets:layers.0-3,14+exclude:*.down_proj,*.up_proj")
    assert e.targets == ("layers.0-3", "layers.14") and e.exclude == ("*.down_proj", "*.up_proj")
    assert Emulation.parse(e.spec) == e
