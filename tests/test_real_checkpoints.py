"""Full-size wav2vec2-base checkpoints in their published layouts (random values) load as teachers, and the
student initialised from them gives the teacher's features at 16 kHz at every layer.

The layouts are built by the libraries that define them, not written from memory:
- Hugging Face `facebook/wav2vec2-base`: a `Wav2Vec2ForPreTraining` state dict in `pytorch_model.bin` (with the
  quantizer and projection heads a teacher does not use) and its `Wav2Vec2Config` as `config.json`. Checkpoints
  of that age store the positional conv's weight norm as `weight_g`/`weight_v`; today's transformers renames
  them on load (its "legacy" WeightRenaming to `parametrizations.weight.original0/1`), so the test saves the
  legacy names.
- torchaudio `WAV2VEC2_BASE`: the state dict of `torchaudio.models.wav2vec2_base()` under the bundle's file name
  in torch hub's cache, with the same legacy weight-norm names (torch's weight_norm load hook reads them).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchaudio
import transformers

from msr_utmos_cli.training.distill_config import DistillModel
from msr_utmos_cli.training.distill_student import init_from_teacher, student_config
from msr_utmos_cli.model import MOSModel
from msr_utmos_cli.training.teachers import TeacherError, load_teacher

from conftest import speechlike

LEGACY = {".parametrizations.weight.original0": ".weight_g", ".parametrizations.weight.original1": ".weight_v"}
REL_TOL = 1e-4  # ||student - teacher|| / ||teacher|| per layer (measured: about 4e-5, the SFI fit's own error)
ABS_TOL = 1e-3  # largest absolute difference (features reach about 5; measured: below 3e-4)


def legacy_names(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for new, old in LEGACY.items():
            key = key.replace(new, old)
        out[key] = value
    return out


def student_matches_teacher(teacher) -> dict:
    """Initialise a student from `teacher` (the least-squares SFI fit, no refinement steps) and compare the
    features of 2 s of speech-like audio at 16 kHz, CNN output and every encoder layer."""
    torch.manual_seed(0)
    student = MOSModel(student_config(DistillModel(student="base"), teacher)).eval()
    info = init_from_teacher(student, teacher, fit_steps=0)
    wave = torch.from_numpy(speechlike(16000, 2.0, seed=3))[None]
    with torch.no_grad():
        want = teacher(wave)["layers"]
        got, _ = student.extract_features(wave, None, 16000)
        got = [student.conv_features(wave, torch.tensor([wave.shape[1]]), 16000)[0], *got]
    assert len(got) == len(want) == 13
    rel = [float((g - w).norm() / w.norm()) for g, w in zip(got, want)]
    err = [float((g - w).abs().max()) for g, w in zip(got, want)]
    print("relative error per layer:", [f"{r:.1e}" for r in rel], "max abs:", f"{max(err):.1e}")
    assert max(rel) < REL_TOL and max(err) < ABS_TOL
    return info


def test_huggingface_wav2vec2_base_layout(tmp_path):
    cfg = transformers.Wav2Vec2Config(architectures=["Wav2Vec2ForPreTraining"])
    torch.manual_seed(0)
    state = legacy_names(transformers.Wav2Vec2ForPreTraining(cfg).state_dict())
    assert {"wav2vec2.encoder.pos_conv_embed.conv.weight_g", "wav2vec2.encoder.pos_conv_embed.conv.weight_v",
            "quantizer.codevectors", "project_q.weight", "wav2vec2.masked_spec_embed"} <= set(state)
    assert not any("parametrizations" in k for k in state)
    assert sum(v.numel() for k, v in state.items() if k.startswith("wav2vec2.")) > 94_000_000
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    del state

    teacher = load_teacher(str(tmp_path))
    info = student_matches_teacher(teacher)
    # Every teacher tensor lands in the student except the first conv, which the SFI layer stands in for.
    assert info["copied_tensors"] == len(teacher.model.state_dict()) - 1


def test_torchaudio_wav2vec2_base_bundle(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    bundle = torchaudio.pipelines.WAV2VEC2_BASE
    cache = Path(torch.hub.get_dir()) / "checkpoints"

    def offline(url, *args, **kwargs):
        raise OSError(f"offline: {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # a test never downloads
    with pytest.raises(TeacherError, match=f"put the file {Path(bundle._path).name} in {cache}"):
        load_teacher("torchaudio:WAV2VEC2_BASE")  # nothing cached: one line that says where the file goes
    torch.manual_seed(0)
    state = legacy_names(torchaudio.models.wav2vec2_base().state_dict())
    assert "encoder.transformer.pos_conv_embed.conv.weight_g" in state
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(state, cache / Path(bundle._path).name)
    del state

    teacher = load_teacher("torchaudio:WAV2VEC2_BASE")
    info = student_matches_teacher(teacher)
    assert info["copied_tensors"] == len(teacher.model.state_dict()) - 1
    with pytest.raises(TeacherError, match="usable: .*WAV2VEC2_BASE"):
        load_teacher("torchaudio:WAV2VEC2_LARGE_LV60K")  # normalises its waveform first
