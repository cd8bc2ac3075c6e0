"""Models: the shipped tiny CLIP and aesthetic head, open_clip parity, weight pins and offline checks."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import json
import logging
import socket
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from curate.demo.server import Route
from curate.models import clip as clip_module
from curate.models.aesthetic import (
    TINY_AESTHETIC,
    AestheticSpec,
    check_aesthetic_available,
    load_aesthetic,
)
from curate.models.clip import (
    TINY_CLIP,
    TINY_CLIP_SHA256,
    TINY_CLIP_WEIGHTS,
    ClipSpec,
    ModelUnavailable,
    check_clip_available,
    clip_scores,
    load_clip,
)
from curate.stage import RecipeError

ROOT = Path(__file__).resolve().parent.parent
TEST_SEED = 7  # training draws with seed 0, the training script's evaluation with seed 1
# The public layout of LAION's improved aesthetic predictor: Linear layers at these Sequential indices.
LAION_V2_LINEARS = {0: (768, 1024), 2: (1024, 128), 4: (128, 64), 6: (64, 16), 7: (16, 1)}


@pytest.fixture(scope="module")
def script():
    """The training script as a module: its scene renderer and degradations make the held-out sets."""
    spec = importlib.util.spec_from_file_location("train_tiny_models", ROOT / "scripts" / "train_tiny_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_tiny_models", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny():
    return load_clip(TINY_CLIP, device="cpu")


def _scores(model, images, texts):
    return clip_scores(model.encode_images(model.preprocess_images(images)), model.encode_texts(texts))


def test_tiny_clip_prefers_true_captions_on_held_out_images(tiny, script):
    examples = script.clip_eval_set(200, TEST_SEED)
    images = [e[0] for e in examples]
    matched = _scores(tiny, images, [e[1] for e in examples])
    mismatched = _scores(tiny, images, [e[2] for e in examples])
    assert np.mean(matched > mismatched) >= 0.95
    threshold = json.loads((TINY_CLIP_WEIGHTS.parent / "calibration.json").read_text())["clip_score_threshold"]
    assert np.mean(matched >= threshold) >= 0.9
    assert np.mean(mismatched < threshold) >= 0.9


def test_clip_score_equals_direct_open_clip(tiny, script):
    examples = script.clip_eval_set(12, TEST_SEED + 1)
    model, _, preprocess = open_clip.create_model_and_transforms("curate-tiny", pretrained=str(TINY_CLIP_WEIGHTS))
    model.eval()
    tokenizer = open_clip.get_tokenizer("curate-tiny")
    direct = []
    with torch.no_grad():
        for image, caption, *_ in examples:
            image_emb = model.encode_image(preprocess(image).unsqueeze(0))
            text_emb = model.encode_text(tokenizer([caption]))
            image_emb, text_emb = image_emb / image_emb.norm(), text_emb / text_emb.norm()
            direct.append(float((image_emb * text_emb).sum()))
    ours = _scores(tiny, [e[0] for e in examples], [e[1] for e in examples])
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, direct, atol=1e-4)


def test_clip_scores_do_not_depend_on_batch_size(tiny, script):
    examples = script.clip_eval_set(64, TEST_SEED + 2)
    images, texts = [e[0] for e in examples], [e[1] for e in examples]
    reference = _scores(dataclasses.replace(tiny, batch_size=64), images, texts)
    for batch_size in (1, 7):
        np.testing.assert_allclose(_scores(dataclasses.replace(tiny, batch_size=batch_size), images, texts),
                                   reference, atol=1e-5)


def test_embeddings_are_normalised_float32(tiny, script):
    image_emb = tiny.encode_images(tiny.preprocess_images([script.clip_eval_set(1, TEST_SEED)[0][0]]))
    text_emb = tiny.encode_texts(["two red circles on a blue background"])
    for emb in (image_emb, text_emb):
        assert emb.dtype == np.float32 and emb.shape == (1, tiny.embed_dim)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_tiny_clip_is_the_default_and_is_described(tiny):
    info = check_clip_available(ClipSpec())
    assert info["source"] == "shipped" and info["sha256"] == TINY_CLIP_SHA256
    described = tiny.describe()
    assert described["sha256"] == TINY_CLIP_SHA256
    assert (described["device"], described["precision"], described["embed_dim"]) == ("cpu", "fp32", 64)
    assert described["preprocessing"] == {
        "size": 64, "resize_mode": "shortest", "interpolation": "bicubic", "crop": "center",
        "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
    }
    json.dumps(described)


def test_sha256_pin_mismatch_is_refused():
    spec = ClipSpec(checkpoint=str(TINY_CLIP_WEIGHTS), sha256="0" * 64)
    with pytest.raises(ModelUnavailable, match="curate-tiny.safetensors"):
        check_clip_available(spec)
    with pytest.raises(ModelUnavailable, match="pins 0000"):
        load_clip(spec, device="cpu")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    missing = tmp_path / "weights" / "ViT-B-32.pt"
    with pytest.raises(ModelUnavailable, match=f"{missing} does not exist.*checkpoint:"):
        check_clip_available(ClipSpec(model="ViT-B-32", checkpoint=str(missing)))


def test_uncached_pretrained_tag_is_refused_offline_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    spec = ClipSpec(model="ViT-B-32", pretrained="openai")
    started = time.monotonic()
    for check in (check_clip_available, lambda s: load_clip(s, device="cpu")):
        with pytest.raises(ModelUnavailable) as raised:
            check(spec)
        message = str(raised.value)
        assert "ViT-B-32" in message and "'openai'" in message and "checkpoint:" in message
    assert time.monotonic() - started < 5


def test_pretrained_tag_found_in_hf_cache(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    snapshot = hub / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"weights")
    (hub / "models--timm--vit_base_patch32_clip_224.openai" / "refs").mkdir()
    (hub / "models--timm--vit_base_patch32_clip_224.openai" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    info = check_clip_available(ClipSpec(model="ViT-B/32", pretrained="openai"))
    assert info["source"] == "hf_cache"
    assert info["sha256"] == hashlib.sha256(b"weights").hexdigest()
    with pytest.raises(ModelUnavailable, match="open_clip_model.safetensors"):
        check_clip_available(ClipSpec(model="ViT-B-32", pretrained="openai", sha256="f" * 64))


def test_unknown_model_or_tag_is_a_recipe_error():
    with pytest.raises(RecipeError, match="not an open_clip model"):
        check_clip_available(ClipSpec(model="ViT-Q-99"))
    with pytest.raises(RecipeError, match="neither a pretrained tag of ViT-B-32"):
        check_clip_available(ClipSpec(model="ViT-B-32", pretrained="no-such-tag"))


def test_cpu_warning_is_logged_once_per_process(caplog, monkeypatch):
    monkeypatch.setattr(clip_module, "_cpu_warned", False)
    with caplog.at_level(logging.WARNING, logger="curate.models.clip"):
        load_clip(TINY_CLIP, device="cpu")
        load_clip(TINY_CLIP, device="cpu")
    assert [r.getMessage() for r in caplog.records].count("no GPU: CLIP runs on CPU") == 1


def test_tiny_aesthetic_head_orders_clean_above_degraded(tiny, script):
    pairs = script.aesthetic_eval_pairs(200, TEST_SEED)
    head = load_aesthetic(TINY_AESTHETIC, tiny.embed_dim)
    clean = head(tiny.encode_images(tiny.preprocess_images([p[0] for p in pairs])))
    degraded = head(tiny.encode_images(tiny.preprocess_images([p[1] for p in pairs])))
    assert clean.dtype == np.float32 and clean.shape == (200,)
    assert np.mean(clean > degraded) >= 0.9


def _laion_v2_state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for index, (inputs, outputs) in LAION_V2_LINEARS.items():
        state[f"layers.{index}.weight"] = torch.randn(outputs, inputs, generator=generator) / inputs**0.5
        state[f"layers.{index}.bias"] = torch.randn(outputs, generator=generator) * 0.1
    return state


def _laion_v2_reference(state: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    """The published predictor's forward pass in eval mode: the Linear layers in order (no activations)."""
    out = x.astype(np.float64)
    for index in LAION_V2_LINEARS:
        out = out @ state[f"layers.{index}.weight"].double().numpy().T + state[f"layers.{index}.bias"].double().numpy()
    return out[:, 0]


