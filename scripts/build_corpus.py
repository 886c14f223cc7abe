"""Build a deterministic multi-rate speech-quality corpus from offline Debian sources.

Sources: the English Asterisk prompts (real studio speech, 8 kHz), Debian synthesizers (espeak-ng
22.05 kHz, festival diphone 16 kHz and HTS 32 kHz, flite 8/16 kHz) speaking a fixed list of generated
English sentences, and optionally the /usr/share/sounds/alsa words (48 kHz). Each utterance yields a
few clips: clean or degraded (codec, noise, clipping, packet loss, low-pass) at a graded severity 1..4,
then presented at a sampling rate drawn from RATES. Upsampling is band-limited (resample_poly), and
`bandwidth_hz` records the lowest Nyquist or low-pass the content passed through.

    python scripts/build_corpus.py --out corpus/ --seed 0 [--max-clips N] [--rate-ladder]
    python scripts/build_corpus.py --examples examples/
    python scripts/build_corpus.py --fingerprint corpus/    # compare with the digests in docs/training.md

It runs scripts/install_corpus_tools.sh (apt-get) first when a tool, voice or codec is missing
(--no-install: build from what exists). Same seed -> identical manifest and audio.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import firwin, resample_poly

RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)  # presentation rates
LADDER_RATES = (8000, 16000, 22050, 24000, 44100, 48000)  # --rate-ladder: the same clip at each
LADDER_BANDWIDTH = 3500  # ladder clips are low-passed below this (Hz) so every rate carries them whole
LADDER_CLIPS = 24
TARGET_RMS_DB = -26.0  # output level (dBFS RMS), then scaled down if the peak would exceed PEAK
PEAK = 0.99
TEXT_SEED = 20240601  # the sentence list is fixed, whatever --seed
N_SENTENCES = 300
VOICES_PER_SENTENCE = 3  # each sentence is spoken by this many synthetic voices
VARIANTS_PER_UTT = 2  # clips per source utterance
P_CLEAN = 0.25  # probability a variant is left undegraded (at most one clean variant per utterance)
SPLIT_FRACTIONS = (("train", 0.8), ("valid", 0.1), ("test", 0.1))
HELD_OUT = {("codec_codec2", 3), ("packet_loss", 3)}  # recipe variants that appear only in test
P_HELD_OUT = 0.3  # chance a degraded test clip is forced onto a held-out recipe
MIN_ASTERISK_S, MAX_ASTERISK_S = 1.0, 20.0  # skip single digits/letters and the few long menus
ASTERISK_ROOT = Path("/usr/share/asterisk/sounds")
ASTERISK_DIRS = ("en", "en_US_f_Allison")  # English only: the other languages are reserved
ALSA_DIR = Path("/usr/share/sounds/alsa")
MANIFEST_COLUMNS = (
    "path", "sample_rate", "bandwidth_hz", "duration_s", "split", "source", "voice", "utt_id",
    "group_id", "source_rate", "degradation", "severity", "recipe", "text",
)

# Synthetic voices: name -> (engine, source label, voice argument, native rate).
VOICES = {
    "espeak-us": ("espeak", "espeak", "en-us", 22050),
    "espeak-gb-f": ("espeak", "espeak", "en-gb+f3", 22050),
    "festival-kal": ("festival", "festival-kal", "voice_kal_diphone", 16000),
    "festival-ked": ("festival", "festival-ked", "voice_ked_diphone", 16000),
    "festival-slt-hts": ("festival", "festival-slt-hts", "voice_cmu_us_slt_arctic_hts", 32000),
    "flite-kal": ("flite", "flite", "kal", 8000),
    "flite-slt": ("flite", "flite", "slt", 16000),
    "flite-rms": ("flite", "flite", "rms", 16000),
    "flite-awb": ("flite", "flite", "awb", 16000),
}

# Codec ladders: type -> [(severity, codec rate, ffmpeg encoder args, extension, nominal cutoff Hz)].
CODECS = {
    # opus runs at the rate whose Nyquist is its audio bandwidth (FB/WB/MB/NB), so the band is exact
    "codec_opus": [(s, r, ["-c:a", "libopus", "-b:a", b, "-cutoff", str(c)], "opus", c)
                   for s, r, b, c in ((1, 48000, "32k", 20000), (2, 16000, "16k", 8000),
                                      (3, 12000, "12k", 6000), (4, 8000, "6k", 4000))],
    "codec_mp3": [(s, r, ["-c:a", "libmp3lame", "-b:a", b, "-cutoff", str(c)], "mp3", c)
                  for s, r, b, c in ((1, 32000, "64k", 14000), (2, 22050, "32k", 8000),
                                     (3, 16000, "16k", 5500), (4, 8000, "8k", 3000))],
    "codec_amrnb": [(s, 8000, ["-c:a", "libopencore_amrnb", "-b:a", b], "amr", 4000)
                    for s, b in ((1, "12200"), (2, "7950"), (3, "5900"), (4, "4750"))],
    "codec_amrwb": [(s, 16000, ["-c:a", "libvo_amrwbenc", "-b:a", b], "amr", 8000)
                    for s, b in ((1, "23850"), (2, "15850"), (3, "12650"), (4, "6600"))],
    "codec_codec2": [(s, 8000, ["-c:a", "libcodec2", "-mode", m], "c2", 4000)
                     for s, m in ((1, "3200"), (2, "1600"), (3, "1200"), (4, "700C"))],
    "codec_g726": [(s, 8000, ["-c:a", "g726", "-b:a", b], "wav", 4000)
                   for s, b in ((1, "40k"), (2, "32k"), (3, "24k"), (4, "16k"))],
    "codec_gsm": [(3, 8000, ["-c:a", "libgsm"], "gsm", 4000)],
    "codec_g722": [(1, 16000, ["-c:a", "g722"], "g722", 8000)],
    "codec_mulaw": [(1, 8000, ["-c:a", "pcm_mulaw"], "wav", 4000)],
    "codec_alaw": [(1, 8000, ["-c:a", "pcm_alaw"], "wav", 4000)],
}
SNR_DB = {1: 30.0, 2: 20.0, 3: 10.0, 4: 0.0}
BABBLE_SNR_DB = {1: 20.0, 2: 10.0, 3: 5.0, 4: 0.0}
CLIP_FRACTION = {1: 0.5, 2: 0.25, 3: 0.12, 4: 0.05}  # clip level as a fraction of the peak
LOSS_RATE = {1: 0.02, 2: 0.05, 3: 0.10, 4: 0.20}  # fraction of 20 ms frames zeroed
LOWPASS_RATE = {1: 16000, 2: 11025, 3: 8000, 4: 6000}  # band limit = half of this
GROUP_WEIGHTS = {"codec": 0.4, "noise": 0.3, "clipping": 0.1, "packet_loss": 0.1, "lowpass": 0.1}


@dataclass
class Utterance:
    """One source utterance: real prompt, synthetic sentence or ALSA word."""

    utt_id: str
    group_id: str  # split key: the sentence (shared by its voices) or the prompt
    source: str
    voice: str
    rate: int
    text: str
    path: str = ""  # on disk for asterisk/alsa; filled by synthesis for the others
    synth: list = field(default_factory=list)  # the synthesis command


@dataclass
class Clip:
    """One planned output clip."""

    clip_id: str
    utt: Utterance
    split: str
    degradation: str
    severity: int
    rate: int
    fmt: str
    seed: int
    babble: tuple = ()


# --------------------------------------------------------------------------- text and sources

_ADJ = ("quiet", "bright", "old", "small", "heavy", "green", "narrow", "warm", "distant", "wooden",
        "broken", "early", "careful", "yellow", "empty", "famous", "gentle", "rough", "silver", "busy")
_NOUN = ("garden", "train", "window", "teacher", "river", "letter", "bridge", "kitchen", "doctor",
         "market", "engine", "village", "pilot", "basket", "mountain", "library", "farmer", "ticket",
         "harbor", "painter", "signal", "ladder", "blanket", "station")
_VERB = ("found", "painted", "carried", "watched", "opened", "cleaned", "followed", "moved", "checked",
         "repaired", "described", "visited", "counted", "ordered", "noticed", "covered")
_PLACE = ("near the station", "behind the old church", "on the second floor", "across the street",
          "at the end of the road", "under the bridge", "in the north wing", "by the harbor wall")
_TIME = ("this morning", "last winter", "before noon", "every Tuesday", "after the storm",
         "late at night", "in early spring", "two days ago")
_NAME = ("Anna", "Peter", "Maria", "David", "Helen", "Thomas", "Laura", "Simon", "Grace", "Oliver")
_NUM = ("two", "three", "seven", "twelve", "fifteen", "twenty", "forty one", "ninety")
_TEMPLATES = (
    "The {a} {n} {v} the {a2} {n2} {p}.",
    "{N} {v} a {a} {n} {t}.",
    "Please tell the {n} that the {n2} is {a} {t}.",
    "Did the {a} {n} leave the {n2} {p}?",
    "We counted {k} {n}s {p} {t}.",
    "{N} said the {n} {v} the {n2}, and nobody asked why.",
    "If the {n} is {a}, bring the {a2} {n2} {p}.",
    "The {n2} {v} {k} {a} {n}s {t}.",
)


def sentences(n: int = N_SENTENCES) -> list[str]:
    """A fixed list of n distinct English sentences generated from word lists."""
    rng = np.random.default_rng(TEXT_SEED)
    out, seen = [], set()
    while len(out) < n:
        pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
        s = pick(_TEMPLATES).format(a=pick(_ADJ), a2=pick(_ADJ), n=pick(_NOUN), n2=pick(_NOUN),
                                    v=pick(_VERB), p=pick(_PLACE), t=pick(_TIME), N=pick(_NAME), k=pick(_NUM))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def asterisk_dir() -> Path | None:
    for d in ASTERISK_DIRS:
        if (ASTERISK_ROOT / d).is_dir():
            return ASTERISK_ROOT / d
    return None


def tool_report() -> dict:
    """Which engines, voices and ffmpeg encoders exist here."""
    have = {t: shutil.which(t) is not None for t in ("ffmpeg", "espeak-ng", "festival", "flite")}
    encoders = ""
    if have["ffmpeg"]:
        encoders = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
    enc_names = {line.split()[1] for line in encoders.splitlines() if line.startswith(" A")}
    codecs = {k: levels for k, levels in CODECS.items() if levels[0][2][1] in enc_names}
    fest_dirs = {"voice_kal_diphone": "english/kal_diphone", "voice_ked_diphone": "english/ked_diphone",
                 "voice_cmu_us_slt_arctic_hts": "us/cmu_us_slt_arctic_hts"}
    voices = {}
    for name, (engine, _, arg, _) in VOICES.items():
        ok = have["espeak-ng" if engine == "espeak" else engine]
        if ok and engine == "festival":
            ok = (Path("/usr/share/festival/voices") / fest_dirs[arg]).is_dir()
        voices[name] = ok
    return {"tools": have, "codecs": sorted(codecs), "missing_codecs": sorted(set(CODECS) - set(codecs)),
            "voices": sorted(v for v, ok in voices.items() if ok),
            "missing_voices": sorted(v for v, ok in voices.items() if not ok),
            "asterisk": str(asterisk_dir() or ""), "alsa": ALSA_DIR.is_dir()}


def missing_tools(report: dict, use_alsa: bool = True) -> list[str]:
    """What the full corpus needs and this machine lacks (empty: nothing to install)."""
    return ([t for t, ok in report["tools"].items() if not ok] + report["missing_voices"]
            + report["missing_codecs"] + ([] if report["asterisk"] else ["asterisk prompts"])
            + ([] if report["alsa"] or not use_alsa else ["alsa sounds"]))


def install_missing_tools(use_alsa: bool = True) -> None:
    """Run install_corpus_tools.sh (apt-get, via sudo when not root) if anything is missing.

    Without it the build still runs on what exists and records what was absent in build_info.json,
    but that is a different corpus from the model card's, so the default is to install first.
    """
    missing = missing_tools(tool_report(), use_alsa)
    if not missing:
        return
    script = Path(__file__).with_name("install_corpus_tools.sh")
    print(f"build_corpus: missing {', '.join(missing)}; running {script} (--no-install skips this)",
          file=sys.stderr)
    subprocess.run(["bash", str(script)], check=False)
    still = missing_tools(tool_report(), use_alsa)
    if still:
        print(f"build_corpus: still missing {', '.join(still)}: building without them "
              "(a different corpus from the model card's)", file=sys.stderr)


def source_utterances(report: dict, use_alsa: bool = True) -> list[Utterance]:
    """All source utterances, sorted by id (audio not loaded, synthetic ones not yet made)."""
    utts = []
    ad = asterisk_dir()
    if ad is not None:
        for p in sorted(ad.rglob("*.wav")):
            rel = p.relative_to(ad).with_suffix("").as_posix()
            if rel.startswith("silence/") or not MIN_ASTERISK_S <= sf.info(str(p)).duration <= MAX_ASTERISK_S:
                continue
            utts.append(Utterance(f"asterisk/{rel}", f"asterisk/{rel}", "asterisk", "allison",
                                  sf.info(str(p)).samplerate, "", str(p)))  # no transcripts shipped
    voices = report["voices"]
    for i, text in enumerate(sentences()):
        rng = np.random.default_rng([TEXT_SEED, i])
        for v in sorted(rng.choice(sorted(VOICES), size=VOICES_PER_SENTENCE, replace=False)):
            if v in voices:
                engine, source, _, rate = VOICES[v]
                utts.append(Utterance(f"{v}/s{i:03d}", f"text/s{i:03d}", source, v, rate, text))
    if use_alsa and report["alsa"]:
        for p in sorted(ALSA_DIR.glob("*.wav")):
            if p.stem != "Noise":
                utts.append(Utterance(f"alsa/{p.stem}", f"alsa/{p.stem}", "alsa", "alsa",
                                      sf.info(str(p)).samplerate, p.stem.replace("_", " "), str(p)))
    return sorted(utts, key=lambda u: u.utt_id)


def synthesize(utts: list[Utterance], workdir: Path) -> None:
    """Make the audio of synthetic utterances (one festival process per voice)."""
    workdir.mkdir(parents=True, exist_ok=True)
    festival_jobs: dict[str, list[Utterance]] = {}
    for u in utts:
        if u.path:
            continue
        engine, _, arg, _ = VOICES[u.voice]
        u.path = str(workdir / (u.utt_id.replace("/", "_") + ".wav"))
        if engine == "espeak":
            cmd = ["espeak-ng", "-v", arg, "-s", "160", "-w", u.path, u.text]
        elif engine == "flite":
            cmd = ["flite", "-voice", arg, "-t", u.text, "-o", u.path]
        else:
            festival_jobs.setdefault(arg, []).append(u)
            u.synth = ["festival", "-b", f"({arg})", f'(utt.save.wave (SynthText "{u.text}") "out.wav" \'riff)']
            continue
        u.synth = [c if c != u.path else "out.wav" for c in cmd]
        subprocess.run(cmd, check=True, capture_output=True)
    for arg, jobs in festival_jobs.items():
        lines = [f"({arg})"] + [f'(utt.save.wave (SynthText "{u.text}") "{u.path}" \'riff)' for u in jobs]
        scm = workdir / f"{arg}.scm"
        scm.write_text("\n".join(lines) + "\n")
        subprocess.run(["festival", "-b", str(scm)], check=True, capture_output=True)


# --------------------------------------------------------------------------- DSP

def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited polyphase resampling (never widens the content's band)."""
    if sr_in == sr_out:
        return x
    g = gcd(sr_in, sr_out)
    return resample_poly(x, sr_out // g, sr_in // g)


def load(path: str) -> tuple[np.ndarray, int]:
    x, sr = sf.read(path, dtype="float64", always_2d=True)
    return x.mean(axis=1), sr


def trim(x: np.ndarray, sr: int, pad_s: float = 0.1) -> np.ndarray:
    """Cut leading and trailing silence (40 dB below peak), keeping pad_s either side."""
    env = np.abs(x) > np.max(np.abs(x)) * 0.01 if x.size else np.zeros(0, bool)
    idx = np.flatnonzero(env)
    if idx.size == 0:
        return x
    pad = int(pad_s * sr)
    return x[max(idx[0] - pad, 0): idx[-1] + pad + 1]


def normalize(x: np.ndarray) -> np.ndarray:
    rms = np.sqrt(np.mean(x**2)) + 1e-12
    y = x * (10 ** (TARGET_RMS_DB / 20) / rms)
    peak = np.max(np.abs(y)) + 1e-12
    return y * min(1.0, PEAK / peak)


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spec.size)
    spec[1:] /= np.sqrt(f[1:])
    spec[0] = 0
    return np.fft.irfft(spec, n)


