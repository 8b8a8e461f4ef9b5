"""The one model loader: local folders, aliases, and one clear error for each kind of bad input."""

import json

import pytest
import torch

from lethe.adapters import UnknownArchitectureError
from lethe.models import ModelLoadError, TokenizerMismatchError, load_model
from lethe.testing import save_tiny, tiny_tokenizer


@pytest.mark.parametrize("model_type", ["gpt2", "bert", "t5"])
def test_load_local_folder(tmp_path, model_type):
    path = save_tiny(model_type, tmp_path / model_type)
    loaded = load_model(path)
    assert loaded.family == {"gpt2": "decoder", "bert": "mlm", "t5": "seq2seq"}[model_type]
    assert loaded.adapter.model_type == model_type
    assert (path / "model.safetensors").is_file()
    assert not loaded.model.training
    assert load_model(path, dtype="bfloat16").model.dtype == torch.bfloat16


def test_missing_weights_file(tmp_path):
    path = save_tiny("gpt2", tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="has no weights file.*model.safetensors"):
        load_model(path)


def test_corrupt_weights_file(tmp_path):
    path = save_tiny("gpt2", tmp_path / "m")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt weights file .*model.safetensors"):
        load_model(path)


def test_tokenizer_vocabulary_mismatch(tmp_path):
    path = save_tiny("gpt2", tmp_path / "m")
    big = tiny_tokenizer("gpt2", n_words=300)
    big.save_pretrained(tmp_path / "big_tok")
    with pytest.raises(TokenizerMismatchError, match="tokenizer has 30\\d tokens.*embedding has 97 rows"):
        load_model(path, tokenizer=str(tmp_path / "big_tok"))


def test_unknown_architecture_in_a_folder(tmp_path):
    path = save_tiny("gpt2", tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((UnknownArchitectureError, ModelLoadError), match="mamba"):
        load_model(path)


def test_offline_hub_name_says_pass_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="Pass a local path"):
        load_model("no-such-org/no-such-model-xyz")


def test_unknown_alias():
    with pytest.raises(ModelLoadError, match="unknown lethe model alias"):
        load_model("lethe:nope")
