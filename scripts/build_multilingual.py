"""Build the many-voice, many-language corpus and its held-out set (offline, deterministic).

Sources (Debian packages, see scripts/install_corpus_tools.sh): real speech from the English Asterisk
prompts (8 kHz) and KLettres (native speakers of ~15 languages, 44.1 kHz letters and syllables, joined
into 3-5 s utterances), festival voices (English, Czech, Finnish, Catalan), flite, and espeak-ng in
every non-reserved language it has. Spanish, French, Italian, Russian and Portuguese are never used.

Splits:
- heldout: whole languages (HELD_LANGS: no voice of theirs is ever trained on) and whole speakers
  (HELD_SPEAKERS), each utterance rendered clean and along full severity ladders of several
  degradation types, some of which (HELD_RECIPES) never occur in training.
- train / valid: every other language and speaker, with random degradations (chains of two too).

    python scripts/build_multilingual.py --out corpus_ml/ --seed 0 [--max-utts N]

The manifest has build_corpus.py's columns plus `language` and `why_held_out`; the held-out rate
ladder (the same band-limited clean content stored at 8-48 kHz) goes to rate_ladder.csv, so
benchmarks/eval_default_model.py reads this corpus as it reads build_corpus.py's.
"""
from __future__ import annotations

import argparse
import functools
import multiprocessing
import json
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import fftconvolve, firwin, istft, stft

sys.path.insert(0, str(Path(__file__).parent))
import build_corpus as bc  # noqa: E402  (shared DSP, codecs and writers)

RESERVED = ("es", "fr", "it", "ru", "pt", "an", "pap", "lfn")  # reserved languages and close kin
HELD_LANGS = ("de", "nl", "hu", "uk", "he", "fi", "sv", "pl", "tr", "el")
HELD_SPEAKERS = ("klettres-en_GB", "festival-czech_ph", "flite-awb")
HELD_RATES = (16000, 24000, 44100, 48000)
KLETTRES = Path("/usr/share/klettres")
FESTIVAL_VOICES = Path("/usr/share/festival/voices")
KLETTRES_LANGS = ("ar", "cs", "da", "de", "en", "en_GB", "he", "hu", "lt", "ml", "nb", "nds", "nl", "tn", "uk")
FESTIVAL = {  # voice -> (language, scheme voice, folder under /usr/share/festival/voices, Debian package)
    "festival-kal": ("en", "voice_kal_diphone", "english/kal_diphone", "festvox-kallpc16k"),
    "festival-ked": ("en", "voice_ked_diphone", "english/ked_diphone", "festvox-kdlpc16k"),
    "festival-slt-hts": ("en", "voice_cmu_us_slt_arctic_hts", "us/cmu_us_slt_arctic_hts", "festvox-us-slt-hts"),
    "festival-czech_dita": ("cs", "voice_czech_dita", "czech/czech_dita", "festvox-czech-dita"),
    "festival-czech_krb": ("cs", "voice_czech_krb", "czech/czech_krb", "festvox-czech-krb"),
    "festival-czech_machac": ("cs", "voice_czech_machac", "czech/czech_machac", "festvox-czech-machac"),
    "festival-czech_ph": ("cs", "voice_czech_ph", "czech/czech_ph", "festvox-czech-ph"),
    "festival-fi_lj": ("fi", "voice_suo_fi_lj_diphone", "finnish/suo_fi_lj_diphone", "festvox-suopuhe-lj"),
    "festival-fi_mv": ("fi", "voice_hy_fi_mv_diphone", "finnish/hy_fi_mv_diphone", "festvox-suopuhe-mv"),
    "festival-ca_ona": ("ca", "voice_upc_ca_ona_hts", "catalan/upc_ca_ona_hts", "festvox-ca-ona-hts"),
}
FLITE = ("kal", "slt", "rms", "awb")
ESPEAK_VARIANTS = ("m1", "m3", "m7", "f2", "f4")
UTTS_PER_VOICE = {"festival": 40, "espeak": 2, "flite": 30, "klettres": 40}
HELD_UTTS_PER_VOICE = {"festival": 10, "espeak": 2, "flite": 10, "klettres": 14}
TRAIN_VARIANTS = 3

# Held-out-only degradation types: never drawn for train or valid.
AAC = [(s, 48000, ["-c:a", "aac", "-b:a", b, "-cutoff", str(c)], "m4a", c)
       for s, b, c in ((1, "48k", 16000), (2, "24k", 9000), (3, "16k", 6000), (4, "12k", 4500))]