def add_noise(x: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    ps, pn = np.mean(x**2), np.mean(noise**2) + 1e-20
    return x + noise * np.sqrt(ps / (pn * 10 ** (snr_db / 10)))


def ffmpeg_roundtrip(x: np.ndarray, sr: int, codec_rate: int, enc: list[str], ext: str, tmp: Path):
    """Encode and decode x with ffmpeg at codec_rate; return the decoded signal at sr and the recipe."""
    src, dec = tmp / "in.wav", tmp / "out.wav"
    sf.write(src, np.clip(resample(x, sr, codec_rate), -1, 1), codec_rate, subtype="PCM_16")
    base = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-threads", "1"]
    cmd1 = ["-i", "in.wav", "-ac", "1", "-ar", str(codec_rate), *enc, f"coded.{ext}"]
    cmd2 = ["-i", f"coded.{ext}", "-ac", "1", "-ar", str(codec_rate), "-c:a", "pcm_s16le", "out.wav"]
    for cmd in (cmd1, cmd2):
        subprocess.run(base + cmd, check=True, capture_output=True, cwd=tmp)
    y, _ = load(str(dec))
    y = resample(y, codec_rate, sr)[: x.size]
    y = np.pad(y, (0, x.size - y.size))
    recipe = f"ffmpeg {shlex.join(cmd1)}; ffmpeg {shlex.join(cmd2)}"
    if codec_rate != sr:
        recipe = f"resample {sr}->{codec_rate}; {recipe}; resample {codec_rate}->{sr}"
    return y, recipe


def degrade(x: np.ndarray, sr: int, bw: float, clip: Clip, tmp: Path, babble_audio) -> tuple:
    """Apply clip's degradation at the working rate sr; return (signal, bandwidth Hz, recipe)."""
    kind, sev = clip.degradation, clip.severity
    rng = np.random.default_rng(clip.seed)
    if kind == "clean":
        return x, bw, "none"
    if kind in CODECS:
        _, rate, enc, ext, cutoff = next(lv for lv in CODECS[kind] if lv[0] == sev)
        y, recipe = ffmpeg_roundtrip(x, sr, rate, enc, ext, tmp)
        return y, min(bw, rate / 2, cutoff), recipe
    if kind == "noise_white":
        return add_noise(x, rng.standard_normal(x.size), SNR_DB[sev]), bw, f"white noise snr={SNR_DB[sev]}dB seed={clip.seed}"
    if kind == "noise_pink":
        return add_noise(x, pink_noise(x.size, rng), SNR_DB[sev]), bw, f"pink noise snr={SNR_DB[sev]}dB seed={clip.seed}"
    if kind == "noise_babble":
        noise = np.zeros(x.size)
        for b in babble_audio:
            b = resample(b, 8000, sr)
            b = np.tile(b, int(np.ceil(x.size / max(b.size, 1))))[: x.size]
            noise += b / (np.sqrt(np.mean(b**2)) + 1e-12)
        y = add_noise(x, noise, BABBLE_SNR_DB[sev])
        return y, bw, f"babble of {'+'.join(clip.babble)} snr={BABBLE_SNR_DB[sev]}dB"
    if kind == "clipping":
        level = CLIP_FRACTION[sev] * np.max(np.abs(x))
        return np.clip(x, -level, level), bw, f"hard clip at {CLIP_FRACTION[sev]} x peak"
    if kind == "packet_loss":
        frame = int(0.02 * sr)
        lost = rng.random(int(np.ceil(x.size / frame))) < LOSS_RATE[sev]
        y = x.copy()
        for i in np.flatnonzero(lost):
            y[i * frame: (i + 1) * frame] = 0
        return y, bw, f"zero 20ms frames p={LOSS_RATE[sev]} seed={clip.seed}"
    if kind == "lowpass":
        r = LOWPASS_RATE[sev]
        return resample(resample(x, sr, r), r, sr)[: x.size], r / 2, f"resample {sr}->{r}->{sr}"
    raise ValueError(kind)


# --------------------------------------------------------------------------- planning

def assign_splits(utts: list[Utterance], seed: int) -> dict[str, str]:
    """Split by group (sentence or prompt): a held-out text is never trained on, in any voice."""
    groups = sorted({u.group_id for u in utts})
    order = np.random.default_rng([seed, 7]).permutation(len(groups))
    out, start = {}, 0
    for i, (name, frac) in enumerate(SPLIT_FRACTIONS):
        end = len(groups) if i == len(SPLIT_FRACTIONS) - 1 else start + int(round(frac * len(groups)))
        for j in order[start:end]:
            out[groups[j]] = name
        start = end
    return out


def recipe_options(bw: float, codecs: list[str], babble_ok: bool) -> list[tuple[str, str, int]]:
    """(group, type, severity) options applicable to content of bandwidth bw."""
    opts = [("codec", k, lv[0]) for k in codecs for lv in CODECS[k]]
    opts += [("noise", k, s) for k in ("noise_white", "noise_pink") for s in SNR_DB]
    if babble_ok:
        opts += [("noise", "noise_babble", s) for s in BABBLE_SNR_DB]
    opts += [("clipping", "clipping", s) for s in CLIP_FRACTION]
    opts += [("packet_loss", "packet_loss", s) for s in LOSS_RATE]
    opts += [("lowpass", "lowpass", s) for s, r in LOWPASS_RATE.items() if r / 2 < bw]
    return opts


def plan(utts: list[Utterance], seed: int, report: dict, train_variants: int = VARIANTS_PER_UTT) -> list[Clip]:
    """Clips per utterance: VARIANTS_PER_UTT, or train_variants in the train split. Each utterance's draws
    come from its own stream in order, so more train variants add clips and change none."""
    splits = assign_splits(utts, seed)
    babble_pool: dict[str, list[str]] = {}
    for u in utts:
        if u.source == "asterisk":
            babble_pool.setdefault(splits[u.group_id], []).append(u.utt_id)
    clips = []
    for u in utts:
        split = splits[u.group_id]
        rng = np.random.default_rng([seed, zlib.crc32(u.utt_id.encode())])
        pool = [b for b in babble_pool.get(split, []) if b != u.utt_id]
        opts = recipe_options(u.rate / 2, report["codecs"], len(pool) >= 4)
        if split != "test":
            opts = [o for o in opts if o[1:] not in HELD_OUT]
        held = [o for o in opts if o[1:] in HELD_OUT]
        used = set()
        for k in range(train_variants if split == "train" else VARIANTS_PER_UTT):
            if "clean" not in used and rng.random() < P_CLEAN:
                kind, sev = "clean", 0
            elif held and rng.random() < P_HELD_OUT:
                _, kind, sev = held[int(rng.integers(len(held)))]
            else:
                groups = sorted({o[0] for o in opts})
                w = np.array([GROUP_WEIGHTS[g] for g in groups])
                g = groups[int(rng.choice(len(groups), p=w / w.sum()))]
                cand = [o for o in opts if o[0] == g and o[1:] not in used]
                _, kind, sev = cand[int(rng.integers(len(cand)))] if cand else ("", "clean", 0)
            used.add("clean" if kind == "clean" else (kind, sev))
            babble = tuple(sorted(rng.choice(pool, 4, replace=False))) if kind == "noise_babble" else ()
            clips.append(Clip(f"{u.utt_id.replace('/', '_')}_v{k}", u, split, kind, sev,
                              int(rng.choice(RATES)), "flac" if rng.random() < 0.5 else "wav",
                              int(rng.integers(2**31)), babble))
    return clips


def subset(clips: list[Clip], n: int, seed: int) -> list[Clip]:
    """n clips interleaved across sources and splits (a seeded round robin)."""
    rng = np.random.default_rng([seed, 11])
    buckets: dict[tuple, list[Clip]] = {}
    for i in rng.permutation(len(clips)):
        c = clips[i]
        buckets.setdefault((c.utt.source, c.split), []).append(c)
    keys, out = sorted(buckets), []
    while len(out) < n and any(buckets.values()):
        for k in keys:
            if buckets[k] and len(out) < n:
                out.append(buckets[k].pop(0))
    return sorted(out, key=lambda c: c.clip_id)


# --------------------------------------------------------------------------- rendering

def render(clip: Clip, x: np.ndarray, sr: int, tmp: Path, babble_cache: dict) -> tuple[np.ndarray, float, str]:
    """Degrade at the source rate, then present at clip.rate band-limited."""
    babble = [babble_cache[b] for b in clip.babble]
    y, bw, recipe = degrade(x, sr, sr / 2, clip, tmp, babble)
    bw = min(bw, clip.rate / 2)
    y = normalize(resample(y, sr, clip.rate))
    steps = [recipe] + ([f"resample {sr}->{clip.rate}"] if sr != clip.rate else [])
    return y, bw, "; ".join(steps + [f"normalize {TARGET_RMS_DB}dBFS"])


def write_clip(out: Path, rel: str, y: np.ndarray, sr: int) -> None:
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    sf.write(out / rel, y, sr, subtype="PCM_16" if not rel.endswith(".ogg") else "VORBIS")


def row(clip: Clip, rel: str, y: np.ndarray, bw: float, recipe: str, degradation=None, severity=None) -> dict:
    u = clip.utt
    synth = f"synth: {shlex.join(u.synth)}; " if u.synth else ""
    return {"path": rel, "sample_rate": clip.rate, "bandwidth_hz": int(round(bw)),
            "duration_s": f"{y.size / clip.rate:.3f}", "split": clip.split, "source": u.source,
            "voice": u.voice, "utt_id": u.utt_id, "group_id": u.group_id, "source_rate": u.rate,
            "degradation": degradation or clip.degradation, "severity": clip.severity if severity is None else severity,
            "recipe": synth + recipe, "text": u.text}


def ladder_rows(clips: list[Clip], out: Path, tmp: Path, seed: int, sources: dict) -> list[dict]:
    """The same held-out clip, band-limited below LADDER_BANDWIDTH, presented at each LADDER_RATES."""
    test = [c for c in clips if c.split == "test"]
    rng = np.random.default_rng([seed, 13])
    picked = [test[i] for i in sorted(rng.permutation(len(test))[:LADDER_CLIPS])]
    lp = firwin(511, LADDER_BANDWIDTH - 300, fs=8000, window=("kaiser", 10.0))
    rows = []
    for c in picked:
        x, sr = sources[c.utt.utt_id]
        x8 = resample(x, sr, 8000)
        y, _, recipe = degrade(x8, 8000, 4000, c, tmp, [sources[b][0] for b in c.babble])
        y = np.convolve(y, lp, mode="same")
        for rate in LADDER_RATES:
            z = normalize(resample(y, 8000, rate))
            rel = f"rate_ladder/{c.clip_id}/{rate}.wav"
            write_clip(out, rel, z, rate)
            r = row(Clip(c.clip_id, c.utt, c.split, c.degradation, c.severity, rate, "wav", c.seed), rel, z,
                    LADDER_BANDWIDTH, f"resample {sr}->8000; {recipe}; fir lowpass {LADDER_BANDWIDTH - 300}Hz "
                    f"(511 taps, stop <{LADDER_BANDWIDTH}Hz); resample 8000->{rate}; normalize")
            rows.append({"ladder_id": c.clip_id, **r})
    return rows


def write_csv(path: Path, rows: list[dict], columns) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def build(out: Path, seed: int = 0, max_clips: int | None = None, rate_ladder: bool = False,
          use_alsa: bool = True, verbose: bool = True, train_variants: int = VARIANTS_PER_UTT) -> dict:
    """Build the corpus under out/ and return its statistics."""
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    report = tool_report()
    if not report["tools"]["ffmpeg"]:
        report["codecs"], report["missing_codecs"] = [], sorted(CODECS)
    utts = source_utterances(report, use_alsa)
    if not utts:
        raise SystemExit("no speech sources found: run scripts/install_corpus_tools.sh")
    clips = plan(utts, seed, report, train_variants)
    if max_clips:
        clips = subset(clips, max_clips, seed)
    need = {c.utt.utt_id: c.utt for c in clips}
    ast = [u for u in utts if u.source == "asterisk"]
    with tempfile.TemporaryDirectory(dir=out, prefix=".work") as td:
        tmp = Path(td)
        synthesize(sorted(need.values(), key=lambda u: u.utt_id), tmp / "synth")
        babble_ids = {b for c in clips for b in c.babble}
        cache = {u.utt_id: load(u.path)[0] for u in ast if u.utt_id in babble_ids}
        sources: dict[str, tuple[np.ndarray, int]] = {}
        rows = []
        for i, c in enumerate(clips):
            if c.utt.utt_id not in sources:
                x, sr = load(c.utt.path)
                sources[c.utt.utt_id] = (trim(x, sr), sr)
            x, sr = sources[c.utt.utt_id]
            y, bw, recipe = render(c, x, sr, tmp, cache)
            rel = f"audio/{c.split}/{c.utt.source}/{c.clip_id}.{c.fmt}"
            write_clip(out, rel, y, c.rate)
            rows.append(row(c, rel, y, bw, recipe))
            if verbose and (i + 1) % 250 == 0:
                print(f"{i + 1}/{len(clips)} clips, {time.time() - t0:.0f} s", file=sys.stderr)
        write_csv(out / "manifest.csv", rows, MANIFEST_COLUMNS)
        if rate_ladder:
            for b in {b for c in clips for b in c.babble}:
                sources.setdefault(b, (cache[b], 8000))
            lrows = ladder_rows(clips, out, tmp, seed, sources)
            write_csv(out / "rate_ladder.csv", lrows, ("ladder_id",) + MANIFEST_COLUMNS)
    stats = summarize(rows)
    info = {"fingerprint": fingerprint(out), "seed": seed, "max_clips": max_clips, "rate_ladder": rate_ladder, "train_variants": train_variants, "held_out_test_recipes":
            sorted(f"{k}:{s}" for k, s in HELD_OUT), **report, **stats, "build_seconds": round(time.time() - t0, 1)}
    (out / "build_info.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return info


def fingerprint(out: Path) -> dict[str, str]:
    """SHA-256 per split, of each manifest row and the bytes of its file (16 hex digits).

    Two builds with the same fingerprint are the same corpus byte for byte, so a rerun can tell
    'identical' (other tool versions may change the bytes) from 'only within the card's tolerances'.
    The larger --train-variants builds keep valid, test and the ladder, so those digests match too.
    """
    def digest(rows: list[dict]) -> str:
        h = hashlib.sha256()
        for r in sorted(rows, key=lambda r: r["path"]):
            h.update(json.dumps(r, sort_keys=True).encode())
            h.update(hashlib.sha256((out / r["path"]).read_bytes()).digest())
        return h.hexdigest()[:16]

    def read(name: str) -> list[dict]:
        with open(out / name, newline="") as f:
            return list(csv.DictReader(f))

    rows = read("manifest.csv")
    fp = {"all": digest(rows)}
    fp.update({s: digest([r for r in rows if r["split"] == s]) for s in sorted({r["split"] for r in rows})})
    if (out / "rate_ladder.csv").exists():
        fp["rate_ladder"] = digest(read("rate_ladder.csv"))
    return fp


def summarize(rows: list[dict]) -> dict:
    def count(key):
        d: dict = {}
        for r in rows:
            d[str(r[key])] = d.get(str(r[key]), 0) + 1
        return dict(sorted(d.items()))
    return {"clips": len(rows), "hours": round(sum(float(r["duration_s"]) for r in rows) / 3600, 3),
            "by_source": count("source"), "by_degradation": count("degradation"),
            "by_rate": count("sample_rate"), "by_split": count("split"), "by_severity": count("severity")}


# --------------------------------------------------------------------------- examples

EXAMPLES = (  # (file, utterance, degradation, severity, presentation rate)
    ("asterisk_clean_8k.wav", "asterisk/privacy-prompt", "clean", 0, 8000),
    ("asterisk_amrnb_16k.flac", "asterisk/conf-onlyperson", "codec_amrnb", 4, 16000),
    ("slt_hts_clean_44k.flac", "festival-slt-hts/x0", "clean", 0, 44100),
    ("espeak_clean_22k.wav", "espeak-us/x1", "clean", 0, 22050),
    ("kal_noise_24k.wav", "festival-kal/x2", "noise_white", 3, 24000),
    ("flite_packetloss_48k.flac", "flite-slt/x3", "packet_loss", 4, 48000),
    ("slt_hts_codec2_16k.ogg", "festival-slt-hts/x4", "codec_codec2", 2, 16000),
)
EXAMPLE_TEXTS = ("The quiet garden was covered in snow this morning.",
                 "Please bring the yellow basket to the station.",
                 "Helen painted the old bridge before noon.",
                 "We counted twelve boats near the harbor wall.",
                 "The pilot checked the engine after the storm.")
LICENCES = {  # from /usr/share/doc/<package>/copyright
    "asterisk": "CC-BY-SA-3.0, (c) 2003-2010 Allison Smith (asterisk-core-sounds-en-wav)",
    "festival-slt-hts": "voice: EST-2003 free licence, (c) 2003 Carnegie Mellon University, HTS parts BSD-3-clause "
                        "(c) Nagoya Institute of Technology (festvox-us-slt-hts); festival: free CSTR licence",
    "festival-kal": "voice: free CSTR/CMU/OGI diphone licence, (c) 1998 (festvox-kallpc16k); festival: free CSTR licence",
    "espeak": "espeak-ng program and voice data: GPL-3.0-or-later, (c) 2005-2014 Jonathan Duddington and others (espeak-ng)",
    "flite": "flite program and voices: CMU free licence (MIT-like), (c) 1999-2001 Carnegie Mellon University (flite)",
}


def build_examples(out: Path) -> None:
    """Regenerate the bundled example audio and its README (total well under 1 MB)."""
    out.mkdir(parents=True, exist_ok=True)
    ad = asterisk_dir()
    rows = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for i, (name, uid, kind, sev, rate) in enumerate(EXAMPLES):
            voice, key = uid.split("/", 1)
            if voice == "asterisk":
                u = Utterance(uid, uid, "asterisk", "allison", 8000, f"(Asterisk prompt {key}; no transcript shipped)", str(ad / f"{key}.wav"))
            else:
                engine, source, _, r = VOICES[voice]
                u = Utterance(f"{voice}/{key}", uid, source, voice, r, EXAMPLE_TEXTS[int(key[1:])])
                synthesize([u], tmp / "synth")
            x, sr = load(u.path)
            x = trim(x, sr)[: int(4.0 * sr)]
            clip = Clip(name, u, "example", kind, sev, rate, name.rsplit(".", 1)[1], 1000 + i)
            y, bw, recipe = render(clip, x, sr, tmp, {})
            write_clip(out, name, y, rate)
            synth = f"synth: {shlex.join(u.synth)}; " if u.synth else ""
            rows.append((name, u, rate, bw, y.size / rate, synth + recipe))
    lines = ["# Example audio", "",
             "Short clips for `utmos score examples/`, regenerated by "
             "`python scripts/build_corpus.py --examples examples/` (needs scripts/install_corpus_tools.sh).",
             "Synthetic sentences are our own text. Each file lists its source, the licence of that source "
             "(from /usr/share/doc/<package>/copyright), its rate, its true bandwidth and what was done to it.", "",
             "| file | source | text | rate (Hz) | bandwidth (Hz) | duration (s) | processing | licence of the source |",
             "|---|---|---|---|---|---|---|---|"]
    for name, u, rate, bw, dur, recipe in rows:
        lic = LICENCES[u.source if u.source in LICENCES else u.source.split("-")[0]]
        proc = recipe.replace("|", "/")
        lines.append(f"| {name} | {u.source} ({u.voice}, {u.rate} Hz) | {u.text} | {rate} | {int(bw)} | "
                     f"{dur:.2f} | {proc} | {lic} |")
    lines += ["", "All clips were trimmed of leading/trailing silence and cut to at most 4 s before processing. "
              "Synthetic speech is the output of the listed Debian synthesizer and voice speaking our own text.",
              "", "The .ogg file is Ogg Vorbis written by libsndfile, so it carries Vorbis coding on top of the "
              "processing listed; it is the one file whose bytes change on regeneration (random Ogg stream serial).", "The asterisk prompts are CC-BY-SA-3.0: these derived clips are shared "
              "under the same licence, with attribution to Allison Smith.", ""]
    (out / "README.md").write_text("\n".join(lines))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("corpus"), help="output directory")
    ap.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    ap.add_argument("--max-clips", type=int, default=None, help="build only this many clips (tests)")
    ap.add_argument("--rate-ladder", action="store_true", help="also write rate_ladder/ and rate_ladder.csv")
    ap.add_argument("--no-alsa", action="store_true", help="leave out /usr/share/sounds/alsa")
    ap.add_argument("--train-variants", type=int, default=VARIANTS_PER_UTT,
                    help=f"degraded versions of each training utterance (default {VARIANTS_PER_UTT}); "
                         "valid and test keep theirs, and every clip of the default build stays as it is")
    ap.add_argument("--examples", type=Path, default=None, help="regenerate the bundled examples here and stop")
    ap.add_argument("--no-install", action="store_true",
                    help="do not run scripts/install_corpus_tools.sh when a tool, voice or codec is missing")
    ap.add_argument("--fingerprint", type=Path, default=None, metavar="DIR",
                    help="print the fingerprint of the build in DIR (compare with docs/training.md) and stop")
    a = ap.parse_args(argv)
    if a.fingerprint:
        if not (a.fingerprint / "manifest.csv").is_file():
            ap.error(f"{a.fingerprint}: no manifest.csv (not a corpus build)")
        try:
            print(json.dumps(fingerprint(a.fingerprint), indent=1))
        except FileNotFoundError as e:
            raise SystemExit(f"{a.fingerprint}: a file the manifest lists is missing: {e.filename}")
        return
    if a.train_variants < 1:
        ap.error("--train-variants must be at least 1")
    if not a.no_install:
        install_missing_tools(use_alsa=not a.no_alsa)
    if a.examples:
        build_examples(a.examples)
        return
    info = build(a.out, a.seed, a.max_clips, a.rate_ladder, not a.no_alsa, train_variants=a.train_variants)
    print(json.dumps({k: info[k] for k in ("clips", "hours", "build_seconds", "by_split", "fingerprint", "missing_codecs",
                                           "missing_voices")}, indent=1))


if __name__ == "__main__":
    main()
