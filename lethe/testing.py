"""Tiny random-initialised models of every supported family, built from a config in milliseconds.

For shapes, hooks and algebra in tests; nothing here is trained. The world
models (``lethe.world_models``) are the trained ones.
"""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 97
WIDTH = 32
FFN = 64
LAYERS = 2
HEADS = 2
CONTEXT = 64


def _configs() -> dict[str, tuple[type, object]]:
    common_dec = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    llama_like = dict(hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=CONTEXT,
                      **common_dec)
    return {
        "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config(n_layer=LAYERS, n_embd=WIDTH, n_head=HEADS, n_inner=FFN,
                                                   n_positions=CONTEXT, **common_dec)),
        "gptj": (tf.GPTJForCausalLM, tf.GPTJConfig(n_layer=LAYERS, n_embd=WIDTH, n_head=HEADS, n_inner=FFN,
                                                  rotary_dim=8, n_positions=CONTEXT, **common_dec)),
        "gpt_neox": (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(
            hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            max_position_embeddings=CONTEXT, **common_dec)),
        "opt": (tf.OPTForCausalLM, tf.OPTConfig(
            hidden_size=WIDTH, ffn_dim=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            word_embed_proj_dim=WIDTH, max_position_embeddings=CONTEXT, **common_dec)),
        "llama": (tf.LlamaForCausalLM, tf.LlamaConfig(**llama_like)),
        "mistral": (tf.MistralForCausalLM, tf.MistralConfig(**llama_like)),
        "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config(**llama_like)),
        "bert": (tf.BertForMaskedLM, tf.BertConfig(
            vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, max_position_embeddings=CONTEXT, pad_token_id=0)),
        "roberta": (tf.RobertaForMaskedLM, tf.RobertaConfig(
            vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, max_position_embeddings=CONTEXT + 2, pad_token_id=1)),
        "distilbert": (tf.DistilBertForMaskedLM, tf.DistilBertConfig(
            vocab_size=VOCAB, dim=WIDTH, hidden_dim=FFN, n_layers=LAYERS, n_heads=HEADS,
            max_position_embeddings=CONTEXT, pad_token_id=0)),
        "t5": (tf.T5ForConditionalGeneration, tf.T5Config(
            vocab_size=VOCAB, d_model=WIDTH, d_ff=FFN, d_kv=WIDTH // HEADS, num_layers=LAYERS,
            num_heads=HEADS, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)),
        "bart": (tf.BartForConditionalGeneration, tf.BartConfig(
            vocab_size=VOCAB, d_model=WIDTH, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, encoder_layers=LAYERS,
            decoder_layers=LAYERS, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
            max_position_embeddings=CONTEXT, pad_token_id=1, bos_token_id=0, eos_token_id=2,
            decoder_start_token_id=2, forced_eos_token_id=None)),
    }


TINY_MODEL_TYPES = tuple(_configs())


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A 2-block, 32-wide random model of ``model_type`` in eval mode (dropout off)."""
    configs = _configs()
    if model_type not in configs:
        raise ValueError(f"no tiny config for {model_type!r}; have {sorted(configs)}")
    cls, config = configs[model_type]
    torch.manual_seed(seed)
    model = cls(config)
    model.eval()
    return model


def tiny_inputs(model: torch.nn.Module, batch: int = 2, length: int = 7, seed: int = 0) -> dict:
    """Random token ids valid for ``model`` (with decoder inputs for encoder-decoders)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 4), generator=g)
    return inputs


def tiny_tokenizer(model_type: str = "gpt2", n_words: int = 80):
    """A word-level tokenizer whose ids fit the tiny models' 97-row vocabulary."""
    from lethe.tokenizers import build_world_tokenizer

    style = {"decoder": "gpt2", "mlm": "bert", "seq2seq": "t5"}[_family(model_type)]
    return build_world_tokenizer([f"w{i}" for i in range(n_words)], style)


def _family(model_type: str) -> str:
    from lethe.adapters import get_adapter

    return get_adapter(model_type).family


def save_tiny(model_type: str, dest, seed: int = 0):
    """Save a tiny model and a matching tokenizer as an ordinary Hugging Face folder."""
    from lethe.io import save_pretrained

    tok = tiny_tokenizer(model_type)
    model = tiny_model(model_type, seed=seed)
    cfg = model.config
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        tid = getattr(tok, attr)
        if tid is not None:
            setattr(cfg, attr, tid)
    if getattr(cfg, "is_encoder_decoder", False):
        cfg.decoder_start_token_id = tok.pad_token_id
    return save_pretrained(model, tok, dest)


def _signal_at_step_callback():
    import lightning as L

    class SignalAtStep(L.Callback):
        """Send ``signum`` to this process once ``global_step`` reaches ``step`` (tests of interrupted runs); in a
        ``test`` run (``lethe edit``), once ``step`` batches were edited and scored (before the artifact save)."""

        def __init__(self, step: int, signum: int = 15) -> None:
            self.step, self.signum, self.sent = step, signum, False

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            import os

            if not self.sent and trainer.global_step >= self.step:
                self.sent = True
                os.kill(os.getpid(), self.signum)

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            import os

            if not self.sent and batch_idx + 1 >= self.step:
                self.sent = True
                os.kill(os.getpid(), self.signum)

    return SignalAtStep


def __getattr__(name: str):
    if name == "SignalAtStep":  # built on first use so importing lethe.testing does not import lightning
        return _signal_at_step_callback()
    raise AttributeError(name)