RT60_S = {1: 0.25, 2: 0.5, 3: 0.9, 4: 1.5}
GRIFFIN_LIM_ITERS = {1: 64, 2: 16, 3: 4, 4: 0}  # 0: the magnitude with random phase
HELD_RECIPES = ("codec_aac", "reverb", "griffin_lim")
CHAIN_SNR_DB = {1: 30.0, 2: 20.0, 3: 10.0, 4: 5.0}  # chain: pink noise at this SNR, then mp3 at severity s
LADDER_TYPES = ("codec_opus", "codec_mp3", "codec_aac", "codec_amrwb", "noise_pink", "noise_white", "reverb",
                "griffin_lim", "clipping", "packet_loss", "chain", "lowpass")
LADDERS_PER_UTT = 2


def digits_text(rng: np.random.Generator) -> str:
    """Numbers read in the voice's own language: real words of that language without a text corpus."""
    return " ".join(str(int(rng.integers(1, 10 ** int(rng.integers(1, 5))))) for _ in range(int(rng.integers(3, 6))))


def espeak_languages() -> list[str]:
    out = subprocess.run(["espeak-ng", "--voices"], capture_output=True, text=True).stdout.splitlines()[1:]
    langs = sorted({line.split()[1] for line in out if len(line.split()) > 1})
    return [lang for lang in langs if lang.split("-")[0] not in RESERVED]


def missing_packages() -> list[str]:
    """What this corpus draws on and this machine lacks: the Debian packages of its real and
    non-English voices, then build_corpus.py's missing tools, voices and codecs (the build leaves them
    out, and is then a different corpus from the model cards')."""
    missing = [] if any(KLETTRES.rglob("*.ogg")) else ["klettres-data"]
    missing += [pkg for _, _, folder, pkg in FESTIVAL.values() if not (FESTIVAL_VOICES / folder).is_dir()]
    return missing + bc.missing_tools(bc.tool_report(), use_alsa=False)


def held_out_reason(voice: str, lang: str) -> str:
    if lang.split("-")[0].split("_")[0] in HELD_LANGS:
        return "language"
    return "speaker" if voice in HELD_SPEAKERS else ""


def klettres_utterances(rng: np.random.Generator) -> list[tuple[str, str, list[str]]]:
    """(voice, language, files) per utterance: 3-5 clips of one speaker joined with short pauses."""
    out = []
    for lang in KLETTRES_LANGS:
        files = sorted(str(p) for p in (KLETTRES / lang).rglob("*.ogg"))
        if not files:
            continue
        order = [files[i] for i in np.random.default_rng([zlib.crc32(lang.encode())]).permutation(len(files))]
        k = 0
        while k < len(order):
            n = int(rng.integers(3, 6))
            out.append((f"klettres-{lang}", lang, order[k:k + n]))
            k += n
    return out


def join_clips(files: list[str], rng: np.random.Generator) -> tuple[np.ndarray, int]:
    parts, sr = [], 44100
    for f in files:
        x, sr = bc.load(f)
        parts += [bc.trim(x, sr, 0.02), np.zeros(int(sr * rng.uniform(0.15, 0.35)))]
    return np.concatenate(parts[:-1]), sr