def _serialise(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_laion_v2_public_layout_loads_from_pinned_url(loopback, tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    state = _laion_v2_state()
    body = _serialise(state)
    path = "/sac+logos+ava1-l14-linearMSE.pth"
    loopback.routes[path] = route = Route(body=body, content_type="application/octet-stream")
    url = loopback.url(path)
    spec = AestheticSpec(head="laion_v2", path=url, sha256=hashlib.sha256(body).hexdigest())
    assert check_aesthetic_available(spec)["sha256"] == spec.sha256
    head = load_aesthetic(spec, 768)
    assert route.hits == 1  # the second use reads the cache
    x = np.random.default_rng(0).normal(size=(5, 768)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(head(x), _laion_v2_reference(state, x), atol=1e-4)
    assert head.describe()["sha256"] == spec.sha256


def test_laion_v2_wrong_sha_is_refused_and_not_cached(loopback, tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    loopback.routes["/head.pth"] = Route(body=_serialise(_laion_v2_state()), content_type="application/octet-stream")
    spec = AestheticSpec(head="laion_v2", path=loopback.url("/head.pth"), sha256="a" * 64)
    with pytest.raises(ModelUnavailable, match="head.pth has sha256 .* pins aaaa"):
        load_aesthetic(spec, 768)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_url_without_pin_is_refused(loopback):
    with pytest.raises(RecipeError, match="sha256"):
        check_aesthetic_available(AestheticSpec(head="laion_v2", path=loopback.url("/head.pth")))


def test_laion_v2_on_a_64d_clip_is_a_dimension_error(tmp_path):
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    path.write_bytes(_serialise(_laion_v2_state()))
    with pytest.raises(ModelUnavailable, match="expects 768-d embeddings .*curate-tiny gives 64-d"):
        load_aesthetic(AestheticSpec(head="laion_v2", path=str(path)), 64, clip_name="curate-tiny")


def test_laion_v1_linear_head(tmp_path):
    weight, bias = torch.randn(1, 768), torch.randn(1)
    path = tmp_path / "sa_0_4_vit_l_14_linear.pth"
    path.write_bytes(_serialise({"weight": weight, "bias": bias}))
    head = load_aesthetic(AestheticSpec(head="laion_v1", path=str(path)), 768)
    x = np.eye(768, dtype=np.float32)[:3]
    np.testing.assert_allclose(head(x), weight[0, :3].numpy() + bias.numpy(), atol=1e-5)


def test_laion_head_without_weights_names_the_file():
    with pytest.raises(ModelUnavailable, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        check_aesthetic_available(AestheticSpec(head="laion_v2"))
