"""Teachers: the HF -> torchaudio wav2vec2 mapping reproduces HF's per-layer features; DistillMOS is exposed as-is."""
import importlib.util

import pytest
import torch

from msr_utmos_cli.training.teachers import TeacherError, load_teacher, load_wav2vec2

transformers = pytest.importorskip("transformers")


def tiny_hf(tmp_path, **kw):
    cfg = transformers.Wav2Vec2Config(conv_dim=(32,) * 7, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                      intermediate_size=64, num_conv_pos_embeddings=16,
                                      num_conv_pos_embedding_groups=4, **kw)
    torch.manual_seed(0)
    model = transformers.Wav2Vec2Model(cfg).eval()
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("kw", [{}, {"feat_extract_norm": "layer", "do_stable_layer_norm": True, "conv_bias": True}])
def test_hf_folder_matches_hf_hidden_states(tmp_path, kw):
    hf = tiny_hf(tmp_path, **kw)
    teacher = load_wav2vec2(str(tmp_path))
    wave = torch.randn(2, 16000)
    with torch.no_grad():
        ref = hf(wave, output_hidden_states=True).hidden_states
    out = teacher(wave)
    # HF hidden_states[i] is the input of layer i; ours[i] the output of layer i (ours[0]: CNN output).
    # A stable-layer-norm model's last HF state has the final LayerNorm applied, so compare the others there.
    upto = len(out["layers"]) - (1 if kw.get("do_stable_layer_norm") else 0)
    errs = [(out["layers"][i] - ref[i]).abs().max().item() for i in range(1, upto)]
    print("max abs error per layer:", errs)
    assert max(errs) < 1e-4
    assert out["mos"] is None and out["lengths"].tolist() == [49, 49]


def test_pytorch_model_bin_loads_weights_only(tmp_path):
    hf = tiny_hf(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    teacher = load_wav2vec2(str(tmp_path))
    wave = torch.randn(1, 8000)
    with torch.no_grad():
        ref = hf(wave, output_hidden_states=True).hidden_states
    assert (teacher(wave)["layers"][2] - ref[2]).abs().max() < 1e-4


def test_hub_id_offline_says_how_to_pass_a_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TeacherError, match="model.teacher=/path"):
        load_teacher("facebook/not-a-real-model-xyz")


def test_missing_path_is_one_line():
    with pytest.raises(TeacherError, match="no such file"):
        load_teacher("./nope/teacher.pt")


@pytest.mark.skipif(importlib.util.find_spec("distillmos") is None, reason="distillmos extra not installed")
def test_distillmos_features_and_mos_match_its_forward():
    teacher = load_teacher("distillmos")
    wave = torch.randn(2, 32000) * 0.1
    out = teacher(wave, torch.tensor([32000, 20000]))
    assert [x.shape[-1] for x in out["layers"]] == [1024, 200]
    assert out["lengths"].tolist() == [101, 63]
    teacher.model.segmenting_in_forward = True
    with torch.no_grad():
        ref = teacher.model(wave[:1]).squeeze(-1)
    assert torch.allclose(out["mos"][:1], ref, atol=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


@pytest.mark.skipif(importlib.util.find_spec("distillmos") is None, reason="distillmos extra not installed")
def test_distillmos_scores_do_not_depend_on_batch_neighbours():
    """A short clip batched with one longer than DistillMOS's 7.68 s window gets its own score."""
    teacher = load_teacher("distillmos")
    g = torch.Generator().manual_seed(0)
    short, long = torch.randn(24000, generator=g) * 0.1, torch.randn(16000 * 9, generator=g) * 0.1
    alone = [teacher(x[None], torch.tensor([x.shape[0]]))["mos"] for x in (short, long)]
    batch = torch.nn.utils.rnn.pad_sequence([short, long], batch_first=True)
    together = teacher(batch, torch.tensor([short.shape[0], long.shape[0]]))["mos"]
    assert torch.allclose(together, torch.cat(alone), atol=1e-5)


def test_dnsmos_teacher_gives_speechmos_p808_exactly_and_ignores_its_neighbours():
    import numpy as np
    from speechmos import dnsmos

    from msr_utmos_cli.testing import speechlike

    teacher = load_teacher("dnsmos")
    waves = [torch.from_numpy(speechlike(16000, s, seed=i)) for i, s in enumerate((2.0, 9.3, 12.5))]
    alone = [float(teacher(w[None])["mos"][0]) for w in waves]
    for w, mos in zip(waves, alone):  # its speechmos reference: run(), SIG/BAK/OVRL network and all
        assert np.float32(mos) == dnsmos.run(w.numpy(), 16000)["p808_mos"]
    batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    out = teacher(batch, torch.tensor([len(w) for w in waves]))
    assert out["mos"].tolist() == alone and out["layers"] == []
    assert len(set(alone)) == 3 and all(1 <= m <= 5 for m in alone)
    with pytest.raises(ValueError, match="empty audio"):
        teacher.p808(np.zeros(0, np.float32))


@pytest.mark.parametrize("teacher, package", [("dnsmos", "speechmos"), ("distillmos", "distillmos")])
def test_a_teacher_whose_package_is_missing_names_the_extra_in_one_line(monkeypatch, teacher, package):
    import sys

    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    with pytest.raises(TeacherError, match=rf"needs `pip install 'msr-utmos\[{teacher}\]'`"):
        load_teacher(teacher)