def plan_utterances(seed: int, max_utts: int | None) -> list[dict]:
    """Every source utterance with its voice, language, split reason and synthesis command."""
    rng = np.random.default_rng([seed, 1])
    utts = []

    def add(voice, kind, lang, text="", files=(), cmd=(), rate=0):
        held = held_out_reason(voice, lang)
        utts.append({"voice": voice, "kind": kind, "language": lang, "text": text, "files": list(files),
                     "cmd": list(cmd), "rate": rate, "held": held})

    for voice, lang, files in klettres_utterances(rng):
        add(voice, "klettres", lang, " ".join(Path(f).stem for f in files), files, rate=44100)
    ad = bc.asterisk_dir()
    if ad is not None:
        for p in sorted(ad.rglob("*.wav")):
            rel = p.relative_to(ad).with_suffix("").as_posix()
            if not rel.startswith("silence/") and bc.MIN_ASTERISK_S <= sf.info(str(p)).duration <= bc.MAX_ASTERISK_S:
                add("asterisk-allison", "asterisk", "en", rel, [str(p)], rate=8000)
    english = bc.sentences()
    for voice, (lang, scheme, folder, _) in FESTIVAL.items():
        if not (FESTIVAL_VOICES / folder).is_dir():
            continue
        for i in range(UTTS_PER_VOICE["festival"]):
            text = english[int(rng.integers(len(english)))] if lang == "en" else digits_text(rng)
            add(voice, "festival", lang, text, cmd=("festival", scheme))
    for v in FLITE:
        for i in range(UTTS_PER_VOICE["flite"]):
            add(f"flite-{v}", "flite", "en", english[int(rng.integers(len(english)))], cmd=("flite", v))
    for lang in espeak_languages():
        for var in ESPEAK_VARIANTS[:2] if lang.split("-")[0] in HELD_LANGS else ESPEAK_VARIANTS[1:4]:
            voice = f"espeak-{lang}+{var}"
            for i in range(UTTS_PER_VOICE["espeak"]):
                add(voice, "espeak", lang, digits_text(rng), cmd=("espeak", f"{lang}+{var}", str(int(rng.integers(130, 190)))))
    # cap the held-out utterances per voice, so no one voice dominates the held-out numbers
    kept, count = [], {}
    for u in utts:
        count[u["voice"]] = count.get(u["voice"], 0) + 1
        cap = (HELD_UTTS_PER_VOICE if u["held"] else UTTS_PER_VOICE)[u["kind"]] if u["kind"] != "asterisk" else 10**6
        if count[u["voice"]] <= cap:
            kept.append(u)
    for i, u in enumerate(kept):
        u["utt_id"] = f"{u['voice']}/u{i:05d}"
    if max_utts:  # half of them held out, so even a small build has both splits
        rng = np.random.default_rng([seed, 2])
        held = [i for i, u in enumerate(kept) if u["held"]]
        train = [i for i, u in enumerate(kept) if not u["held"]]
        n_held = min(len(held), max(1, max_utts // 2))
        pick = list(rng.permutation(held)[:n_held]) + list(rng.permutation(train)[:max_utts - n_held])
        kept = [kept[i] for i in sorted(pick)]
    return kept


def synthesize(u: dict, tmp: Path) -> tuple[np.ndarray, int]:
    path = tmp / "synth.wav"
    engine = u["cmd"][0]
    if engine == "festival":
        text = u["text"].replace('"', "")
        subprocess.run(["festival", "-b", f"({u['cmd'][1]})", f'(utt.save.wave (SynthText "{text}") "{path}" \'riff)'],
                       check=True, capture_output=True)
    elif engine == "flite":
        subprocess.run(["flite", "-voice", u["cmd"][1], "-t", u["text"], "-o", str(path)], check=True, capture_output=True)
    else:
        subprocess.run(["espeak-ng", "-v", u["cmd"][1], "-s", u["cmd"][2], "-w", str(path), u["text"]],
                       check=True, capture_output=True)
    return bc.load(str(path))


def source_audio(u: dict, tmp: Path) -> tuple[np.ndarray, int]:
    if u["kind"] == "klettres":
        x, sr = join_clips(u["files"], np.random.default_rng([zlib.crc32(u["utt_id"].encode())]))
    elif u["kind"] == "asterisk":
        x, sr = bc.load(u["files"][0])
    else:
        x, sr = synthesize(u, tmp)
    return bc.trim(x, sr), sr


# --------------------------------------------------------------------------- new degradations

def reverb(x: np.ndarray, sr: int, rt60: float, rng: np.random.Generator) -> np.ndarray:
    """A synthetic room: direct path plus exponentially decaying noise (-60 dB at rt60)."""
    n = int(sr * rt60)
    t = np.arange(n) / sr
    rir = rng.standard_normal(n) * 10 ** (-3 * t / rt60) * 0.3
    rir[0] = 1.0
    return fftconvolve(x, rir)[: x.size]


def griffin_lim(x: np.ndarray, sr: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Resynthesis from the STFT magnitude: the phase artefacts of a vocoder (fewer iterations, worse)."""
    nper = int(0.032 * sr)
    _, _, z = stft(x, sr, nperseg=nper, noverlap=3 * nper // 4)
    mag = np.abs(z)
    spec = mag * np.exp(2j * np.pi * rng.random(mag.shape))
    for _ in range(iters):
        _, y = istft(spec, sr, nperseg=nper, noverlap=3 * nper // 4)
        _, _, z = stft(y[: x.size], sr, nperseg=nper, noverlap=3 * nper // 4)
        spec = mag * np.exp(1j * np.angle(z))
    _, y = istft(spec, sr, nperseg=nper, noverlap=3 * nper // 4)
    return np.pad(y[: x.size], (0, max(0, x.size - y.size)))


def degrade(x: np.ndarray, sr: int, kind: str, sev: int, seed: int, tmp: Path) -> tuple[np.ndarray, float, str]:
    """(signal, bandwidth Hz, recipe) for one degradation at one severity, at the source rate."""
    rng = np.random.default_rng(seed)
    if kind == "codec_aac":
        _, rate, enc, ext, cutoff = AAC[sev - 1]
        y, recipe = bc.ffmpeg_roundtrip(x, sr, rate, enc, ext, tmp)
        return y, min(sr / 2, cutoff), recipe
    if kind == "reverb":
        return reverb(x, sr, RT60_S[sev], rng), sr / 2, f"reverb rt60={RT60_S[sev]}s seed={seed}"
    if kind == "griffin_lim":
        return griffin_lim(x, sr, GRIFFIN_LIM_ITERS[sev], rng), sr / 2, f"griffin-lim iters={GRIFFIN_LIM_ITERS[sev]}"
    if kind == "chain":
        y = bc.add_noise(x, bc.pink_noise(x.size, rng), CHAIN_SNR_DB[sev])
        y, bw, recipe = bc.degrade(y, sr, sr / 2, bc.Clip("", None, "", "codec_mp3", sev, sr, "wav", seed), tmp, [])
        return y, bw, f"pink noise snr={CHAIN_SNR_DB[sev]}dB; {recipe}"
    clip = bc.Clip("", None, "", kind, sev, sr, "wav", seed)
    return bc.degrade(x, sr, sr / 2, clip, tmp, [])


def train_options(sr: int, codecs: list[str]) -> list[tuple[str, int]]:
    opts = [(k, s) for g, k, s in bc.recipe_options(sr / 2, codecs, False) if (k, s) not in bc.HELD_OUT]
    return opts + [("chain", s) for s in CHAIN_SNR_DB]


def ladder_types(u: dict, sr: int, codecs: list[str]) -> list[str]:
    ok = [t for t in LADDER_TYPES if not t.startswith("codec_") or t == "codec_aac" or t in codecs]
    ok = [t for t in ok if t != "lowpass" or sr >= 32000]
    rng = np.random.default_rng([zlib.crc32(u["utt_id"].encode()), 5])
    return sorted(rng.choice(ok, size=min(LADDERS_PER_UTT, len(ok)), replace=False))


def plan_clips(u: dict, sr: int, seed: int, codecs: list[str]) -> list[dict]:
    """(split, kind, severity, rate, seed) of each clip of one utterance."""
    rng = np.random.default_rng([seed, zlib.crc32(u["utt_id"].encode())])
    if u["held"]:
        rate = int(rng.choice(HELD_RATES))
        clips = [("heldout", "clean", 0, rate)]
        clips += [("heldout", t, s, rate) for t in ladder_types(u, sr, codecs) for s in (1, 2, 3, 4)]
    else:
        split = "valid" if rng.random() < 0.04 else "train"
        opts = train_options(sr, codecs)
        clips = [(split, "clean", 0, int(rng.choice(bc.RATES)))] if rng.random() < 0.3 else []
        while len(clips) < TRAIN_VARIANTS:
            kind, sev = opts[int(rng.integers(len(opts)))]
            if any(c[1:3] == (kind, sev) for c in clips):  # one file per recipe: a repeat would overwrite it
                continue
            clips.append((split, kind, sev, int(rng.choice(bc.RATES))))
    return [{"split": s, "kind": k, "sev": v, "rate": r, "seed": int(rng.integers(2**31))} for s, k, v, r in clips]


def render_utterance(u: dict, out: Path, seed: int, codecs: list[str]) -> tuple[list[dict], list[dict]]:
    """All clips of one utterance (and its rate ladder when held out); returns their manifest rows.

    The rows are kept in .rows/ beside the audio, so a build that was stopped resumes where it was;
    an utterance its synthesizer cannot speak is left out (and named on stderr)."""
    done = out / ".rows" / (u["utt_id"].replace("/", "_") + ".json")
    if done.is_file():
        return tuple(json.loads(done.read_text()))
    rows, ladder = [], []
    common = {"source": u["kind"], "voice": u["voice"], "utt_id": u["utt_id"], "group_id": u["utt_id"],
              "text": u["text"], "language": u["language"], "why_held_out": u["held"]}
    with tempfile.TemporaryDirectory(dir=out, prefix=".work") as td:
        tmp = Path(td)
        try:
            x, sr = source_audio(u, tmp)
        except subprocess.CalledProcessError as e:
            print(f"build_multilingual: {u['utt_id']}: {e.cmd[0]} failed, left out", file=sys.stderr)
            return [], []
        if x.size == 0 or np.abs(x).max() < 1e-4:  # e.g. espeak-ng's Hebrew reads no digits
            print(f"build_multilingual: {u['utt_id']}: the synthesizer made silence, left out", file=sys.stderr)
            return [], []
        base = u["utt_id"].replace("/", "_")
        for c in plan_clips(u, sr, seed, codecs):
            y, bw, recipe = (x, sr / 2, "none") if c["kind"] == "clean" else degrade(x, sr, c["kind"], c["sev"], c["seed"], tmp)
            y = bc.normalize(bc.resample(y, sr, c["rate"]))
            rel = f"audio/{c['split']}/{u['voice']}/{base}_{c['kind']}{c['sev']}.flac"
            bc.write_clip(out, rel, y, c["rate"])
            rows.append({"path": rel, "sample_rate": c["rate"], "bandwidth_hz": int(round(min(bw, c["rate"] / 2))),
                         "duration_s": f"{y.size / c['rate']:.3f}", "split": c["split"], "source_rate": sr,
                         "degradation": c["kind"], "severity": c["sev"], "recipe": recipe, **common})
        if u["held"] and zlib.crc32(u["utt_id"].encode()) % 4 == 0:  # the same clean content below 3.5 kHz at each rate
            y = np.convolve(bc.resample(x, sr, 8000), LADDER_FIR, mode="same")
            for rate in bc.LADDER_RATES:
                z = bc.normalize(bc.resample(y, 8000, rate))
                rel = f"rate_ladder/{base}/{rate}.wav"
                bc.write_clip(out, rel, z, rate)
                ladder.append({"ladder_id": base, "path": rel, "sample_rate": rate, "bandwidth_hz": bc.LADDER_BANDWIDTH,
                               "duration_s": f"{z.size / rate:.3f}", "split": "heldout", "source_rate": sr,
                               "degradation": "clean", "severity": 0, "recipe": "fir lowpass 3200Hz", **common})
    done.parent.mkdir(exist_ok=True)
    tmp_done = done.with_suffix(".tmp")
    tmp_done.write_text(json.dumps([rows, ladder]))
    tmp_done.replace(done)  # atomic: a stopped build never sees half a record
    return rows, ladder


LADDER_FIR = firwin(511, bc.LADDER_BANDWIDTH - 300, fs=8000, window=("kaiser", 10.0))


def build(out: Path, seed: int = 0, max_utts: int | None = None, workers: int = 2, verbose: bool = True) -> dict:
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    codecs = bc.tool_report()["codecs"]
    utts = plan_utterances(seed, max_utts)
    rows, ladder = [], []
    job = functools.partial(render_utterance, out=out, seed=seed, codecs=codecs)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for i, (r, lad) in enumerate(pool.imap(job, utts, chunksize=4)):  # imap keeps the planned order
            rows += r
            ladder += lad
            if verbose and (i + 1) % 100 == 0:
                print(f"{i + 1}/{len(utts)} utterances, {len(rows)} clips, {time.time() - t0:.0f} s", file=sys.stderr)
    cols = bc.MANIFEST_COLUMNS + ("language", "why_held_out")
    bc.write_csv(out / "manifest.csv", rows, cols)
    bc.write_csv(out / "rate_ladder.csv", ladder, ("ladder_id",) + cols)
    info = {"seed": seed, "max_utts": max_utts, "missing": missing_packages(), "held_languages": HELD_LANGS,
            "held_speakers": HELD_SPEAKERS, "held_recipes": HELD_RECIPES, **bc.summarize(rows), "fingerprint": bc.fingerprint(out),
            "languages": sorted({r["language"] for r in rows}), "voices": len({r["voice"] for r in rows}),
            "build_seconds": round(time.time() - t0, 1)}
    (out / "build_info.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("corpus_ml"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-utts", type=int, default=None, help="build only this many utterances, half of them held out (tests)")
    ap.add_argument("--workers", type=int, default=2, help="processes rendering utterances")
    ap.add_argument("--no-install", action="store_true",
                    help="build from what is installed (default: install_corpus_tools.sh --multilingual first)")
    a = ap.parse_args(argv)
    missing = missing_packages()
    if missing and not a.no_install:
        script = Path(__file__).with_name("install_corpus_tools.sh")
        print(f"build_multilingual: missing {', '.join(missing)}; running {script} --multilingual", file=sys.stderr)
        subprocess.run(["bash", str(script), "--multilingual"], check=False)
        missing = missing_packages()
    if missing:
        print(f"build_multilingual: building without {', '.join(missing)} (a different corpus from the model "
              "cards'; build_info.json lists what was missing)", file=sys.stderr)
    info = build(a.out, a.seed, a.max_utts, a.workers)
    print(json.dumps({k: info[k] for k in ("clips", "hours", "by_split", "voices", "build_seconds")}, indent=1))


if __name__ == "__main__":
    main()
