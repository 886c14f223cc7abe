"""Frozen 16 kHz teachers for distillation: wav2vec2-family SSL models and DistillMOS.

Every teacher is called as `teacher(wave16k (B, T), lengths (B,))` and returns
`{"layers": [(B, F, D), ...], "lengths": (B,) valid frames, "mos": (B,) or None}`
without gradients, in eval mode. For wav2vec2, `layers[0]` is the CNN output and
`layers[i]` the output of encoder layer i (1-based), at 50 frames per second.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchaudio.models import wav2vec2_model

SAMPLE_RATE = 16000
HF_SKIP = ("masked_spec_embed", "quantizer.", "project_q.", "project_hid.", "lm_head.", "adapter", "final_proj.",
           "label_embs_concat")
HF_PREFIXES = ("wav2vec2.", "hubert.")
HF_TYPES = ("wav2vec2", "hubert")


class TeacherError(Exception):
    """A teacher could not be loaded; the message is one line naming the cause and the fix."""


class Teacher(nn.Module):
    """Base: frozen, eval mode, no grad; subclasses implement `_forward`."""

    name: str = "teacher"
    has_mos: bool = False

    def freeze(self) -> "Teacher":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "Teacher":  # a teacher never leaves eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, wave: torch.Tensor, lengths: torch.Tensor | None = None) -> dict:
        if lengths is None:
            lengths = torch.full((wave.shape[0],), wave.shape[-1], device=wave.device)
        return self._forward(wave.float(), lengths)


# --- wav2vec2 family ----------------------------------------------------------------------
class Wav2Vec2Teacher(Teacher):
    """A torchaudio `Wav2Vec2Model` plus the kwargs it was built from (`params`)."""

    def __init__(self, model: nn.Module, params: dict, name: str = "wav2vec2"):
        super().__init__()
        self.model, self.params, self.name = model, params, name
        self.freeze()

    @property
    def num_layers(self) -> int:
        return self.params["encoder_num_layers"]

    def _forward(self, wave: torch.Tensor, lengths: torch.Tensor) -> dict:
        x, n = self.model.feature_extractor(wave, lengths)  # (B, T) -> (B, F, C)
        layers = self.model.encoder.extract_features(x, n)
        return {"layers": [x, *layers], "lengths": n, "mos": None}


def default_params(**overrides) -> dict:
    """torchaudio `wav2vec2_model` kwargs of wav2vec2-base, dropouts off (a teacher only runs in eval)."""
    p = dict(extractor_mode="group_norm", extractor_conv_layer_config=[(512, 10, 5)] + [(512, 3, 2)] * 4
             + [(512, 2, 2)] * 2, extractor_conv_bias=False, encoder_embed_dim=768, encoder_projection_dropout=0.0,
             encoder_pos_conv_kernel=128, encoder_pos_conv_groups=16, encoder_num_layers=12, encoder_num_heads=12,
             encoder_attention_dropout=0.0, encoder_ff_interm_features=3072, encoder_ff_interm_dropout=0.0,
             encoder_dropout=0.0, encoder_layer_norm_first=False, encoder_layer_drop=0.0, aux_num_out=None)
    p.update(overrides)
    return p


def params_from_hf_config(cfg: dict) -> dict:
    """Hugging Face `Wav2Vec2Config` (as a dict) -> torchaudio `wav2vec2_model` kwargs."""
    if cfg.get("model_type") not in HF_TYPES:
        raise TeacherError(f"config.json: model_type {cfg.get('model_type')!r} is not one of {', '.join(HF_TYPES)}")
    conv = [list(c) for c in zip(cfg["conv_dim"], cfg["conv_kernel"], cfg["conv_stride"])]
    return default_params(
        extractor_mode="group_norm" if cfg.get("feat_extract_norm", "group") == "group" else "layer_norm",
        extractor_conv_layer_config=[tuple(c) for c in conv], extractor_conv_bias=bool(cfg.get("conv_bias", False)),
        encoder_embed_dim=cfg["hidden_size"], encoder_pos_conv_kernel=cfg["num_conv_pos_embeddings"],
        encoder_pos_conv_groups=cfg["num_conv_pos_embedding_groups"], encoder_num_layers=cfg["num_hidden_layers"],
        encoder_num_heads=cfg["num_attention_heads"], encoder_ff_interm_features=cfg["intermediate_size"],
        encoder_layer_norm_first=bool(cfg.get("do_stable_layer_norm", False)))


def map_hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face wav2vec2 state dict to torchaudio's `Wav2Vec2Model` keys."""
    out = {}
    for key, v in state.items():
        for prefix in HF_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith(HF_SKIP) or not key.startswith(("feature_extractor.", "feature_projection.", "encoder.")):
            continue
        key = key.replace(".weight_g", ".parametrizations.weight.original0")
        key = key.replace(".weight_v", ".parametrizations.weight.original1")
        if key.startswith("feature_projection."):
            key = "encoder." + key
        elif key.startswith("encoder."):
            key = "encoder.transformer." + key[len("encoder."):]
        out[key] = v
    return out


def _build(params: dict, state: dict, source: str, name: str) -> Wav2Vec2Teacher:
    model = wav2vec2_model(**params)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = "; ".join(line.strip() for line in str(e).strip().splitlines()[:3])
        raise TeacherError(f"{source}: weights do not match the wav2vec2 architecture ({detail[:300]})") from None
    return Wav2Vec2Teacher(model, params, name)


def load_hf_dir(folder: str | os.PathLike, name: str | None = None) -> Wav2Vec2Teacher:
    """A Hugging Face model folder: config.json + model.safetensors (or pytorch_model.bin, read weights-only)."""
    folder = Path(folder)
    try:
        params = params_from_hf_config(json.loads((folder / "config.json").read_text()))
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise TeacherError(f"{folder / 'config.json'}: unreadable wav2vec2 config ({type(e).__name__}: {e})") from None
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise TeacherError(f"{folder}: no model.safetensors or pytorch_model.bin")
    return _build(params, map_hf_state(state), str(folder), name or folder.name)


def load_torchaudio_file(path: str | os.PathLike, params: dict | None = None) -> Wav2Vec2Teacher:
    """A torchaudio state dict saved with torch.save: either {"params": {...}, "state_dict": {...}}, or a
    plain state dict with its `wav2vec2_model` kwargs in `params` or in a JSON file of the same stem."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TeacherError(f"{path}: cannot read a torchaudio state dict ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        params, state = obj.get("params", params), obj["state_dict"]
    else:
        state = obj
    if params is None and path.with_suffix(".json").is_file():
        params = json.loads(path.with_suffix(".json").read_text())
    if params is None:
        raise TeacherError(f"{path}: no model params; save {{'params': ..., 'state_dict': ...}} or put the "
                           f"wav2vec2_model kwargs in {path.with_suffix('.json').name}")
    params = default_params(**params)
    params["extractor_conv_layer_config"] = [tuple(c) for c in params["extractor_conv_layer_config"]]
    return _build(params, state, str(path), path.stem)


def load_torchaudio_bundle(name: str) -> Wav2Vec2Teacher:
    """A torchaudio pipeline such as WAV2VEC2_BASE or HUBERT_BASE. Its weights come from torch hub's cache
    ($TORCH_HOME/hub/checkpoints, downloaded there once when missing) and are read weights-only."""
    from torchaudio import pipelines

    bundle = getattr(pipelines, name, None)
    usable = isinstance(bundle, pipelines.Wav2Vec2Bundle) and getattr(bundle, "_model_type", None) == "Wav2Vec2"
    if not usable or bundle._normalize_waveform:  # the large ones normalise the waveform first: not a teacher yet
        known = sorted(n for n, b in vars(pipelines).items() if isinstance(b, pipelines.Wav2Vec2Bundle)
                       and getattr(b, "_model_type", None) == "Wav2Vec2" and not b._normalize_waveform)
        raise TeacherError(f"teacher torchaudio:{name}: not a usable torchaudio wav2vec2 bundle "
                           f"(usable: {', '.join(known)})")
    try:
        model = bundle.get_model(dl_kwargs={"weights_only": True, "progress": False})
    except Exception as e:  # offline, torn file: one answer for the user
        cause = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise TeacherError(f"teacher torchaudio:{name}: could not load its weights ({cause}); offline, put the file "
                           f"{Path(bundle._path).name} in {Path(torch.hub.get_dir()) / 'checkpoints'}") from None
    params = default_params(**{k: v for k, v in bundle._params.items() if "drop" not in k})
    return Wav2Vec2Teacher(model, params, f"torchaudio:{name}")


def load_wav2vec2(source: str, params: dict | None = None) -> Wav2Vec2Teacher:
    """A local HF folder, a local torchaudio file, `torchaudio:BUNDLE`, or a hub id like `facebook/wav2vec2-base`."""
    if source.startswith("torchaudio:"):
        return load_torchaudio_bundle(source[len("torchaudio:"):])
    path = Path(source).expanduser()
    if path.is_dir():
        return load_hf_dir(path)
    if path.is_file():
        return load_torchaudio_file(path, params)
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise TeacherError(f"teacher {source!r}: no such file or folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise TeacherError(f"teacher {source!r}: hub ids need `pip install 'msr-utmos[hub]'`; or pass a local "
                           "folder with config.json + model.safetensors (--set model.teacher=/path)") from None
    try:
        folder = snapshot_download(source, allow_patterns=["config.json", "model.safetensors", "pytorch_model.bin"])
    except Exception as e:  # offline, missing repo, auth: one answer for the user
        cause = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise TeacherError(f"teacher {source!r}: could not download from the Hugging Face hub ({cause}); offline, "
                           "download it elsewhere and pass the folder (config.json + model.safetensors) with "
                           "--set model.teacher=/path/to/folder") from None
    return load_hf_dir(folder, name=source)


def import_extra(module: str, extra: str, teacher: str):
    """A teacher's package, or a one-line TeacherError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TeacherError(f"the {teacher} teacher needs `pip install 'msr-utmos[{extra}]'` ({e})") from None


# --- DistillMOS ---------------------------------------------------------------------------
class DistillMOSTeacher(Teacher):
    """DistillMOS (a 16 kHz speech-quality MOS predictor) with its per-frame features exposed.

    layers: [CNN features (B, F, 1024), transformer output (B, F, 200)] at 50 frames per second,
    taken from the first 7.68 s window; mos: its 1-5 MOS over the whole input.
    """

    name, has_mos = "distillmos", True

    def __init__(self):
        super().__init__()
        self.sqa = sqa = import_extra("distillmos.sqa", "distillmos", "DistillMOS")
        with contextlib.redirect_stdout(io.StringIO()):  # it prints where it loaded from
            self.model = sqa.ConvTransformerSQAModel(load_weights=True, segmenting_in_forward=False)
        self.freeze()

    def _windows(self, x: torch.Tensor, n: int) -> list[torch.Tensor]:
        """Their segmentation of one item's n valid samples: one window padded to 7.68 s, or
        overlapping windows hopping <= 1 s. Per item, so a batch neighbour never changes a score."""
        seq, hop = self.sqa.SEQ_LEN, self.sqa.MAX_HOP_LEN
        over = n - seq
        if over <= 0:
            return [nn.functional.pad(x[:n], (0, -over))]
        hops = int(math.ceil(over / hop)) + 1
        return [x[s:s + seq] for s in (int(c * over) for c in torch.linspace(0, 1, hops).tolist())]

    def _forward(self, wave: torch.Tensor, lengths: torch.Tensor) -> dict:
        per_item = [self._windows(x, int(n)) for x, n in zip(wave, lengths)]
        owner = torch.tensor([i for i, w in enumerate(per_item) for _ in w], device=wave.device)
        first = torch.tensor([0] + [len(w) for w in per_item[:-1]], device=wave.device).cumsum(0)
        x = torch.stack([w for ws in per_item for w in ws])  # (W, L): all windows of all items
        x = x / (x.abs().amax(dim=1, keepdim=True) + 1e-8)
        m = self.model.transformer_pool_attn
        cnn = self.model.cnn(x).permute(0, 2, 1)  # (W, 384, 1024)
        h = m.norm_input(cnn.transpose(1, 2)).transpose(1, 2)
        h = m.norm_trans(m.transformer(h).transpose(1, 2)).transpose(1, 2)  # (W, 384, 200)
        q = torch.sigmoid(m.pool(h).squeeze(-1))  # (W,)
        counts = torch.bincount(owner, minlength=len(per_item)).to(q.dtype)
        q = torch.zeros(len(per_item), device=q.device, dtype=q.dtype).index_add_(0, owner, q) / counts
        frames = torch.clamp(torch.div(lengths, 320, rounding_mode="floor") + 1, max=cnn.shape[1])
        return {"layers": [cnn[first], h[first]], "lengths": frames, "mos": 1 + 4 * q}


# --- DNSMOS P.808 -------------------------------------------------------------------------
class DNSMOSTeacher(Teacher):
    """DNSMOS P.808 (speechmos' ONNX model), a second 16 kHz judge: scores only, no features.

    Its errors differ from DistillMOS's (it orders noise and reverberation better, codecs worse), so
    a blend of the two ranks known degradation ladders better than either (docs/experiments.md).
    speechmos' `run` also runs its SIG/BAK/OVRL network, 9x the P.808 cost; this runs P.808 alone,
    on speechmos' own segments (the clip repeated to 9.01 s, 9.01 s windows 1 s apart), and gives
    `run(...)["p808_mos"]` exactly (tests/test_teachers.py).
    """

    name, has_mos = "dnsmos", True

    def __init__(self):
        super().__init__()
        self.lib = dnsmos = import_extra("speechmos.dnsmos", "dnsmos", "DNSMOS")
        if dnsmos.dnsmos is None:  # speechmos builds its sessions on the first run()
            dnsmos.run(np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)

    def p808(self, x: np.ndarray) -> float:
        """(T,) float32 at 16 kHz in [-1, 1] -> P.808 MOS."""
        if not len(x):  # speechmos would loop forever doubling it
            raise ValueError("DNSMOS: empty audio")
        n = int(self.lib.INPUT_LENGTH * SAMPLE_RATE)
        while len(x) < n:
            x = np.append(x, x)
        judge, scores = self.lib.dnsmos, []
        for i in range(int(np.floor(len(x) / SAMPLE_RATE) - self.lib.INPUT_LENGTH) + 1):
            seg = x[i * SAMPLE_RATE: i * SAMPLE_RATE + n]
            if len(seg) == n:
                mel = np.asarray(judge.audio_melspec(audio=seg[:-160]), np.float32)[None]
                scores.append(judge.p808_onnx_sess.run(None, {"input_1": mel})[0][0][0])
        return float(np.mean(scores))

    def _forward(self, wave: torch.Tensor, lengths: torch.Tensor) -> dict:
        mos = [self.p808(x[:int(n)].clamp(-1, 1).cpu().numpy()) for x, n in zip(wave, lengths)]
        return {"layers": [], "lengths": lengths, "mos": torch.tensor(mos, dtype=torch.float32)}


def load_teacher(source: str, kind: str = "auto") -> Teacher:
    """`distillmos`, `dnsmos`, or a wav2vec2-family model (local HF folder, torchaudio file, or hub id)."""
    if kind == "auto":
        kind = source if source in ("distillmos", "dnsmos") else "wav2vec2"
    if kind == "distillmos":
        return DistillMOSTeacher()
    if kind == "dnsmos":
        return DNSMOSTeacher()
    if kind == "wav2vec2":
        return load_wav2vec2(source)
    raise TeacherError(f"teacher kind must be auto, wav2vec2, distillmos or dnsmos, got {kind!r}")
